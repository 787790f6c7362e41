"""How a gate's weights are applied to a bank of LoRA experts: a table of strategies.

Every strategy computes the same thing, the base layer's output plus
``delta[t] = s * sum_e g[t, e] * B_e^T A_e x[t]`` over the experts with ``g[t, e] != 0``, with the
same gradients; they differ only in cost. masked, sorted and grouped add their last product into
the base output in one op (``addmm``, ``index_add``) rather than forming ``delta`` and adding it:
one pass over a ``[tokens, d_out]`` tensor fewer, forward and backward.

- ``masked``: with ``g`` zero for experts a token does not use,
  ``delta = s * B_cat (g (x) 1_r  *  A_cat x)`` where ``A_cat`` stacks all experts' A (inner dim
  N*r). Two plain GEMMs (the second an ``addmm`` into the base output, ``s`` its ``alpha``), no
  sort, no host sync; unselected experts get zero gradient. It computes
  all N experts for every token, so it wins while N*r is small against the layer width.
- ``sorted``: the (token, expert) pairs, sorted by expert once (one host sync for the per-expert
  counts, which its loop needs), per-expert GEMMs on contiguous segments, scaled by the gate
  weight and added back with ``index_add``. The pairs are the gate's ``chosen`` experts where it
  lists them (:attr:`mope.routing.Routing.chosen`), else the nonzero weights. Work tracks k*r, not N*r, plus a gather and a scatter of the
  selected rows and a Python loop over experts (not tokens).
- ``sparse`` (CPU, fp32/fp64): only the chosen experts' ranks, with no copy of the selected rows:
  ``h = A_cat x`` sampled at each token's chosen rank columns (``torch.sparse.sampled_addmm``),
  scaled by the gate, then summed over those rows of ``B_cat`` (``embedding_bag``); the backward
  uses the same products and ``H^T`` times dense. Work tracks k*r; the kernels run at a few times
  fewer flop/s than a dense GEMM, so it pays from N/k = 8 on. Falls back to ``sorted`` elsewhere.
- ``grouped``: ``sorted`` with the per-expert loop replaced by ``torch._grouped_mm`` (one kernel
  for all experts). Used only where it runs: CUDA, bf16, sizes multiple of 8, compute
  capability >= 9.0; anywhere else it falls back to ``sorted``. Only on request: on an H200 it
  was slower than ``masked`` at every shape measured (see :func:`auto_dispatch`).

- ``triton`` (:mod:`mope.kernels`, the ``triton`` extra): the masked form's arithmetic in Triton
  kernels, two launches forward and four backward per layer (the gate multiply, the scaling and
  the add into the base output inside the products; with the router in the same Function, three
  backward, two where N r <= 64, :mod:`mope.kernels.layer`); where the gate lists its chosen experts and
  N/k >= 8, only those, grouped by expert (:mod:`mope.kernels.grouped`); the top-k routers score
  and gate in a kernel too (:mod:`mope.kernels.router`), in the same autograd Function as the
  experts' kernels where the layer allows (:mod:`mope.kernels.layer`,
  :meth:`mope.layer.MoPELayer.fuses`). It runs where Triton does (CUDA; CPU only under
  ``TRITON_INTERPRET=1``, a testing aid) and is refused with the reason anywhere else, never
  silently replaced. ``auto`` does not pick it until GPU measurements say it pays.

``auto`` picks by shape (:func:`auto_dispatch`); calibration in its docstring.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from torch.nn import functional as F

from .kernels import triton_import_problem, triton_unavailable

# (x [..., d_in], lora_A [N, r, d_in], lora_B [N, r, d_out], weights [..., N], scaling, base_out [..., d_out],
#  chosen [..., k] or None: the experts a token's weights may be nonzero at) -> base_out + delta [..., d_out],
#  in base_out's dtype
LoRADispatchFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor, torch.Tensor | None], torch.Tensor
]


def lora_masked(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor,
    chosen: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., d_in]``, ``lora_A [N, r, d_in]``, ``lora_B [N, r, d_out]``, ``weights [..., N]``, ``base_out [..., d_out]``.

    Every expert for every token (``chosen`` is not needed: unused experts have weight 0).
    """
    n, r, d_in = lora_A.shape
    h = F.linear(x, lora_A.reshape(n * r, d_in))
    fused = base_out.dtype == h.dtype  # else (half base, fp32 experts): scale the narrow h, add in base's dtype
    gate = (weights if fused else weights * scaling).to(h.dtype).unsqueeze(-1)
    h = (h.unflatten(-1, (n, r)) * gate).flatten(-2)
    lora_B_cat = lora_B.reshape(n * r, -1)
    if not fused:
        return base_out + (h @ lora_B_cat).to(base_out.dtype)
    flat = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h.reshape(-1, n * r), lora_B_cat, alpha=scaling)
    return flat.view(*base_out.shape)


