"""Where a mixture pays: the pre-registered multi-domain study (issue 18; docs/when_to_use_a_mixture.md).

Run from the repository root (offline; hours of CPU in all, see the docs page; alone on the machine):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/multidomain_study.py --list        # methods, ranks, grid, seeds
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/multidomain_study.py               # the whole study
    ... multidomain_study.py --methods "lora equal params" --lrs 0.002 --seeds 0   # a part of it
    ... --workers 15 --model DIR --data FILE   # 15 runs at once (see study_on_device.sh multidomain)
    ... multidomain_study.py --plot --name multidomain_study_h100   # table + domain x expert plot from a log

The task is the union of three domains in one label space (``mope.training.multidomain``: stdlib
docstrings -> package family, fortunes -> fortune file, man pages -> section); the model sees the
text only. Every method starts from the head of a linear probe trained first at its learning rate
and seed (protocol 2, LP-FT: from a random 47-way head the first runs sat at chance; the docs
page's "Amendment"), then trains the real MiniLM with the demo recipes' protocol (their ``training``
section: 3 epochs, batch 32, AdamW, linear schedule, 10 warm-up steps, max length 64, router
learning rate scale as each method states), at each learning rate of ``GRID`` at seed 0, then at
the rate seed 0 found best with the other seeds of ``SEEDS`` (amendment 2). The ranks are computed from the model: the LoRA with the dense demo mixture's trainable
parameters (routers and head counted) has rank R; the top-2 mixture "at equal active compute" has
experts of rank R/2 (k*r = R), and its LoRA twins have ranks k*r and N*r.

All runs use the training loop below, not ``mope.train``: per-domain accuracy, task-id routing
(``mope_task_ids``) and the composition methods need each example's domain, which the recipe loop's
batches do not carry, and one loop for every method keeps the comparison equal. It uses the
recipe loop's parts (``build_model``, ``wrap``, ``Collator``, ``parameter_groups``).

Composition (one job per learning rate and seed) starts from the linear probe (the head every method
starts from, trained on the union with the encoder frozen; its row is "head only"); with that head
frozen, one PEFT LoRA per domain (rank ``round(R / 3)``, so the three hold about R ranks) trains on
its domain; then the three are combined by ``mope.from_lora_adapters`` with Arrow (no training),
with a learned top-2 router trained one epoch on the union (experts and head frozen), by PEFT's
``create_arrow_model`` (top-2), by PEFT's ``add_weighted_adapter`` (weights 1/3, ``cat``: the exact
mean of the three updates), and by the oracle that picks each example's own domain LoRA. The three
LoRAs are kept beside the probe (``<name>_probes/<id>.loras/``; ``arrow_prototypes.py`` reads them).

Results are appended one line per run to ``benchmarks/results/multidomain_study_cpu.jsonl``
(``_h100`` where a GPU trains; ``--name`` sets the stem); a (settings, method, learning rate, seed)
already there under this ``PROTOCOL`` is skipped, so the study can be stopped and continued.
``multidomain_study_cpu.md`` is rewritten from all lines of this protocol: per method its best
learning rate (by seed 0's macro accuracy, amendment 2; the held-out split is the only one, as in the
defaults study), accuracy per domain and the macro average over domains (the headline), the domains'
separation in expert load (mixtures; ``mope.analysis.separation``), trainable parameters, adapter
FLOPs per token and training time. ``--plot`` draws the best learned mixture's domain x expert load
into ``multidomain_domain_expert_cpu.png`` (the log's machine).
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import functools
import hashlib
import json
import math
import multiprocessing
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from defaults_study import read_runs
from step_time import machine_tag
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from transformers import get_scheduler

from mope.analysis import load_separation
from mope.demo import RECIPES, trainable
from mope.training import multidomain, quiet_third_party
from mope.training.data import Collator
from mope.training.loop import parameter_groups
from mope.training.models import build_model, load_tokenizer, wrap
from mope.training.recipe import ModelSection, Recipe, load_recipe

# 1: every method from a randomly initialised head (its first runs sat at chance: the docs page's
# "Amendment"); 2: every method from the same linear-probe head of its learning rate and seed (LP-FT).
PROTOCOL = 2
SEEDS = (0, 1, 2)
GRID = (0.001, 0.002, 0.003, 0.005)  # every method's learning-rate grid (the defaults study's range)
# Amendment 2 (before any run of seeds 1 and 2): a method's learning rate is the best of the grid at
# this seed; the other seeds run at that rate only (the docs page's "Amendment 2").
SELECTION_SEED = 0
TASK = "sequence_classification"
# The top-2 knobs the defaults study found best: alpha 16 for r=2 (scale 8), routers at a tenth of the rate.
TOP2 = ["adapter.config.router=top_k", "adapter.config.top_k=2", "training.router_lr_scale=0.1"]
# routed by the domain id it is given: the upper bound of separation, not a router that learned it
TASK_LEVEL = "mope top-2 of 8 task-level (domain id)"
DOMAIN_ID = "domain_id"  # the column of domain indices the task-level run reads (data.task_column)
COMPOSITION = (
    "head only (linear probe)",
    "compose: mope Arrow (no training)",
    "compose: mope router trained (experts frozen)",
    "compose: PEFT Arrow",
    "compose: PEFT add_weighted_adapter (mean)",
    "compose: oracle (own domain's LoRA)",
)


@dataclass(frozen=True)
class Ranks:
    """The ranks every method's size follows from, computed from the model (``ranks``)."""

    equal: int  # the LoRA rank whose trainable parameters match the dense demo mixture's
    top2: int  # expert rank of top-2 of 8 at the equal LoRA's active compute: 2 * top2 = equal
    domain: int  # rank of each per-domain LoRA of the composition methods: three hold ~equal ranks


