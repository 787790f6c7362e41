"""Mixed precision on CPU: a whole MoPE training step under bf16 and fp16 autocast (fp16 with a grad scaler).

The experts run in the autocast dtype like the base layers; the router scores in fp32 whatever the
autocast (``Router`` leaves autocast for its scoring), so the gates' probabilities, the load and the
aux loss keep fp32 precision. Every gate family's fp32 scoring on CUDA is checked in
tests/routing/test_gate_battery.py when a GPU is there.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_model
from peft import get_peft_model

import mope
from mope.routing import Router

PRECISIONS = [torch.bfloat16, torch.float16]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


def mixture(router: str, expert_type: str = "lora", device: str = "cpu"):
    config = mope.MoPEConfig(
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "up_proj"],
        num_experts=4,
        top_k=2,
        r=4,
        router=router,
        expert_type=expert_type,
    )
    model = get_peft_model(make_model("llama"), config)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)  # experts that change the output
    return model.to(device).train()


def router_dtypes(model) -> tuple[list[torch.dtype], list]:
    seen: list[torch.dtype] = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: seen.extend([out.logits.dtype, out.weights.dtype]))
        for m in model.modules()
        if isinstance(m, Router)
    ]
    return seen, handles


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", PRECISIONS, ids=str)
@pytest.mark.parametrize("router", ["top_k", "dense"])
def test_a_training_step_under_autocast_keeps_the_router_in_fp32(router, dtype, device):
    batch = {k: v.to(device) for k, v in make_batch("llama", pad=2).items()}
    reference = mixture(router, device=device)
    reference_loss = reference(**batch).loss
    model = mixture(router, device=device)
    seen, handles = router_dtypes(model)
    with torch.autocast(device, dtype=dtype):
        output = model(**batch)
    for handle in handles:
        handle.remove()
    assert seen and set(seen) == {torch.float32}
    assert output.aux_loss.dtype == torch.float32
    torch.testing.assert_close(output.loss.float(), reference_loss, rtol=3e-2, atol=3e-2)
    output.loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for _, p in trainable)  # master weights stay fp32
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
    assert any(p.grad.abs().sum() > 0 for n, p in trainable if "mope_router" in n)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_with_a_grad_scaler_updates_every_trainable_weight(device):
    model = mixture("top_k", device=device)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    for step in range(3):
        batch = {k: v.to(device) for k, v in make_batch("llama", seed=step).items()}
        with torch.autocast(device, dtype=torch.float16):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert scaler.get_scale() > 0
    after = dict(model.named_parameters())
    for name, before in trainable.items():
        assert torch.isfinite(after[name]).all(), name
        before = before.to(device)
        if "lora_A" in name or "lora_B" in name or "mope_router" in name:
            assert not torch.equal(after[name].detach(), before), f"{name} did not move"
