"""Why Arrow routes as it does in the multi-domain study: its prototypes against each domain's inputs.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/arrow_prototypes.py --data /tmp/s/data.json --lr 0.005 --seed 0

Arrow (Ostapenko et al. 2024; ``mope.from_lora_adapters``, PEFT's ``create_arrow_model``) routes a
token x to the experts whose prototype v (the top right singular vector of the LoRA's update B A)
has the largest |<v, x>|. For the three per-domain LoRAs a composition job of
``multidomain_study.py`` trained at that learning rate and seed (kept beside its probe, or
``--loras FOLDER`` holding ``stdlib/``, ``fortunes/``, ``man/``), this prints per input domain: the
share of top-2 choices each LoRA gets, the mean |cos(v, x)|, and per LoRA the |cos| between its
prototype and the mean input and the size of its update; means over the adapted modules. Inputs
are the frozen encoder's (first-order: the LoRAs' own effect on later layers is left out), on the
first ``--rows`` held-out examples of each domain, padding excluded.

It also compares the prototypes with PEFT's (``create_arrow_model``): PEFT finds each one by 15
steps of power iteration from a start vector seeded by ``ArrowConfig.rng_seed`` (the study passes
the seed), mope by an exact SVD; where an update's two largest singular values are close, 15 steps
do not converge, and the two Arrows route some tokens differently.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os

import torch
from multidomain_study import Job, collator
from safetensors.torch import load_file

from mope.training import multidomain, quiet_third_party


def lora_weights(folder: str):
    """``(domain, module name, A, B)`` in float32 for each adapted module of each domain's LoRA, DOMAINS order."""
    for domain in multidomain.DOMAINS:
        weights = load_file(os.path.join(folder, domain, "adapter_model.safetensors"))
        for key, a in weights.items():
            if ".lora_A." in key:
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                yield domain, name, a.float(), weights[key.replace(".lora_A.", ".lora_B.")].float()


def prototypes(folder: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (one prototype per domain LoRA, the updates' Frobenius norms), in DOMAINS order."""
    found: dict[str, list[tuple[torch.Tensor, float]]] = collections.defaultdict(list)
    for _, name, a, b in lora_weights(folder):
        update = b @ a
        found[name].append((torch.linalg.svd(update, full_matrices=False).Vh[0], update.norm().item()))
    return {n: (torch.stack([v for v, _ in p]), torch.tensor([f for _, f in p])) for n, p in found.items()}


def peft_agreement(folder: str, rng_seed: int) -> list[tuple[float, float, str, str]]:
    """Per (module, domain LoRA): |cos| between PEFT's power-iteration prototype and the exact one,
    and the update's second singular value over its first; lowest |cos| first."""
    from types import SimpleNamespace

    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    power = functools.partial(ArrowLoraLinearLayer.top_right_singular_vec_from_BA, SimpleNamespace(rng_seed=rng_seed))
    rows = []
    for domain, name, a, b in lora_weights(folder):
        _, values, vh = torch.linalg.svd(b @ a, full_matrices=False)
        rows.append((abs(float(power(a, b) @ vh[0])), float(values[1] / values[0]), domain, name))
    return sorted(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the union as python -m mope.training.multidomain --out wrote it")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--probes", default="benchmarks/results/multidomain_study_cpu_probes")
    parser.add_argument("--loras", help="the three LoRAs' folder (default: the one the job kept in --probes)")
    parser.add_argument("--rows", type=int, default=120, help="held-out examples per domain")
    args = parser.parse_args()
    quiet_third_party()
    job = Job(args.data, (), args.lr, args.seed, args.probes)
    folder = args.loras or job.kept("loras")
    if not os.path.isdir(folder):
        parser.error(
            f"no LoRAs at {folder}: run the composition job of lr {args.lr:g} seed {args.seed} or pass --loras"
        )
    found = prototypes(folder)
    recipe = job.recipe("lora")
    model, collate = job.base(recipe).eval(), collator(recipe, job.labels, False)
    chosen, cosine = (collections.defaultdict(lambda: torch.zeros(len(multidomain.DOMAINS))) for _ in range(2))
    batches: dict[str, int] = collections.defaultdict(int)  # (module, batch) pairs seen per input domain
    input_sum: dict[str, torch.Tensor] = collections.defaultdict(lambda: 0)
    where = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:
            x = inputs[0][where["mask"]] if inputs[0].dim() == 3 else inputs[0]  # the pooler sees [CLS] only
            scores = (x @ found[name][0].T).abs()
            chosen[where["domain"]] += torch.zeros_like(scores).scatter_(1, scores.topk(2).indices, 1).mean(0) / 2
            cosine[where["domain"]] += (scores / x.norm(dim=-1, keepdim=True)).mean(0)
            batches[where["domain"]] += 1
            input_sum[name] = input_sum[name] + x.sum(0)

        return hook

    for name, module in model.named_modules():
        if name in found:
            module.register_forward_hook(record(name))
    with torch.no_grad():
        for domain in multidomain.DOMAINS:
            rows = [r for r in job.eval_rows if r["domain"] == domain][: args.rows]
            for start in range(0, len(rows), 40):
                batch = collate(rows[start : start + 40])
                where.update(mask=batch["attention_mask"].bool(), domain=domain)
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    print(f"LoRAs {folder} (lr {args.lr:g}, seed {args.seed}); experts in order {multidomain.DOMAINS}")
    print("(per domain: means over modules and batches; an expert chosen for every token has share 0.5)")
    for domain in multidomain.DOMAINS:
        share, cos = chosen[domain] / batches[domain], cosine[domain] / batches[domain]
        print(f"{domain:>8} inputs: top-2 share {fmt(share)}   mean |cos(v, x)| {fmt(cos)}")
    mean_input = torch.stack([(found[n][0] @ (s / s.norm())).abs() for n, s in input_sum.items()]).mean(0)
    print(f"|cos(v, mean input)| per LoRA: {fmt(mean_input)}")
    print(f"||B A||_F per LoRA: {fmt(torch.stack([f for _, f in found.values()]).mean(0))}")
    agreement = peft_agreement(folder, args.seed)
    print(
        f"PEFT's prototypes (15 power-iteration steps, rng_seed {args.seed}) against the exact ones: "
        f"{sum(c < 0.99 for c, *_ in agreement)} of {len(agreement)} with |cos| < 0.99; lowest:"
    )
    for cos, ratio, domain, name in agreement[:3]:
        print(f"  |cos| {cos:.3f}  sigma2/sigma1 {ratio:.3f}  {domain} LoRA, {name}")


def fmt(values: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values.tolist()) + "]"


if __name__ == "__main__":
    main()