def trained_methods(r: Ranks) -> dict[str, tuple[str, list[str]]]:
    """Methods that train one adapter on the union: name -> (demo recipe, overrides)."""
    top2 = [*TOP2, "adapter.config.r=2", "adapter.config.lora_alpha=16"]
    return {
        "lora equal params": ("lora", lora(r.equal)),
        "lora equal active compute (r = k*r of top-2 r=2)": ("lora", lora(2 * 2)),
        "lora params of top-2 equal compute (r = N*r)": ("lora", lora(8 * r.top2)),
        "mope dense 8 (demo defaults)": ("mope", []),
        "mope top-2 of 8 equal params": ("mope", top2),
        "mope top-2 of 8 equal active compute": (
            "mope",
            [*TOP2, f"adapter.config.r={r.top2}", f"adapter.config.lora_alpha={8 * r.top2}"],
        ),
        "mope top-2 of 8 sequence-level": ("mope", [*top2, "adapter.config.routing_level=sequence"]),
        "mope top-2 of 7 + 1 shared": ("mope", [*top2, "adapter.config.num_shared_experts=1"]),
        TASK_LEVEL: (
            "mope",
            [
                *top2,
                "adapter.config.routing_level=task",
                f"adapter.config.num_tasks={len(multidomain.DOMAINS)}",
                f"data.task_column={DOMAIN_ID}",
            ],
        ),
    }


def lora(rank: int) -> list[str]:
    return [f"adapter.config.r={rank}", f"adapter.config.lora_alpha={2 * rank}"]


def method_names() -> list[str]:
    return [*trained_methods(Ranks(1, 1, 1)), *COMPOSITION]


@functools.cache
def ranks(settings: tuple[str, ...], num_labels: int) -> Ranks:
    """:class:`Ranks` from the trainable parameters of the models the recipes build (as the demo matches them)."""
    target = trainable(RECIPES["mope"], list(settings), num_labels)
    one, two = (trainable(RECIPES["lora"], [*settings, *lora(r)], num_labels) for r in (1, 2))
    per_rank = two - one
    equal = max(2, round((target - (one - per_rank)) / per_rank))
    return Ranks(equal=equal, top2=max(1, equal // 2), domain=max(1, round(equal / 3)))


# --- one run ------------------------------------------------------------------------------------------


@functools.cache
def read_data(path: str) -> dict:
    return multidomain.read(path)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batches(rows: list[dict], collate: Callable, size: int, seed: int | None = None) -> DataLoader:
    """Batches of ``rows``; shuffled by its own seeded generator when ``seed`` is given."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(rows, batch_size=size, shuffle=seed is not None, collate_fn=collate, generator=generator)


def on_device(batch: dict) -> dict:
    return {k: v.to(device()) for k, v in batch.items()}


@functools.cache
def tokenizer(location: str):
    """The tokenizer, loaded once per process (every model of a job uses the same)."""
    return load_tokenizer(ModelSection(name_or_path=location))


def collator(recipe: Recipe, labels: list[str]) -> Callable[[list[dict]], dict]:
    """The recipe loop's collator; for task-level routing each row gets its domain's index, which the recipe's
    ``data.task_column`` gives the model as ``mope_task_ids``."""
    collate = Collator(tokenizer(recipe.model.tokenizer or recipe.model.name_or_path), recipe.data, TASK, labels)

    def call(rows: list[dict]) -> dict:
        if recipe.data.task_column is not None:
            rows = [{**r, DOMAIN_ID: multidomain.DOMAINS.index(r["domain"])} for r in rows]
        return collate(rows)

    return call


def train(model, recipe: Recipe, rows: list[dict], collate: Callable, epochs: float | None = None) -> float:
    """The recipe's schedule on ``rows`` (``epochs`` overrides its length); returns the seconds it took."""
    t = recipe.training
    loader = batches(rows, collate, t.batch_size, t.seed)
    total = t.max_steps if t.max_steps and not epochs else math.ceil((epochs or t.epochs) * len(loader))
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe))
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    started, step = time.perf_counter(), 0
    while step < total:
        for batch in loader:
            loss = model(**on_device(batch)).loss
            if not torch.isfinite(loss):
                raise RuntimeError(f"the loss was {loss.item()} at step {step}: the run diverged")
            loss.backward()
            if t.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step == total:
                break
    return time.perf_counter() - started


