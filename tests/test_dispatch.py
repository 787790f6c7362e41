"""Dispatch strategies (mope.dispatch): every strategy equals ``masked`` in outputs and gradients."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import compiled_steps_without_recompiles, make_batch, make_model
from peft import PeftModel, get_peft_model
from torch import nn

import mope
from mope.dispatch import (
    LORA_DISPATCH,
    SPARSE_MIN_EXPERTS_PER_ACTIVE,
    SPARSE_MIN_TOKENS,
    auto_dispatch,
    lora_masked,
    resolve_dispatch,
    sort_pairs,
)
from mope.layer import MoPELayer

TRITON = importlib.util.find_spec("triton") is not None

STRATEGIES = [name for name in LORA_DISPATCH if name != "masked"]


def topk_weights(logits: torch.Tensor, k: int) -> torch.Tensor:
    values, index = logits.softmax(-1).topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, index, values)


def layer_for(num_experts: int, top_k: int, shared: int, dispatch: str, **kwargs) -> MoPELayer:
    config = mope.MoPEConfig(
        num_experts=num_experts,
        top_k=top_k,
        num_shared_experts=shared,
        r=3,
        init_weights=False,
        dispatch=dispatch,
        **kwargs,
    )
    torch.manual_seed(0)
    layer = MoPELayer(nn.Linear(16, 12), "default", config).double()
    with torch.no_grad():  # a router scale that makes the top-k choice non-trivial
        layer.mope_router["default"].weight.normal_(0, 1.0)
    return layer


def output_and_grads(layer: MoPELayer, x: torch.Tensor) -> list[torch.Tensor]:
    """The layer's output and the grads w.r.t. x, lora_A, lora_B and the router weight."""
    bank = layer.mope_experts["default"]
    params = [x, bank.lora_A, bank.lora_B, layer.mope_router["default"].weight]
    out = layer(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    return [out, *torch.autograd.grad(out, params, upstream)]


def assert_same_as_masked(layer: MoPELayer, x: torch.Tensor, strategy: str) -> None:
    bank = layer.mope_experts["default"]
    bank.dispatch = strategy
    got = output_and_grads(layer, x)
    bank.dispatch = "masked"
    want = output_and_grads(layer, x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("num_experts", [4, 8, 16])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("token_dims", [(40,), (3, 7)])
def test_strategy_equals_masked_with_gradients(strategy, num_experts, top_k, shared, token_dims):
    layer = layer_for(num_experts, top_k, shared, strategy)
    x = torch.randn(*token_dims, 16, dtype=torch.float64, requires_grad=True)
    assert_same_as_masked(layer, x, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_equals_masked_with_dropped_tokens(strategy):
    """Capacity overflow zeroes chosen weights, so some tokens use fewer experts, some none."""
    layer = layer_for(8, 2, 0, strategy, capacity_factor=0.3)
    x = torch.randn(4, 9, 16, dtype=torch.float64, requires_grad=True)
    assert_same_as_masked(layer, x, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("given_chosen", [False, True], ids=["nonzeros", "chosen"])
def test_strategy_handles_tokens_without_experts_and_unused_experts(strategy, given_chosen):
    """Padding-like rows with all-zero weights, and experts no token chose, give zero delta / grad.

    With ``chosen`` (the gate's top-2 list) the all-zero rows still list two experts, at weight 0.
    """
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    lora_a = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.zeros(2, 6, 5, dtype=torch.float64)
    weights[0, :4, 1] = 0.7
    weights[0, :4, 3] = 0.3
    weights[1, 2:, 1] = 1.0
    chosen = weights.topk(2, dim=-1).indices if given_chosen else None
    weights.requires_grad_()
    base_out = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (resolve_dispatch(strategy, x, lora_a, 2).apply, lora_masked):
        out = fn(x, lora_a, lora_b, weights, 2.0, base_out, chosen)
        results.append([out, *torch.autograd.grad(out.square().sum(), [x, lora_a, lora_b, base_out])])
    for g, w in zip(*results, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert torch.equal(results[0][0][0, 4:], base_out[0, 4:])  # no expert: the base output, exactly
    assert results[0][2][[0, 2, 4]].abs().max() == 0  # unused experts: zero gradient


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
def test_grouped_kernel_math_on_cpu_fp32():
    """The grouped path's math, forced on CPU fp32 (where auto never picks it): every expert gets tokens,
    since torch's CPU backward of ``_grouped_mm`` fails on an empty group."""
    torch.manual_seed(0)
    x = torch.randn(64, 16, requires_grad=True)
    lora_a = torch.randn(4, 8, 16, requires_grad=True)
    lora_b = torch.randn(4, 8, 8, requires_grad=True)
    logits = torch.randn(64, 4, requires_grad=True)
    assert (topk_weights(logits, 2) != 0).sum(0).min() > 0
    base_out = torch.randn(64, 8)
    chosen = logits.topk(2, dim=-1).indices
    results = []
    for fn, given in (
        (LORA_DISPATCH["grouped"].apply, None),
        (LORA_DISPATCH["grouped"].apply, chosen),
        (lora_masked, None),
    ):
        out = fn(x, lora_a, lora_b, topk_weights(logits, 2), 2.0, base_out, given)
        results.append([out, *torch.autograd.grad(out.square().sum(), [x, lora_a, lora_b, logits])])
    for got in results[:2]:
        for g, w in zip(got, results[2], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)


def test_auto_rule():
    tokens = SPARSE_MIN_TOKENS
    many = SPARSE_MIN_EXPERTS_PER_ACTIVE * 2
    assert auto_dispatch(tokens, many, 2) == "sparse"  # sparse and many tokens
    assert auto_dispatch(tokens, many, 2, "cuda") == "masked"  # calibrated on an H200: masked always won
    assert auto_dispatch(tokens - 1, many, 2) == "masked"  # few tokens
    assert auto_dispatch(tokens, many - 1, 2) == "masked"  # N*r not large against k*r
    assert auto_dispatch(10**6, 64, 64) == "masked"  # dense gate
    x, lora_a = torch.zeros(tokens, 8), torch.zeros(many, 2, 8)
    assert resolve_dispatch("auto", x, lora_a, 2).name == "sparse"
    assert resolve_dispatch("auto", x[:4], lora_a, 2).name == "masked"
    # half precision on CPU: the sparse kernels have no such version, sorted runs instead
    assert resolve_dispatch("auto", x.bfloat16(), lora_a.bfloat16(), 2).name == "sorted"


def test_grouped_falls_back_to_sorted_on_cpu():
    x, lora_a = torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(3, 8, 8, dtype=torch.bfloat16)
    assert resolve_dispatch("grouped", x, lora_a, 1).name == "sorted"
    assert resolve_dispatch("grouped", x.float(), lora_a.float(), 1).name == "sorted"


def test_dense_gates_use_masked():
    dense = layer_for(16, 2, 0, "auto", router="dense").mope_experts["default"]
    assert dense.active_experts == 16
    assert resolve_dispatch("auto", torch.zeros(4096, 16), dense.lora_A, dense.active_experts).name == "masked"
    sparse = layer_for(16, 2, 1, "auto").mope_experts["default"]
    assert sparse.active_experts == 3  # top_k + shared


def test_config_dispatch_validated_and_not_saved(tmp_path):
    with pytest.raises(ValueError, match=r"MoPEConfig\.dispatch"):
        mope.MoPEConfig(dispatch="fastest")
    config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules="all-linear", num_experts=4, r=2, dispatch="sorted")
    assert "dispatch" not in config.to_dict()
    model = get_peft_model(make_model("llama"), config)
    assert all(b.dispatch == "sorted" for b in model.modules() if hasattr(b, "active_experts"))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "dispatch" not in saved and saved["num_experts"] == 4
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    banks = [b for b in loaded.modules() if hasattr(b, "active_experts")]
    assert banks and all(b.dispatch == "auto" for b in banks)
    assert mope.set_dispatch(loaded, "masked") == len(banks)
    assert all(b.dispatch == "masked" for b in banks)
    with pytest.raises(ValueError, match="dispatch"):
        mope.set_dispatch(loaded, "fastest")


def llama_with(dispatch: str):
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM",
        target_modules="all-linear",
        num_experts=8,
        top_k=2,
        r=4,
        init_weights=False,
        dispatch=dispatch,
    )
    return get_peft_model(make_model("llama"), config)


@pytest.mark.parametrize("strategy", ["sorted", "sparse"])
def test_whole_llama_strategy_equals_masked_in_logits_and_training_grads(strategy):
    models = {name: llama_with(name) for name in ("masked", strategy)}
    batch = make_batch("llama", batch=3, seq=10, pad=4)
    optimizers = {
        name: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for name, m in models.items()
    }
    for _ in range(2):
        grads, outputs = {}, {}
        for name, model in models.items():
            model.train()
            optimizers[name].zero_grad()
            outputs[name] = model(**batch)
            outputs[name].loss.backward()
            grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        torch.testing.assert_close(outputs[strategy].logits, outputs["masked"].logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outputs[strategy].loss, outputs["masked"].loss, atol=1e-6, rtol=1e-6)
        assert grads[strategy].keys() == grads["masked"].keys()
        for n, grad in grads["masked"].items():
            torch.testing.assert_close(grads[strategy][n], grad, atol=1e-5, rtol=1e-4, msg=n)
        for optimizer in optimizers.values():
            optimizer.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_equals_masked_on_cuda_bf16(strategy):
    torch.manual_seed(0)
    tokens, n, r, d = 256, 16, 8, 64
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lora_a = (torch.randn(n, r, d, device="cuda") / d**0.5).bfloat16().requires_grad_()
    lora_b = (torch.randn(n, r, d, device="cuda") / r**0.5).bfloat16().requires_grad_()
    logits = torch.randn(tokens, n, device="cuda", requires_grad=True)
    exact = [t.detach().double().requires_grad_() for t in (x, lora_a, lora_b, logits)]
    results = []
    for fn, inputs in (
        (resolve_dispatch(strategy, x, lora_a, 2).apply, (x, lora_a, lora_b, logits)),  # CPU-only: fallback
        (lora_masked, (x, lora_a, lora_b, logits)),
        (lora_masked, exact),
    ):
        base_out = inputs[0].new_zeros(tokens, d)
        out = fn(inputs[0], inputs[1], inputs[2], topk_weights(inputs[3], 2), 2.0, base_out)
        results.append([out, *torch.autograd.grad(out.double().square().sum(), list(inputs))])
    # bf16 rounds differently along each path (masked multiplies zeros in, sorted never sees them), so
    # compare each with a float64 reference: the strategy may not be much worse than masked itself.
    for got, masked, reference in zip(*results, strict=True):
        scale = reference.double().norm()
        error_got = (got.double() - reference.double()).norm() / scale
        error_masked = (masked.double() - reference.double()).norm() / scale
        assert error_got < max(2 * error_masked, 1e-2), (error_got.item(), error_masked.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_is_masked_and_grouped_runs_on_request():
    x = torch.zeros(SPARSE_MIN_TOKENS, 64, device="cuda")
    lora_a = torch.zeros(SPARSE_MIN_EXPERTS_PER_ACTIVE * 2, 8, 64, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        assert resolve_dispatch("auto", x.to(dtype), lora_a.to(dtype), 2).name == "masked"
    grouped = resolve_dispatch("grouped", x.bfloat16(), lora_a.bfloat16(), 2).name
    assert grouped == ("grouped" if torch.cuda.get_device_capability() >= (9, 0) else "sorted")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are detectable on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "dispatch",
    ["auto", pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="triton is not installed"))],
)
def test_default_dispatch_training_step_makes_no_host_sync_in_mope(dtype, dispatch):
    """A whole Llama step (routing, aux losses, stats, masked dispatch, backward): no sync from mope's code.

    Syncs the base model makes itself (transformers' mask handling) are not ours; CUDA's sync-debug
    warnings name the Python line that asked for the sync, so each is attributed to its file.
    """
    import warnings
    from pathlib import Path

    model = llama_with(dispatch).to("cuda", dtype)
    batch = {k: v.cuda() for k, v in make_batch("llama", batch=3, seq=10, pad=4).items()}
    model.train()
    model(**batch).loss.backward()  # warm-up: lazy initialisation may sync once
    mope_dir = str(Path(mope.__file__).parent)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught, mope.routing_stats(model) as stats:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(**batch).loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    ours = [f"{w.filename}:{w.lineno}" for w in caught if w.filename.startswith(mope_dir)]
    assert not ours, ours
    assert stats.report()  # statistics accumulated on device, read here on request


def test_compiled_training_steps_do_not_recompile_for_new_batches_or_eager_calls_between():
    compiled_steps_without_recompiles("masked")


def test_sparse_strategy_under_torch_compile():
    """dynamo cannot trace sparse CSR tensors: the sparse strategy runs eagerly inside a compiled layer."""
    layer = layer_for(16, 2, 0, "sparse")
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(layer, backend="eager")
    bank = layer.mope_experts["default"]
    params = [x, bank.lora_A, bank.lora_B, layer.mope_router["default"].weight]
    out = compiled(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    got = [out, *torch.autograd.grad(out, params, upstream)]
    bank.dispatch = "masked"
    for g, w in zip(got, output_and_grads(layer, x), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_sort_pairs_from_chosen_equals_the_nonzero_pairs():
    """The gate's chosen experts give the same pairs, in the same order, as finding the nonzero weights."""
    torch.manual_seed(0)
    logits = torch.randn(50, 6)
    weights = topk_weights(logits, 2)
    found = sort_pairs(weights, 0.5, torch.float64)
    given = sort_pairs(weights, 0.5, torch.float64, logits.topk(2, dim=-1).indices)
    assert torch.equal(given.token, found.token) and torch.equal(given.gate, found.gate)
    assert torch.equal(given.counts, found.counts) and given.sizes == found.sizes


def test_routing_lists_the_chosen_experts_of_fixed_k_gates():
    for router, k in (("top_k", 2), ("switch", 1), ("top_p", 3), ("hierarchical", 2), ("balanced", 2)):
        layer = layer_for(8, k if router != "switch" else 2, 0, "masked", router=router)
        routing = layer.mope_router["default"](torch.randn(5, 16, dtype=torch.float64))
        used = routing.weights != 0
        listed = torch.zeros_like(used).scatter(-1, routing.chosen, True)
        assert routing.chosen.shape == (5, k) and (used <= listed).all(), router
        assert (listed.sum(-1) == k).all(), router  # k distinct experts


@pytest.mark.parametrize("strategy", ["sorted", "sparse", "masked"])
def test_a_batch_with_no_routed_token_runs_every_strategy(strategy):
    # expert choice picks no padding: a batch of padding (the repeats on one process of a DDP eval) left no pair,
    # and sorted's torch.cat of no segment raised, losing the run's bundle
    config = mope.MoPEConfig(
        task_type="SEQ_CLS", target_modules=["query"], num_experts=4, top_k=1, r=2, router="expert_choice",
        dispatch=strategy, init_weights=False,
    )  # fmt: skip
    model = get_peft_model(make_model("bert"), config).train()
    batch = make_batch("bert")
    batch["attention_mask"] = torch.zeros_like(batch["attention_mask"])
    model(**batch).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "mope_experts" in name]
    assert grads and all(g is not None and not g.any() for g in grads)  # in the graph, with nothing to learn
