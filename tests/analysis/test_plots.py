"""mope.analysis.plots (mope[plots]): the plots render to PNG; mope.analysis.separation's domain separation."""

from __future__ import annotations

import copy
import re

import pytest
from conftest import repeated_token_batches, routed_llama

from mope.analysis import routing_report, token_choices


def test_plots_render_to_png(tmp_path):
    from mope.analysis.plots import load_heatmap, routing_by_position, token_map

    model = routed_llama(num_experts=4, top_k=2)
    batches = repeated_token_batches(1)
    report = routing_report(model, batches)
    heat = load_heatmap(report)
    assert heat.axes[0].images[0].get_array().shape == (4, 4)
    position = routing_by_position(report)
    assert len(position.axes) == 2
    assert "no drops recorded" in position.axes[0].texts[0].get_text()  # no capacity set
    choices = {name: top1[1] for name, top1 in token_choices(model, batches[0]).items()}
    tokens = [str(i) for i in batches[0]["input_ids"][1].tolist()]
    mapped = token_map(tokens, choices, num_experts=4)
    assert mapped.axes[0].images[0].get_array().shape == (4, 16)
    for i, fig in enumerate((heat, position, mapped)):
        fig.savefig(tmp_path / f"{i}.png")
        assert (tmp_path / f"{i}.png").read_bytes()[:4] == b"\x89PNG"


def test_plots_of_nothing_say_what_is_missing():
    # an empty report (no batch) or an unknown module failed inside matplotlib/numpy ("max() arg is an empty
    # sequence", StopIteration, "need at least one array to stack", KeyError)
    from mope.analysis.plots import load_heatmap, routing_by_position, token_map

    with pytest.raises(ValueError, match="load_heatmap: the report has no module"):
        load_heatmap({})
    with pytest.raises(ValueError, match="routing_by_position: the report has no module"):
        routing_by_position({})
    report = routing_report(routed_llama(num_experts=4, top_k=2), repeated_token_batches(1))
    with pytest.raises(ValueError, match=r"module 'nope' is not in the report: pass one of \['base_model"):
        routing_by_position(report, module="nope")
    with pytest.raises(ValueError, match="token_map needs tokens and the choices of at least one module"):
        token_map([], {})


DOMAINS = ("stdlib", "fortunes", "man")
MODULES = ("base_model.model.layer.0.query", "base_model.model.layer.0.value")


def every_module(load: list[float]) -> dict[str, list[float]]:
    return {m: list(load) for m in MODULES}


def loads_of(*per_domain: list[float]) -> dict[str, dict[str, list[float]]]:
    """The same load in every module, one per domain."""
    return {d: every_module(load) for d, load in zip(DOMAINS, per_domain, strict=True)}


def test_domain_separation_is_zero_for_identical_loads_and_one_for_disjoint_experts():
    from mope.analysis import load_separation, module_separation

    same = loads_of([0.5, 0.25, 0.25, 0], [0.5, 0.25, 0.25, 0], [2, 1, 1, 0])  # counts: divided by their sum
    assert load_separation(same) == 0.0
    disjoint = loads_of([1, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 1])
    assert load_separation(disjoint) == 1.0
    # pairs: TV(a, b) = 0.5, TV(a, c) = 1, TV(b, c) = 1 -> mean 5/6 in the first module; 0 in the second
    mixed = loads_of([0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 1])
    for domain in DOMAINS:
        mixed[domain][MODULES[1]] = [0.25] * 4
    assert module_separation(mixed) == pytest.approx({MODULES[0]: 5 / 6, MODULES[1]: 0.0})
    assert load_separation(mixed) == pytest.approx(5 / 12)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda loads: {"stdlib": loads["stdlib"]}, "at least two domains"),
        (lambda loads: loads | {"man": {MODULES[0]: [1, 0, 0, 0]}}, "domain 'man' has loads for other modules"),
        (lambda loads: loads | {"man": every_module([1, 0, 0])}, "3 experts' loads for domain 'man'"),
        (lambda loads: loads | {"man": every_module([0, 0, 0, 0])}, "for domain 'man' is not a set of shares"),
        (lambda loads: loads | {"man": every_module([1, float("nan"), 0, 0])}, "not a set of shares"),
        (lambda loads: loads | {"man": every_module([1, -1, 1, 0])}, "non-negative"),
        (lambda loads: loads | {"man": {m: "1000" for m in MODULES}}, "is not a set of shares (numbers): '1000'"),
        (lambda loads: loads | {"man": every_module([True, False, False, False])}, "not a set of shares"),
    ],
)
def test_domain_separation_names_the_domain_and_module_of_a_bad_load(change, words):
    from mope.analysis import load_separation
    from mope.analysis.plots import domain_expert_load

    loads = change(loads_of([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]))
    before = copy.deepcopy(loads)
    for function in (load_separation, domain_expert_load):
        with pytest.raises(ValueError, match=re.escape(words)):
            function(loads)
    assert loads == before  # nothing normalised in place


def test_domain_expert_load_plot_draws_the_mean_or_one_module_and_the_separation(tmp_path):
    from mope.analysis.plots import domain_expert_load

    loads = loads_of([1, 0, 0, 0], [0, 2, 2, 0], [0, 0, 0, 1])
    loads["man"][MODULES[1]] = [0.5, 0.5, 0, 0]
    fig = domain_expert_load(loads, title="best mixture")
    heat, bars, _ = fig.axes  # heatmap, separation bars, the heatmap's colour bar
    grid = heat.images[0].get_array()
    assert grid.shape == (3, 4) and grid[2].tolist() == [0.25, 0.25, 0, 0.5]  # mean over the two modules
    assert "mean over 2 modules" in heat.get_title()
    assert [tick.get_text() for tick in heat.get_yticklabels()] == list(DOMAINS)
    widths = [patch.get_width() for patch in bars.patches]
    assert widths == pytest.approx([1.0, 2 / 3])  # second module: TV 1 (stdlib, fortunes), 0.5 and 0.5 (man's)
    assert "mean 0.833" in bars.get_title() and fig.get_suptitle() == "best mixture"
    one = domain_expert_load(loads, module=MODULES[1])
    assert one.axes[0].images[0].get_array()[2].tolist() == [0.5, 0.5, 0, 0]
    assert "layer.0.value" in one.axes[0].get_title()
    fig.savefig(tmp_path / "domains.png")
    assert (tmp_path / "domains.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=re.escape("module 'layer.9.key' has no loads")):
        domain_expert_load(loads, module="layer.9.key")


def test_text_token_map_plots_the_modules_that_route_per_token_and_names_a_filter_that_keeps_none():
    from conftest import word_tokenizer

    from mope.analysis.plots import text_token_map

    model, tokenizer = routed_llama(num_experts=4, top_k=2), word_tokenizer()
    figure = text_token_map(model, tokenizer, "t5 t9 t12 t40", only="q_proj")
    tokens = len(tokenizer("t5 t9 t12 t40")["input_ids"])
    assert figure.axes[0].images[0].get_array().shape == (2, tokens)  # q_proj of both layers
    with pytest.raises(ValueError, match="no MoPE module whose name contains 'nope' routes per token"):
        text_token_map(model, word_tokenizer(), "t5 t9", only="nope")
