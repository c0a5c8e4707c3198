"""The workspace's hand-offs and the gate's interval arithmetic, against hand-computed cases."""
import json
import math

import polars as pl
import pytest

from slm_research.workspace import (Z95, AdapterRecord, Registry, Workspace, bootstrap_interval, build_gate, gate_row,
                                    min_test_calls, score_interval, split_by_session, wilson_interval)


@pytest.mark.parametrize("k,n,lo,hi", [
    (8, 10, 0.4902, 0.9433),     # Wilson (1927), worked by hand: centre 0.7156, half-width 0.2265
    (0, 10, 0.0, 0.2775),        # no success: upper bound z^2 / (n + z^2)
    (10, 10, 0.7225, 1.0),       # all successes: lower bound n / (n + z^2)
    (95, 100, 0.8882, 0.9785),
])
def test_wilson_interval_matches_hand_computed_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=5e-4) and got[1] == pytest.approx(hi, abs=5e-4)


def test_wilson_closed_forms_at_the_extremes():
    for n in (1, 7, 73, 500):
        assert wilson_interval(n, n)[0] == pytest.approx(n / (n + Z95 ** 2))
        assert wilson_interval(0, n)[1] == pytest.approx(Z95 ** 2 / (n + Z95 ** 2))


def test_minimum_test_calls_is_the_first_n_whose_perfect_record_passes():
    for t in (0.8, 0.9, 0.95, 0.99):
        n = min_test_calls(t)
        assert wilson_interval(n, n)[0] >= t > wilson_interval(n - 1, n - 1)[0]
    assert min_test_calls(0.95) == 73
    with pytest.raises(ValueError): min_test_calls(1.0)
    assert min_test_calls(0.0) == 1          # a 0 gate passes any scored cluster


def test_bootstrap_interval_of_graded_scores():
    scores = [0.1, 0.4, 0.5, 0.9, 0.6, 0.7, 0.3, 0.8] * 10
    lo, hi = bootstrap_interval(scores, seed=0)
    mean, sd = sum(scores) / len(scores), (sum((s - 0.5375) ** 2 for s in scores) / len(scores)) ** 0.5
    # the normal approximation of the mean's 95% interval, for comparison
    assert lo == pytest.approx(mean - 1.96 * sd / math.sqrt(len(scores)), abs=0.02)
    assert hi == pytest.approx(mean + 1.96 * sd / math.sqrt(len(scores)), abs=0.02)
    assert bootstrap_interval(scores, seed=0) == (lo, hi)       # seeded: the same interval on a rerun
    assert score_interval([1, 1, 0, 1]) == wilson_interval(3, 4)    # rates get Wilson


def test_gate_passes_on_the_lower_bound_and_scales_by_the_teacher():
    rows = [dict(cluster=0, label="a", primary_metric="exact_match", adapter_score=1.0, share=0.2, n_test=73),
            dict(cluster=1, label="b", primary_metric="exact_match", adapter_score=1.0, share=0.3, n_test=72),
            dict(cluster=2, label="c", primary_metric="chrf", adapter_score=0.9, share=0.1, n_test=200,
                 adapter_interval=(0.84, 0.94), teacher_score=0.9)]
    gate = build_gate(rows, 0.95)
    assert [r["passed"] for r in gate["clusters"]] == [True, False, False]
    assert gate["clusters"][2]["agreement"] == pytest.approx(1.0)
    assert gate["clusters"][2]["agreement_interval"] == pytest.approx([0.84 / 0.9, 1.0])
    assert gate["replaceable_share"] == pytest.approx(0.2)
    assert gate["replaceable_share_interval"] == pytest.approx([0.2, 0.6])
    assert not gate_row(dict(cluster=3, label="", primary_metric="x", adapter_score=1.0, share=0.1, n_test=0))["passed"]


def test_split_never_divides_a_conversation_and_is_seeded():
    frame = pl.DataFrame({"session": [f"s{i % 97}" for i in range(2000)]})
    a, b = split_by_session(frame, seed=3), split_by_session(frame, seed=3)
    assert a["split"].to_list() == b["split"].to_list()
    assert a.group_by("session").agg(pl.col("split").n_unique())["split"].max() == 1
    assert split_by_session(frame, seed=4)["split"].to_list() != a["split"].to_list()


def test_registry_round_trip_and_promotion(tmp_path):
    reg = Registry(tmp_path/"registry.json")
    reg.add(AdapterRecord(1, 1, "lora", {"adapter_score": 0.9}, "h", "promoted", "ok", base="b", extra={"x": 1}))
    reg.add(AdapterRecord(1, 2, "lora", {"adapter_score": 0.97}, "h2", "promoted", "better"))
    again = Registry(tmp_path/"registry.json")
    assert [(r.version, r.status) for r in again.records] == [(1, "retired"), (2, "promoted")]
    assert json.loads((tmp_path/"registry.json").read_text())["adapters"][0]["x"] == 1


def test_missing_handoff_names_the_step_to_run(tmp_path):
    ws = Workspace(tmp_path)
    with pytest.raises(FileNotFoundError, match="slm-research clean"): ws.read_calls()
    with pytest.raises(FileNotFoundError, match="slm-research select"): ws.read_selection()
