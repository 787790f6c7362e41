"""mope.analysis.plots (mope[plots]): the load heatmap, routing by position and the token map render to PNG."""

from __future__ import annotations

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
