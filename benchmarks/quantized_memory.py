"""Peak memory of a QLoRA-style training step: a 4-bit base with MoPE top-2 of 8 against the same base with PEFT LoRA r=16.

Run (alone, ~1 minute on 2 CPU cores; needs ``pip install 'mope[quant]'``):

    python benchmarks/quantized_memory.py            # writes benchmarks/results/quantized_memory_cpu.{md,json}
    python benchmarks/quantized_memory.py --quick    # tiny shapes, a smoke test

Method: a random Llama built from a config (no download) is saved once, then each candidate runs in its own
process: the model is loaded with ``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, fp32 compute)``,
prepared with ``peft.prepare_model_for_kbit_training`` (non-reentrant gradient checkpointing), the adapter is
attached to every linear layer but the head, the kernel's peak-RSS mark is reset, and two AdamW steps run
(forward with labels, backward, step: the optimizer states count). "peak" is the process's peak RSS over those
steps (model, runtime and Python included); "rise" is that peak minus the resident size just before the first
step. Candidates: the frozen 4-bit base (no adapter; its backward reaches the input embeddings), PEFT LoRA r=16
(alpha 32), MoPE top-2 of 8 LoRA experts r=8 (aux losses at their defaults). The figure the issue asks for is
MoPE's peak over LoRA's (goal: at most 1.15x).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from step_time import REPO_ROOT, current_rss_mb, load_average, machine, peak_rss_mb, reset_peak_rss

import mope

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, batch, sequence
    "full": (1024, 2816, 4, 16, 4, 8192, 4, 256),
    "quick": (64, 128, 2, 4, 2, 128, 2, 16),
}
CANDIDATES = ("frozen_4bit_base", "peft_lora_r16", "mope_top2_of_8")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOAL = 1.15


def save_base(shape: tuple[int, ...], folder: Path) -> None:
    hidden, inter, layers, heads, kv, vocab, _, seq = shape
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=seq,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


def attach(name: str, folder: Path):
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map="cpu")
    base = prepare_model_for_kbit_training(base, gradient_checkpointing_kwargs={"use_reentrant": False})
    if name == "frozen_4bit_base":
        return base
    if name == "peft_lora_r16":
        config = LoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, r=16, lora_alpha=32)
    else:
        config = mope.MoPEConfig(task_type="CAUSAL_LM", target_modules=TARGETS, num_experts=8, top_k=2, r=8)
    return get_peft_model(base, config)


def child(name: str, folder: Path, shape: tuple[int, ...]) -> None:
    """In a fresh process: one candidate, two AdamW steps, its memory printed as one JSON line."""
    torch.set_num_threads(1)
    model = attach(name, folder)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    *_, vocab, batch, seq = shape
    ids = torch.randint(1, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    gc.collect()
    reset = reset_peak_rss()
    before = current_rss_mb()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
    print(
        json.dumps(
            {
                "peak_mb": peak_rss_mb(),
                "rise_mb": peak_rss_mb() - before,
                "trainable": sum(p.numel() for p in trainable),
                "peak_reset": reset,
            }
        )
    )


def measure(shape_name: str) -> dict[str, dict]:
    shape = SHAPES[shape_name]
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        folder = Path(workdir) / "llama"
        save_base(shape, folder)
        for name in CANDIDATES:  # one at a time: the machine's memory is shared
            done = subprocess.run(
                [sys.executable, __file__, "--child", name, "--folder", str(folder), "--shape", shape_name],
                capture_output=True,
                text=True,
                cwd=REPO_ROOT,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed: {done.stderr.strip().splitlines()[-1:]}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def markdown(results: dict[str, dict], shape_name: str, info: dict, load: list[float]) -> str:
    hidden, inter, layers, heads, kv, vocab, batch, seq = SHAPES[shape_name]
    lora = results["peft_lora_r16"]
    lines = [
        "# Peak memory of a 4-bit (QLoRA-style) training step, CPU",
        "",
        f"Llama from a config: hidden {hidden}, intermediate {inter}, {layers} layers, {heads} heads ({kv} kv), "
        f"vocab {vocab}; batch {batch} x {seq} tokens; bitsandbytes nf4 + double quant, fp32 compute; "
        "prepare_model_for_kbit_training with non-reentrant gradient checkpointing; adapters on every linear but "
        "the head; two AdamW steps per process (see the script's docstring).",
        "",
        f"Load average at start: {load}.",
        "",
        *(f"- {key}: {value}" for key, value in info.items()),
        "",
        "| candidate | trainable params | peak MB | rise MB | peak vs LoRA r=16 | rise vs LoRA r=16 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in results.items():
        lines.append(
            f"| {name} | {row['trainable']:,} | {row['peak_mb']:.1f} | {row['rise_mb']:.1f} | "
            f"{row['peak_mb'] / lora['peak_mb']:.3f}x | {row['rise_mb'] / lora['rise_mb']:.3f}x |"
        )
    ratio = results["mope_top2_of_8"]["peak_mb"] / lora["peak_mb"]
    verdict = "within" if ratio <= GOAL else "over"
    lines += ["", f"MoPE top-2 of 8 peaks at {ratio:.3f}x LoRA r=16: {verdict} the {GOAL}x goal.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, not a measurement")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "quantized_memory_cpu")
    parser.add_argument("--child", choices=CANDIDATES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="full", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, SHAPES[args.shape])
        return
    shape_name = "quick" if args.quick else "full"
    load = load_average()
    results = measure(shape_name)
    info = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": info, "shape": shape_name, "results": results}))
    args.out.with_suffix(".md").write_text(markdown(results, shape_name, info, load))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