@torch.no_grad()
def accuracy(model, rows: list[dict], collate: Callable, size: int) -> dict[str, float]:
    """Accuracy per domain of ``rows``."""
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        batch = on_device(collate(chunk))
        predicted = model(**batch).logits.argmax(-1).tolist()
        for row, guess, label in zip(chunk, predicted, batch["labels"].tolist(), strict=True):
            hits[row["domain"]].append(guess == label)
    return {domain: sum(h) / len(h) for domain, h in hits.items()}


@torch.no_grad()
def flops_per_token(model, rows: list[dict], collate: Callable) -> float:
    """Forward FLOPs per token, counted by torch on each of ``rows`` alone (no padding).

    MoPE banks are switched to the ``sorted`` dispatch first, which computes only the experts a
    token uses: the count is then the active compute (k*r), not the masked form's N*r.
    """
    from mope import set_dispatch

    set_dispatch(model, "sorted")
    model.eval()
    flops = tokens = 0
    for row in rows:
        batch = on_device(collate([row]))
        with FlopCounterMode(display=False) as counter:
            model(**batch)
        flops += counter.get_total_flops()
        tokens += int(batch["attention_mask"].sum())
    return flops / tokens


@torch.no_grad()
def domain_load(model, rows: list[dict], collate: Callable, size: int) -> dict[str, dict[str, list[float]]]:
    """Per domain and adapted module: each expert's share of dispatch (the domain x expert plot's data).

    Kept per module: expert numbers of different modules are unrelated, so a mean over modules
    could look flat where every module separates the domains (``mope.analysis.separation``).
    """
    from mope.analysis import expert_load

    model.eval()
    load = {}
    for domain in multidomain.DOMAINS:
        mine = [r for r in rows if r["domain"] == domain]
        report = expert_load(model, [on_device(b) for b in batches(mine, collate, size)])
        load[domain] = {module: entry["share"] for module, entry in report.items()}
    return load


def adapter_parameters(model) -> int:
    """Parameters trained for this model: adapters (frozen ones too), routers and the classification head."""
    return sum(p.numel() for n, p in model.named_parameters() if any(s in n for s in ("lora_", "mope_", "classifier")))


