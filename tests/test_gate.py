"""The gate: interval arithmetic against hand-computed cases, the confidence sequence's false passes over repeated
looks, and selective answering's threshold chosen on one split and checked on another."""
import math

import numpy as np
import pytest

from slm_research.gate import (Z95, GateConfig, anytime_lower_bound, bootstrap_interval, build_gate, choose_threshold,
                               gate_row, log_evidence, min_gate_calls, score_interval, verify, wilson_interval)


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


def test_minimum_gate_calls_is_the_first_n_whose_perfect_record_passes():
    for t in (0.8, 0.9, 0.95, 0.99):
        n = min_gate_calls(t)
        assert anytime_lower_bound(n, n) >= t > anytime_lower_bound(n - 1, n - 1)
        assert n > math.ceil(t * Z95 ** 2 / (1 - t) - 1e-9)    # more than a single look's Wilson bound needs
    with pytest.raises(ValueError): min_gate_calls(1.0)
    assert min_gate_calls(0.0) == 1          # a 0 gate passes any scored cluster


def test_bootstrap_interval_of_graded_scores():
    scores = [0.1, 0.4, 0.5, 0.9, 0.6, 0.7, 0.3, 0.8] * 10
    lo, hi = bootstrap_interval(scores, seed=0)
    mean, sd = sum(scores) / len(scores), (sum((s - 0.5375) ** 2 for s in scores) / len(scores)) ** 0.5
    # the normal approximation of the mean's 95% interval, for comparison
    assert lo == pytest.approx(mean - 1.96 * sd / math.sqrt(len(scores)), abs=0.02)
    assert hi == pytest.approx(mean + 1.96 * sd / math.sqrt(len(scores)), abs=0.02)
    assert bootstrap_interval(scores, seed=0) == (lo, hi)       # seeded: the same interval on a rerun
    assert score_interval([1, 1, 0, 1]) == wilson_interval(3, 4)    # rates get Wilson


def test_gate_passes_on_the_accepted_calls_and_the_share_takes_coverage():
    n = min_gate_calls()
    rows = [dict(cluster=0, label="a", share=0.2, n_scored=n, n_accepted=n, agree=n),
            dict(cluster=1, label="b", share=0.3, n_scored=n, n_accepted=n - 1, agree=n - 1),
            dict(cluster=2, label="c", share=0.5, n_scored=400, n_accepted=200, agree=199)]
    gate = build_gate(rows)
    assert [r["passed"] for r in gate["clusters"]] == [True, False, True]
    assert gate["replaceable_share"] == pytest.approx(0.2 + 0.5 * 0.5)
    lo, hi = gate["replaceable_share_interval"]
    assert lo < gate["replaceable_share"] < hi
    assert not gate_row(dict(cluster=3, label="", share=0.1))["passed"]


def test_the_mixture_evidence_matches_its_closed_form_when_every_call_agrees():
    for n, p0 in ((10, 0.5), (88, 0.95), (200, 0.9)):
        closed = (1 - p0 ** (n + 1)) / ((n + 1) * (1 - p0) * p0 ** n)
        assert log_evidence(n, n, p0) == pytest.approx(math.log(closed), rel=1e-9)


def test_graded_scores_never_pass_where_their_mean_is_below_the_gate():
    "Scores in [0, 1] (chrF, field shares) with a true mean of 0.93: the bound over every look stays valid."
    rng = np.random.default_rng(0)
    passed = 0
    for _ in range(200):
        s = n = 0.0
        for _ in range(20):
            x = np.clip(rng.beta(9.3, 0.7, size=50), 0, 1)     # mean 0.93, most scores near 1
            s, n = s + x.sum(), n + 50
            if GateConfig().passes(s, n): passed += 1; break
    assert passed <= 10


def test_threshold_chosen_on_calibration_holds_on_a_separate_test_split():
    "Confidence that tracks agreement: thresholds chosen on one split accept agreeing calls on another."
    def calls(rng, n):
        conf = rng.uniform(0, 1, n)
        return conf, (rng.uniform(0, 1, n) < np.where(conf > 0.4, 0.998, 0.5)).astype(float)
    results = []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        chosen = choose_threshold(*calls(rng, 300))
        ev = verify(*calls(rng, 600), chosen["threshold"])
        results.append((chosen["threshold"], ev["passed"], ev["coverage"]))
    thresholds, passed, coverage = map(np.array, zip(*results))
    assert passed.mean() >= 0.8, results              # checked on calls that did not choose it
    assert thresholds.min() > 0.3 and 0.5 < coverage.mean() < 0.65
    # accepting everything would not pass: the confidence is what makes the share
    rng = np.random.default_rng(0)
    assert not verify(*calls(rng, 600), 0.0)["passed"]
