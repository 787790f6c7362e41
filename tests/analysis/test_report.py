"""mope.analysis.routing_report: load by position and token-id specialisation in one pass over the data."""

from __future__ import annotations

import pytest
from conftest import repeated_token_batches, routed_llama

from mope.analysis import routing_report


def test_report_has_load_by_position_and_specialization_in_one_pass():
    model = routed_llama(num_experts=4, top_k=2)
    report = routing_report(model, iter(repeated_token_batches()))
    for layer in report.values():
        assert len(layer["load_by_position"]) == 16
        assert all(sum(row) == pytest.approx(1.0) for row in layer["load_by_position"])
        assert {"load_cv", "entropy", "drop_rate", "token_id_predictability"} <= set(layer)