class Job:
    """What every run of one (learning rate, seed) shares: data, recipe, base model FLOPs."""

    def __init__(self, data_path: str, settings: tuple[str, ...], lr: float, seed: int, probes: str) -> None:
        data = read_data(data_path)
        with open(data_path, "rb") as handle:
            self.data_digest = hashlib.sha1(handle.read()).hexdigest()
        self.probes = probes  # the folder of linear-probe heads, shared by every job and worker
        self.train_rows, self.eval_rows = data["train"], data["eval"]
        self.labels = sorted({r["label"] for r in self.train_rows + self.eval_rows})
        self.settings, self.lr, self.seed = settings, lr, seed
        self.ranks = ranks(settings, len(self.labels))
        self.frozen_flops: float | None = None
        self.probe_rows = [self.eval_rows[i] for i in range(0, len(self.eval_rows), max(1, len(self.eval_rows) // 12))]

    def recipe(self, name: str, overrides: list[str] = ()) -> Recipe:
        common = [f"training.seed={self.seed}", f"training.learning_rate={self.lr}"]
        return load_recipe(RECIPES[name], [*overrides, *common, *self.settings])

    def base(self, recipe: Recipe):
        torch.manual_seed(self.seed)  # the head's initialisation
        return build_model(recipe.model, len(self.labels), self.seed).to(device())

    def linear_probe(self) -> tuple[dict[str, torch.Tensor], float, dict]:
        """The head trained on the union with the encoder frozen, at this learning rate and seed.

        Returns its weights, its training seconds and its result row ("head only"). Every method
        starts from this head (LP-FT, protocol 2). Trained once per (data, settings, learning rate,
        seed) and kept in ``self.probes``: the first job to need it trains it while holding a lock
        on it, and the others wait for it and load it.
        """
        path = self.kept("pt")
        os.makedirs(self.probes, exist_ok=True)
        with open(f"{path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            if os.path.exists(path):
                saved = torch.load(path, weights_only=True)
                return saved["head"], saved["seconds"], saved["row"]
            return self.train_linear_probe(path)

    def kept(self, suffix: str) -> str:
        """A path in ``self.probes`` named by this job's (data, settings, learning rate, seed) and ``suffix``."""
        identity = json.dumps([self.data_digest, list(self.settings), self.lr, self.seed])
        return os.path.join(self.probes, f"{hashlib.sha1(identity.encode()).hexdigest()[:20]}.{suffix}")

    def train_linear_probe(self, path: str) -> tuple[dict[str, torch.Tensor], float, dict]:
        """:meth:`linear_probe`'s training, saved atomically at ``path``."""
        recipe = self.recipe("lora")
        collate = collator(recipe, self.labels)
        base = self.base(recipe)
        for name, p in base.named_parameters():
            p.requires_grad = name.startswith("classifier")
        seconds = train(base, recipe, self.train_rows, collate)
        row = self.measure(base, recipe, collate, seconds, adapter_parameters(base), False)
        head = {k: v.detach().cpu().clone() for k, v in base.classifier.state_dict().items()}
        partial = f"{path}.{os.getpid()}.partial"
        torch.save({"head": head, "seconds": seconds, "row": row}, partial)
        os.replace(partial, path)
        return head, seconds, row

    def start(self, recipe: Recipe):
        """The base model carrying the linear probe's head, the probe's training seconds and its row."""
        head, seconds, row = self.linear_probe()
        base = self.base(recipe)  # seeds the RNG as before: the adapters' initialisation is unchanged
        base.classifier.load_state_dict(head)
        return base, seconds, row

    def measure(self, model, recipe: Recipe, collate: Callable, seconds: float, trained: int, mope: bool) -> dict:
        size = recipe.training.eval_batch_size
        by_domain = accuracy(model, self.eval_rows, collate, size)
        row = {
            "accuracy": by_domain,
            "macro_accuracy": statistics.mean(by_domain.values()),
            "trainable_parameters": trained,
            "train_seconds": round(seconds, 2),
            "domain_load": domain_load(model, self.eval_rows, collate, size) if mope else None,
        }
        row["adapter_flops_per_token"] = flops_per_token(model, self.probe_rows, collate) - self.base_flops(recipe)
        return row

    def base_flops(self, recipe: Recipe) -> float:
        """The frozen model's forward FLOPs per token (counted once per job)."""
        if self.frozen_flops is None:
            collate = collator(recipe, self.labels)  # the frozen base takes no task ids
            frozen = lambda rows: {k: v for k, v in collate(rows).items() if k != "mope_task_ids"}  # noqa: E731
            self.frozen_flops = flops_per_token(self.base(recipe), self.probe_rows, frozen)
        return self.frozen_flops

    def trained(self, method: str) -> dict:
        name, overrides = trained_methods(self.ranks)[method]
        recipe = self.recipe(name, overrides)
        collate = collator(recipe, self.labels)
        base, probe_seconds, _ = self.start(recipe)
        model = wrap(base, recipe.adapter, TASK)
        seconds = probe_seconds + train(model, recipe, self.train_rows, collate)
        trained = model.get_nb_trainable_parameters()[0]
        return self.measure(model, recipe, collate, seconds, trained, name == "mope")

    def composition(self) -> dict[str, dict]:
        """Every COMPOSITION row of this learning rate and seed, from one probe and three per-domain LoRAs."""
        from peft import ArrowConfig, LoraConfig, PeftModel, create_arrow_model, get_peft_model

        from mope import MoPEConfig, from_lora_adapters

        recipe = self.recipe("lora")
        collate = collator(recipe, self.labels)
        base, probe_seconds, probe_row = self.start(recipe)
        rows = {COMPOSITION[0]: probe_row}
        base.requires_grad_(False)
        folder = self.kept("loras")  # kept beside the probe: benchmarks/arrow_prototypes.py reads them
        # the encoder's linear layers (not the head): what all-linear adapts for a classification task
        targets = r".*\.(query|key|value|dense)$"
        paths, seconds = [], probe_seconds
        for domain in multidomain.DOMAINS:
            config = LoraConfig(r=self.ranks.domain, lora_alpha=2 * self.ranks.domain, target_modules=targets)
            model = get_peft_model(copy.deepcopy(base), config)
            seconds += train(model, recipe, [r for r in self.train_rows if r["domain"] == domain], collate)
            paths.append(os.path.join(folder, domain))
            model.save_pretrained(paths[-1])
        # the head and the three LoRAs (each as large as the last one trained)
        loras = adapter_parameters(base) + len(paths) * sum(
            p.numel() for n, p in model.named_parameters() if "lora_" in n
        )

        arrow = from_lora_adapters(copy.deepcopy(base), paths)
        rows[COMPOSITION[1]] = self.measure(arrow, recipe, collate, seconds, loras, True)

        routed = from_lora_adapters(copy.deepcopy(base), paths, MoPEConfig(router="top_k", top_k=2))
        router_recipe = self.recipe("mope", ["training.router_lr_scale=1"])
        router_seconds = train(routed, router_recipe, self.train_rows, collate, epochs=1)
        total = adapter_parameters(routed)
        rows[COMPOSITION[2]] = self.measure(routed, recipe, collate, seconds + router_seconds, total, True)

        peft_arrow = create_arrow_model(copy.deepcopy(base), paths, ArrowConfig(top_k=2, rng_seed=self.seed))
        rows[COMPOSITION[3]] = self.measure(peft_arrow, recipe, collate, seconds, loras, False)

        several = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name=multidomain.DOMAINS[0])
        for domain, path in zip(multidomain.DOMAINS[1:], paths[1:], strict=True):
            several.load_adapter(path, adapter_name=domain)
        several.add_weighted_adapter(list(multidomain.DOMAINS), [1 / len(paths)] * len(paths), "mean", "cat")
        several.set_adapter("mean")
        rows[COMPOSITION[4]] = self.measure(several, recipe, collate, seconds, loras, False)
        rows[COMPOSITION[5]] = self.oracle(several, recipe, collate, seconds, loras)
        return rows

    def oracle(self, model, recipe: Recipe, collate: Callable, seconds: float, trained: int) -> dict:
        """Each domain's rows through that domain's own LoRA (the domain picked by hand)."""
        size = recipe.training.eval_batch_size
        by_domain, flops = {}, []
        for domain in multidomain.DOMAINS:
            model.set_adapter(domain)
            mine = [r for r in self.eval_rows if r["domain"] == domain]
            by_domain |= accuracy(model, mine, collate, size)
            flops.append(flops_per_token(model, self.probe_rows, collate) - self.base_flops(recipe))
        return {
            "accuracy": by_domain,
            "macro_accuracy": statistics.mean(by_domain.values()),
            "trainable_parameters": trained,
            "train_seconds": round(seconds, 2),
            "domain_load": None,
            "adapter_flops_per_token": statistics.mean(flops),
        }


def run_job(job: tuple[int, tuple]) -> tuple[int, dict[str, dict] | None, str | None]:
    """One job in a worker process: ``(index, {method: result}, None)`` or ``(index, None, the error)``."""
    index, (data_path, settings, method, lr, seed, threads, probes) = job
    torch.set_num_threads(threads)
    try:
        work = Job(data_path, settings, lr, seed, probes)
        results = work.composition() if method in COMPOSITION else {method: work.trained(method)}
        return index, {m: {**r, "ranks": work.ranks.__dict__} for m, r in results.items()}, None
    except Exception as error:
        return index, None, repr(error)


# --- the log and the table ---------------------------------------------------------------------------


def current_runs(log: str) -> list[dict]:
    """The runs of ``log`` made under this :data:`PROTOCOL` (a line without the field was protocol 1)."""
    return [run for run in read_runs(log) if run.get("protocol", 1) == PROTOCOL]


def key(row: dict) -> tuple:
    """What identifies a run: global settings, method, learning rate, seed."""
    return (tuple(row.get("settings", [])), row["method"], row["learning_rate"], row["seed"])


def best_rows(runs: list[dict]) -> list[tuple[str, float, list[dict]]]:
    """Per (settings, method): its learning rate (:func:`selected_rates`, amendment 2) and the runs at it.

    A method without a seed-0 run at every rate of the grid yet shows its best seed-0 rate so far (a
    log without seed-0 runs, its best mean over seeds).
    """
    groups: dict[tuple[str, str, float], list[dict]] = defaultdict(list)
    for run in runs:
        groups[(" ".join(run.get("settings", [])), run["method"], run["learning_rate"])].append(run)

    def score(group: list[dict]) -> tuple[bool, float]:
        chosen = [r["macro_accuracy"] for r in group if r["seed"] == SELECTION_SEED]
        return bool(chosen), chosen[0] if chosen else statistics.mean(r["macro_accuracy"] for r in group)

    best: dict[tuple[str, str], tuple[float, list[dict]]] = {}
    for (settings, method, lr), group in groups.items():
        if (settings, method) not in best or score(group) > score(best[(settings, method)][1]):
            best[(settings, method)] = (lr, group)
    order = {name: i for i, name in enumerate(method_names())}
    return [
        (method, lr, group)
        for (_, method), (lr, group) in sorted(best.items(), key=lambda i: (i[0][0], order[i[0][1]]))
    ]


def selected_rates(runs: list[dict], settings: tuple[str, ...]) -> dict[str, float]:
    """Method -> the learning rate of its best seed-0 run, for the methods run at seed 0 at every rate of the grid."""
    seed0: dict[str, dict[float, float]] = defaultdict(dict)
    for run in runs:
        if tuple(run.get("settings", [])) == settings and run["seed"] == SELECTION_SEED:
            seed0[run["method"]][run["learning_rate"]] = run["macro_accuracy"]
    return {method: max(scores, key=scores.__getitem__) for method, scores in seed0.items() if set(GRID) <= set(scores)}


def write_table(runs: list[dict], path: str) -> str:
    machines = sorted({f"{r['machine']} ({r['workers']} runs at once)" for r in runs if r.get("machine")})
    versions = sorted({json.dumps(r["data_versions"], sort_keys=True) for r in runs if r.get("data_versions")})
    domains = multidomain.DOMAINS
    lines = [
        "# Multi-domain study (MiniLM; stdlib docstrings + fortunes + man pages, one label space)",
        "",
        f"Written by benchmarks/multidomain_study.py from {os.path.basename(path)[:-3]}.jsonl (one line per run). "
        "Per method its learning rate: the best of the grid by seed 0's macro accuracy (mean over the domains' "
        "accuracies; amendment 2), at which the other seeds run; macro and per-domain accuracy are the mean over the "
        "seeds at that rate. `adapter FLOPs/token`: forward FLOPs per "
        "token beyond the frozen model's, counted by torch with only the used experts computed. `domain separation` "
        "(mixtures): per module, the mean total-variation distance between the domains' expert loads on the "
        "held-out data (0: routing ignores the domain, 1: disjoint experts), averaged over modules, then over seeds.",
        "",
        *([f"Machines: {'; '.join(machines)}."] if machines else []),
        *([f"Data: {'; '.join(versions)}."] if versions else []),
    ]
    rates: dict[tuple, set[float]] = defaultdict(set)  # per (settings, method): the rates run at seed 0
    for run in runs:
        if run["seed"] == SELECTION_SEED:
            rates[(tuple(run.get("settings", [])), run["method"])].add(run["learning_rate"])
    rows = best_rows(runs)
    if any(len(rates[(tuple(g[0].get("settings", [])), m)]) < len(GRID) or len(g) < len(SEEDS) for m, _, g in rows):
        lines += [
            "",
            f"**Incomplete: not the study's result.** A method is complete when seed 0 has run all {len(GRID)} "
            f"learning rates of the grid (`seed-0 rates`) and its selected rate has all {len(SEEDS)} seeds (`seeds`). "
            "Until then its rate is the best seed-0 rate so far and its mean covers only the seeds run.",
        ]
    header = [
        f"| method | best lr | seeds | macro (mean) | min | max | {' | '.join(domains)} | domain separation | "
        f"trainable | adapter FLOPs/token | train s (mean) | seed-0 rates of {len(GRID)} |",
        "|---|---|---|---|---|---|" + "---|" * len(domains) + "---|---|---|---|---|",
    ]
    settings = None
    for method, lr, group in rows:
        if group[0].get("settings", []) != settings:
            settings = group[0].get("settings", [])
            lines += ["", f"Settings for every run below: `{' '.join(settings) or 'none'}`.", "", *header]
        macro = [r["macro_accuracy"] for r in group]
        per_domain = " | ".join(f"{statistics.mean(r['accuracy'][d] for r in group):.4f}" for d in domains)
        lines.append(
            f"| {method} | {lr:g} | {len(group)} | {statistics.mean(macro):.4f} | {min(macro):.4f} | "
            f"{max(macro):.4f} | {per_domain} | {separation(group)} | {group[0]['trainable_parameters']:,} | "
            f"{group[0]['adapter_flops_per_token']:,.0f} | {statistics.mean(r['train_seconds'] for r in group):.1f} | "
            f"{len(rates[(tuple(settings), method)])} |"
        )
    text = "\n".join(lines) + "\n"
    with open(path, "w") as handle:
        handle.write(text)
    return text


def separation(group: list[dict]) -> str:
    """The mean over seeds of each run's :func:`mope.analysis.load_separation` ("-" without expert loads).

    Each seed's separation is computed from its own loads: expert numbers mean nothing across seeds.
    """
    if not all(r.get("domain_load") for r in group):
        return "-"
    return f"{statistics.mean(load_separation(r['domain_load']) for r in group):.3f}"


def plotted_run(runs: list[dict], method: str | None = None) -> dict:
    """The run the domain x expert plot shows: the lowest seed of the best mixture that learned its routing.

    Best: the highest mean macro accuracy at its best learning rate, over the methods with expert
    loads except the task-level one (given the domain id). One seed, not a mean: expert numbers
    differ between seeds, so a mean of their loads would blur the separation it is meant to show.
    ``method``: that mixture's run instead (its lowest seed at its best learning rate).
    """
    mixtures = [
        (name, group)
        for name, _, group in best_rows(runs)
        if (name == method if method else name != TASK_LEVEL) and all(r.get("domain_load") for r in group)
    ]
    if not mixtures:
        which = f"of {method!r} " if method else ""
        raise ValueError(f"no mixture run {which}with expert loads (domain_load) in the log: run a MoPE method first")
    _, group = max(mixtures, key=lambda m: statistics.mean(r["macro_accuracy"] for r in m[1]))
    return min(group, key=lambda r: r["seed"])


def write_plot(runs: list[dict], path: str, method: str | None = None) -> dict:
    """The domain x expert load plot of :func:`plotted_run` as a PNG at ``path``; returns that run."""
    from mope.analysis.plots import domain_expert_load

    run = plotted_run(runs, method)
    seeds = sum(1 for r in runs if key(r)[:3] == key(run)[:3])
    chosen = "chosen by --plot-method" if method else "best mixture by macro accuracy"
    title = (
        f"{run['method']}: lr {run['learning_rate']:g}, seed {run['seed']} of {seeds} "
        f"({chosen}; settings: {' '.join(run.get('settings', [])) or 'none'})"
    )
    domain_expert_load(run["domain_load"], title=title).savefig(path, dpi=120)
    return run


def plot_name(name: str, method: str | None = None) -> str:
    """The plot's file name for the log ``name``: multidomain_study_h100 -> multidomain_domain_expert_h100.png.

    A ``method`` chosen by ``--plot-method`` adds its name: ..._h100_mope-top-2-of-8-equal-params.png.
    """
    stem = name.replace("multidomain_study", "multidomain_domain_expert", 1)
    stem = stem if name.startswith("multidomain_study") else f"{name}_domain_expert"
    suffix = "_" + "-".join(re.findall(r"[a-z0-9]+", method.lower())) if method else ""
    return f"{stem}{suffix}.png"


def plan(methods: list[str], lrs: list[float], seeds: list[int], settings: tuple[str, ...], runs: list[dict]) -> list:
    """``(method, lr, seed)`` per job not in ``runs`` (the log); one job makes every COMPOSITION row. Seeds outermost.

    Seed 0 runs every rate of ``lrs``; another seed runs a method only at the rate seed 0 selected
    (:func:`selected_rates`), so not before seed 0 has the whole grid for it (amendment 2). The
    composition job of such a seed runs at each rate a composition method selected.
    """
    done = {key(r) for r in runs}
    selected = selected_rates(runs, settings)
    jobs = []
    for seed in seeds:
        for lr in lrs:
            wanted = [m for m in methods if seed == SELECTION_SEED or selected.get(m) == lr]
            for method in [m for m in wanted if m not in COMPOSITION]:
                if (settings, method, lr, seed) not in done:
                    jobs.append((method, lr, seed))
            composed = [m for m in wanted if m in COMPOSITION]
            if composed and any((settings, m, lr, seed) not in done for m in composed):
                jobs.append((COMPOSITION[0], lr, seed))
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=method_names(), choices=method_names(), metavar="NAME")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(GRID), choices=GRID, metavar="LR")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), choices=SEEDS, metavar="SEED")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every run (recorded)")
    parser.add_argument("--model", help="model.name_or_path for every run (recorded), e.g. a local copy of MiniLM")
    parser.add_argument(
        "--data", help="the union as python -m mope.training.multidomain --out wrote it (default: build)"
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", help="stem of the .jsonl and .md in --out (default multidomain_study_cpu, _h100 ...)")
    parser.add_argument("--threads", type=int, help="CPU threads per run (default: all cores / workers)")
    parser.add_argument("--workers", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--list", action="store_true", help="print the methods, their overrides and the grid; exit")
    parser.add_argument(
        "--plot",
        action="store_true",
        help="from the log alone (nothing runs): rewrite the table and draw the best mixture's domain x expert "
        "load plot (multidomain_domain_expert_<machine>.png in --out); exit",
    )
    parser.add_argument(
        "--plot-method",
        choices=[m for m in method_names() if m.startswith("mope ") or m.startswith("compose: mope")],
        metavar="NAME",
        help="with --plot: draw this mixture's plot instead of the best one's (its name is added to the file's)",
    )
    parser.add_argument(
        "--table", action="store_true", help="from the log alone (nothing runs): rewrite the table only; exit"
    )
    args = parser.parse_args()
    quiet_third_party()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.name = args.name or f"multidomain_study_{machine_tag()}"
    log = os.path.join(args.out, f"{args.name}.jsonl")
    if args.plot_method and not args.plot:
        parser.error("--plot-method: only with --plot")
    if args.plot or args.table:
        runs = current_runs(log)
        option = "--plot" if args.plot else "--table"
        if not runs:
            parser.error(f"{option}: no runs in {log}; pass the --out and --name the study wrote")
        try:
            if args.plot:
                write_plot(runs, os.path.join(args.out, plot_name(args.name, args.plot_method)), args.plot_method)
        except ValueError as error:
            parser.error(f"--plot: {error} ({log})")
        print(write_table(runs, os.path.join(args.out, f"{args.name}.md")), flush=True)
        return
    settings = tuple([*args.set, *([f"model.name_or_path={args.model}"] if args.model else [])])
    data_path = args.data or os.path.join(tempfile.mkdtemp(prefix="mope-multidomain-"), "data.json")
    data = multidomain.read(data_path) if args.data else multidomain.write(data_path)
    if args.list:
        labels = {r["label"] for r in data["train"] + data["eval"]}
        found = ranks(settings, len(labels))
        for name, (recipe, overrides) in trained_methods(found).items():
            print(f"{name!r}: {recipe} {' '.join(overrides)}")
        print(f"composition, one job per lr and seed: {', '.join(map(repr, COMPOSITION))}")
        print(f"{found} ({len(labels)} labels); learning rates {GRID}; seeds {SEEDS}; data {data['sizes']}")
        return
    os.makedirs(args.out, exist_ok=True)
    versions = data["versions"]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()

    def record(method: str, lr: float, seed: int, result: dict) -> None:
        row = {"settings": list(settings), "method": method, "learning_rate": lr, "seed": seed, **result}
        row["protocol"] = PROTOCOL
        row |= {"machine": machine, "workers": args.workers, "data_versions": versions}
        with open(log, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    # `kill PID` (SIGTERM) then leaves the pool's block, whose exit terminates the workers too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    probes = os.path.join(args.out, f"{args.name}_probes")  # linear-probe heads (not results: git ignores them)
    jobs = plan(args.methods, args.lrs, args.seeds, settings, current_runs(log))
    with multiprocessing.get_context("spawn").Pool(args.workers, initializer=quiet_third_party) as pool:
        while jobs:  # seed 0's results unlock the other seeds' jobs (amendment 2): plan again until none is left
            work = [(data_path, settings, method, lr, seed, threads, probes) for method, lr, seed in jobs]
            for index, results, error in pool.imap_unordered(run_job, enumerate(work)):
                method, lr, seed = jobs[index]
                if error is not None:  # one failed run is reported; the rest of the study goes on
                    print(f"FAILED {method} lr {lr:g} seed {seed}: {error}", flush=True)
                    continue
                for name, result in results.items():
                    if name in args.methods and (settings, name, lr, seed) not in {key(r) for r in current_runs(log)}:
                        record(name, lr, seed, result)
                        print(f"{name} lr {lr:g} seed {seed}: macro {result['macro_accuracy']:.4f}", flush=True)
            jobs, planned = plan(args.methods, args.lrs, args.seeds, settings, current_runs(log)), jobs
            if jobs == planned:  # only failed jobs are left: reported above, not retried in a loop
                break
    print(write_table(current_runs(log), os.path.join(args.out, f"{args.name}.md")), flush=True)


if __name__ == "__main__":
    main()