@dataclass
class SortedPairs:
    """The (token, expert) pairs of flat gate weights ``[T, N]``, grouped by expert."""

    token: torch.Tensor  # [P] token index of each pair, expert-major order
    gate: torch.Tensor  # [P, 1] the pair's gate weight times the LoRA scaling, in the experts' dtype
    counts: torch.Tensor  # [N] pairs per expert, on the weights' device
    host_sizes: list[int] | None = None  # counts on the host, once read

    @property
    def sizes(self) -> list[int]:
        """Pairs per expert as host ints (a sync on a GPU, once): what a Python loop over experts needs."""
        if self.host_sizes is None:
            self.host_sizes = self.counts.tolist()
        return self.host_sizes


def sort_pairs(
    weights: torch.Tensor, scaling: float, dtype: torch.dtype, chosen: torch.Tensor | None = None
) -> SortedPairs:
    """Pairs in expert-major order (tokens ascending within an expert).

    With ``chosen [T, k]`` (the gate's chosen experts) the pairs are known without a look at the
    weights: a stable sort of the T*k expert ids, and nothing comes to the host. Without it the
    nonzero weights are found: ``nonzero`` of the transposed mask sorts them by expert, after the
    per-expert counts come to the host once (``nonzero_static`` then needs no second sync on CUDA).
    """
    if chosen is not None:
        k = chosen.shape[-1]
        flat = chosen.reshape(-1)  # token-major: pair p is token p // k
        expert, order = torch.sort(flat, stable=True)
        token = torch.div(order, k, rounding_mode="floor")
        pairs = SortedPairs(token, weights.new_empty(0), torch.bincount(flat, minlength=weights.shape[-1]))
    else:
        used = (weights != 0).t()  # [N, T]
        counts = used.sum(dim=1)
        sizes = counts.tolist()
        expert, token = torch.nonzero_static(used, size=sum(sizes)).unbind(1)
        pairs = SortedPairs(token, weights.new_empty(0), counts, sizes)
    pairs.gate = (weights[token, expert].to(dtype) * scaling).unsqueeze(-1)
    return pairs


def add_back(base_out: torch.Tensor, out: torch.Tensor, pairs: SortedPairs) -> torch.Tensor:
    """``base_out`` plus each pair's output row added at its token (out of place: one op, no zeros, no add)."""
    flat = base_out.reshape(-1, base_out.shape[-1]).index_add(0, pairs.token, out.to(base_out.dtype))
    return flat.view(*base_out.shape)


def gather_pairs(
    x: torch.Tensor, lora_A: torch.Tensor, weights: torch.Tensor, scaling: float, chosen: torch.Tensor | None
) -> tuple[torch.Tensor, SortedPairs]:
    """The input rows of every (token, expert) pair, grouped by expert, and the pairs themselves."""
    n, _, d_in = lora_A.shape
    flat_chosen = None if chosen is None else chosen.reshape(-1, chosen.shape[-1])
    pairs = sort_pairs(weights.reshape(-1, n), scaling, x.dtype, flat_chosen)
    return x.reshape(-1, d_in).index_select(0, pairs.token), pairs


def lora_sorted(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor,
    chosen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-expert GEMMs on the tokens each expert got; a loop over experts, never over tokens."""
    rows, pairs = gather_pairs(x, lora_A, weights, scaling, chosen)
    # no pair at all (a batch of padding, under expert choice): one empty segment keeps the experts in the graph
    used = [e for e, size in enumerate(pairs.sizes) if size] or [0]
    sizes = [pairs.sizes[e] for e in used]
    # unbind, not lora_A[e]: one stacked gradient in backward instead of a zero-filled full one per expert
    a_experts, b_experts = lora_A.unbind(0), lora_B.unbind(0)
    segments = rows.split(sizes)
    # A, then the gate (on the r-wide h: cheaper than on d_out), then B, per non-empty segment
    hidden = torch.cat([seg @ a_experts[e].t() for e, seg in zip(used, segments, strict=True)]) * pairs.gate
    out = torch.cat([h @ b_experts[e] for e, h in zip(used, hidden.split(sizes), strict=True)])
    return add_back(base_out, out, pairs)


def lora_grouped(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor,
    chosen: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sorted`` with one ``torch._grouped_mm`` per side instead of a loop over experts.

    With the gate's ``chosen`` experts nothing comes to the host: the offsets stay on the device.
    """
    rows, pairs = gather_pairs(x, lora_A, weights, scaling, chosen)
    offsets = pairs.counts.cumsum(0, dtype=torch.int32)
    hidden = torch._grouped_mm(rows, lora_A.transpose(-2, -1), offs=offsets) * pairs.gate
    out = torch._grouped_mm(hidden, lora_B, offs=offsets)
    return add_back(base_out, out, pairs)


@dataclass
class RankPattern:
    """Where ``H [T, N*r]`` is nonzero: row t holds the r rank columns of each expert token t uses.

    Stored as CSR (``crow``, ``col``; tokens in order, experts ascending within a token). The CSR
    of ``H^T``, which only the backward needs, is built on first use (:attr:`transposed`).
    """

    crow: torch.Tensor
    col: torch.Tensor
    token: torch.Tensor  # [P] the token of each (token, expert) pair, in H's order
    r: int
    shape: tuple[int, int]

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape, check_invariants=False)

    @cached_property
    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``H^T``'s ``crow`` and ``col``, and ``perm``: the position in ``H``'s values of each of ``H^T``'s."""
        perm = torch.argsort(self.col, stable=True)  # column-major order; tokens stay ascending within a column
        crow_t = F.pad(torch.bincount(self.col, minlength=self.shape[1]).cumsum(0), (1, 0))
        return crow_t, self.token.repeat_interleave(self.r)[perm], perm

    def matrix_t(self, values: torch.Tensor) -> torch.Tensor:
        crow_t, col_t, perm = self.transposed
        size = (self.shape[1], self.shape[0])
        return torch.sparse_csr_tensor(crow_t, col_t, values[perm], size, check_invariants=False)

    def sampled(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``(a @ b^T)`` at the pattern's entries, as ``H``'s values (``a [T, d]``, ``b [N*r, d]``)."""
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are tested
            warnings.simplefilter("ignore")
            zeros = self.matrix(a.new_zeros(self.col.shape))
            return torch.sparse.sampled_addmm(zeros, a, b.t(), beta=0.0).values()

    def gather_rows(self, values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``H @ rows`` for ``H`` with ``values``: per token, the gate-weighted sum of its experts' rank rows."""
        return F.embedding_bag(self.col, rows, self.crow[:-1], mode="sum", per_sample_weights=values)


def rank_pattern(weights: torch.Tensor, r: int, chosen: torch.Tensor | None) -> tuple[RankPattern, torch.Tensor]:
    """The pattern of the experts in use at rank granularity, and each pair's expert.

    ``weights [T, N]``; ``chosen [T, k]``, the gate's chosen experts, or None: the nonzero weights.
    """
    tokens, n = weights.shape
    if chosen is not None:
        k = chosen.shape[-1]
        expert = chosen.sort(dim=-1).values.flatten()  # experts ascending within a token, as CSR wants
        token = torch.arange(tokens, device=weights.device).repeat_interleave(k)
        per_token = torch.full((tokens,), k, device=weights.device, dtype=torch.long)
    else:
        used = weights != 0
        token, expert = used.nonzero().unbind(1)
        per_token = used.sum(1)
    crow = F.pad((per_token * r).cumsum(0), (1, 0))
    col = (expert[:, None] * r + torch.arange(r, device=weights.device)).flatten()
    return RankPattern(crow, col, token, r, (tokens, n * r)), expert


class SparseLoRA(torch.autograd.Function):
    """``base_out + s * B_cat^T (g * A_cat x)`` evaluated only at the pattern: fused gathers, no k*T row copies.

    Forward: ``h = A_cat x`` sampled at the pattern (SDDMM), scaled by each pair's gate, then
    summed over each token's rank rows of ``B_cat`` (``embedding_bag``). Backward: the same three
    kinds of product (sampled, row sums, ``H^T`` times dense).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # under autocast too: the CPU-only kernels
    def forward(ctx, x, a_cat, b_cat, gate, base_out, pattern: RankPattern):
        gate_rank = gate.repeat_interleave(pattern.r)
        h = pattern.sampled(x, a_cat)
        hg = h * gate_rank
        ctx.save_for_backward(x, a_cat, b_cat, h, hg, gate_rank)
        ctx.pattern = pattern
        return base_out + pattern.gather_rows(hg, b_cat)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out):
        x, a_cat, b_cat, h, hg, gate_rank = ctx.saved_tensors
        pattern, needs = ctx.pattern, ctx.needs_input_grad
        grad_hg = pattern.sampled(grad_out, b_cat)
        grad_h = grad_hg * gate_rank
        grad_x = pattern.gather_rows(grad_h, a_cat) if needs[0] else None
        grad_a = pattern.matrix_t(grad_h) @ x if needs[1] else None
        grad_b = pattern.matrix_t(hg) @ grad_out if needs[2] else None
        grad_gate = (grad_hg * h).view(-1, pattern.r).sum(-1) if needs[3] else None
        return grad_x, grad_a, grad_b, grad_gate, grad_out, None


@torch.compiler.disable  # dynamo cannot trace sparse CSR tensors: torch.compile runs this part eagerly
def lora_sparse(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor,
    chosen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Only the chosen experts' ranks, as sparse-dense products: a CPU strategy for many experts per token's k."""
    n, r, d_in = lora_A.shape
    flat_weights = weights.reshape(-1, n)
    flat_chosen = None if chosen is None else chosen.reshape(-1, chosen.shape[-1])
    pattern, expert = rank_pattern(flat_weights, r, flat_chosen)
    gate = flat_weights[pattern.token, expert].to(x.dtype) * scaling
    flat_base = base_out.reshape(-1, base_out.shape[-1])
    a_cat, b_cat = lora_A.reshape(n * r, d_in), lora_B.reshape(n * r, -1)
    out = SparseLoRA.apply(x.reshape(-1, d_in), a_cat, b_cat, gate, flat_base, pattern)
    return out.to(base_out.dtype).view(*base_out.shape)


def sparse_supported(x: torch.Tensor, lora_A: torch.Tensor) -> bool:
    """CPU, fp32 or fp64 (the sparse kernels used here have no half-precision CPU versions)."""
    return x.device.type == "cpu" and x.dtype == lora_A.dtype and x.dtype in (torch.float32, torch.float64)


def always(x: torch.Tensor, lora_A: torch.Tensor) -> bool:
    return True


def grouped_mm_supported(x: torch.Tensor, lora_A: torch.Tensor) -> bool:
    """Where ``torch._grouped_mm`` is known to run forward and backward: CUDA sm90+, bf16, 16-byte strides.

    (It also runs on CPU in recent torch, but its backward fails there when an expert gets no
    token, and the loop of ``sorted`` is as fast on CPU.)
    """
    if not (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == lora_A.dtype == torch.bfloat16):
        return False
    if any(size % 8 for size in lora_A.shape[1:]):
        return False
    return torch.cuda.get_device_capability(x.device) >= (9, 0)


def lora_triton(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    scaling: float,
    base_out: torch.Tensor,
    chosen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton kernels, imported on first use (Triton is optional): the chosen experts only
    (:func:`mope.kernels.grouped.grouped_lora`) where that pays, else the masked form
    (:func:`mope.kernels.lora.routed_lora`)."""
    from .kernels import lora

    if lora.use_grouped(x, lora_A.shape[0], chosen):
        from .kernels.grouped import grouped_lora

        return grouped_lora(x, lora_A, lora_B, weights, scaling, base_out, chosen)
    return lora.routed_lora(x, lora_A, lora_B, weights, scaling, base_out)


TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_refusal(x: torch.Tensor, lora_A: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on these tensors (device, Triton, dtype), or None."""
    reason = triton_unavailable(x.device)
    if reason is None and not (x.dtype in TRITON_DTYPES and lora_A.dtype in TRITON_DTYPES):
        reason = f"the kernels take float32, bfloat16 or float16 experts and inputs, not {lora_A.dtype}"
    return reason


@dataclass(frozen=True)
class LoRADispatch:
    """One way to apply gate weights to LoRA experts.

    Where it cannot run, ``fallback`` names the strategy used instead; a strategy without one
    says why in ``refusal`` and is refused (a kernel strategy asked for by name should not turn
    silently into another).
    """

    name: str
    apply: LoRADispatchFn
    supported: Callable[[torch.Tensor, torch.Tensor], bool] = always
    fallback: str | None = None
    refusal: Callable[[torch.Tensor, torch.Tensor], str | None] | None = None


# torch strategies: run on every device, falling back where a kernel they use has no version
LORA_DISPATCH: dict[str, LoRADispatch] = {
    "masked": LoRADispatch("masked", lora_masked),
    "sorted": LoRADispatch("sorted", lora_sorted),
    "grouped": LoRADispatch("grouped", lora_grouped, grouped_mm_supported, fallback="sorted"),
    "sparse": LoRADispatch("sparse", lora_sparse, sparse_supported, fallback="sorted"),
}
# compiled-kernel strategies: run only where their compiler does, refused (with the reason) elsewhere
KERNEL_DISPATCH: dict[str, LoRADispatch] = {
    "triton": LoRADispatch("triton", lora_triton, lambda x, a: triton_refusal(x, a) is None, refusal=triton_refusal),
}
ALL_DISPATCH: dict[str, LoRADispatch] = {**LORA_DISPATCH, **KERNEL_DISPATCH}
DISPATCH_CHOICES: tuple[str, ...] = ("auto", *ALL_DISPATCH)

# auto_dispatch's thresholds on CPU (see its docstring for the measurements behind them)
SPARSE_MIN_EXPERTS_PER_ACTIVE = 8  # N / k at or above which computing only the chosen experts pays
SPARSE_MIN_TOKENS = 512  # fewer tokens: the sparse products' fixed costs dominate, stay masked


def auto_dispatch(tokens: int, num_experts: int, active: int, device_type: str = "cpu") -> str:
    """The strategy ``auto`` picks for ``tokens`` tokens, N experts and ``active`` (k) experts per token.

    Masked computes N*r ranks per token; sparse and sorted k*r, sparse through sparse-dense products
    (no copies of the k*T selected rows), sorted through a gather, per-expert GEMMs and a scatter.
    Rule on CPU: ``sparse`` when ``N / k >= 8`` and ``tokens >= 512``, else ``masked``; dense gates
    (``active == N``) always stay masked. Where ``sparse`` cannot run (half precision) it falls
    back to ``sorted``. On CUDA always ``masked``: at every shape measured (up to 8192 tokens,
    width 4096, N = 64 at k = 2; ``benchmarks/results/dispatch_calibration_cuda.md``, H200, bf16)
    masked was the fastest, grouped took 1.4-2.1x and sorted 2-9x its time: the masked GEMMs'
    extra N*r columns cost less than the sort, gather and scatter kernels.

    Calibration (``benchmarks/dispatch_calibration.py``, ``benchmarks/results/dispatch_calibration_cpu.md``:
    one layer d_in = d_out = d, r = 8, fwd + bwd, fp32, 1 thread, 2-core AMD EPYC, torch 2.13,
    median of 15 interleaved repetitions), sparse / masked (sorted / masked):

        T=1024  d=256:  N/k=2: 2.19 (1.72)  N/k=4: 1.50 (1.67)  N/k=8: 0.89-0.90 (0.85-1.05)  N/k=32: 0.27 (0.38)
        T=1024  d=1024: N/k=2: 1.94 (1.79)  N/k=4: 1.43 (1.88)  N/k=8: 0.77-0.78 (0.71-1.24)  N/k=32: 0.25 (0.38)
        T=128   d=256:  N/k<=8: 1.33-2.09 (overheads dominate)  N/k=32: 0.64 (1.34)
        T=128   d=1024: N/k<=4: 1.39-2.04  N/k=8: 0.89-1.03  N/k=32: 0.42 (0.67)

    With 2 threads (one run, T=1024, top-2, d=256 and 1024; masked's GEMMs gain most from the
    second thread): N/k=8 0.96-1.05 (sorted 1.47-1.98), N/k=32 0.30-0.37 (sorted 0.58-0.96).
    """
    if device_type == "cuda" or active >= num_experts or tokens < SPARSE_MIN_TOKENS:
        return "masked"
    if num_experts < SPARSE_MIN_EXPERTS_PER_ACTIVE * active:
        return "masked"
    return "sparse"


def resolve_dispatch(name: str, x: torch.Tensor, lora_A: torch.Tensor, active: int) -> LoRADispatch:
    """The strategy that runs: ``auto`` resolved by shape, then fallbacks until one is supported here."""
    if name == "auto":
        name = auto_dispatch(x.numel() // x.shape[-1], lora_A.shape[0], active, x.device.type)
    strategy = ALL_DISPATCH[name]
    while not strategy.supported(x, lora_A):
        if strategy.fallback is None:
            raise ValueError(
                f"dispatch={name!r} cannot run on these {x.device.type} tensors: {strategy.refusal(x, lora_A)}. "
                "Use dispatch='auto' (mope.set_dispatch(model, 'auto') or MoPEConfig.dispatch)."
            )
        strategy = ALL_DISPATCH[strategy.fallback]
    return strategy


def set_dispatch(model: nn.Module, name: str) -> int:
    """Set the dispatch strategy of every LoRA expert bank in ``model`` (a runtime setting, not saved).

    Returns how many banks were changed. The top-k routers follow (with ``'triton'`` they score and
    gate in the Triton router kernel). A kernel strategy whose compiler is not installed is
    refused here, changing nothing; one that cannot run on the device the tensors are on when a
    forward runs is refused then (the model may still be moved to one where it can).
    """
    if name not in DISPATCH_CHOICES:
        raise ValueError(f"dispatch={name!r} is unknown; choose one of {list(DISPATCH_CHOICES)}")
    problem = triton_import_problem() if name in KERNEL_DISPATCH else None
    if problem is not None:
        raise ValueError(f"dispatch={name!r}: {problem}")
    modules = [module for module in model.modules() if hasattr(module, "dispatch")]  # banks and top-k routers
    for module in modules:
        module.dispatch = name
    return sum(hasattr(module, "active_experts") for module in modules)
