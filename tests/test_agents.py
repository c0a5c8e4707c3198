"Appendix B analysis (slm_research.agents): rubric, frequency weighting, call-site mapping and the pipeline estimate on hand-made inventories."
import polars as pl
import pytest

from slm_research.agents import (AGENTS, LLM_FEATURES, PAPER_ESTIMATES, SLM_FEATURES, Rubric, apply_frequencies,
                                 classify_call_types, load_call_types, map_callsites, one_at_a_time, pipeline_shares,
                                 replaceable_share, rubric_score, sensitivity_draws, threshold_sweep, explain_differences)


def inventory(rows):
    base = dict.fromkeys(SLM_FEATURES + LLM_FEATURES, 0)
    return pl.DataFrame([{**base, "callsite_pattern": ".*", **r} for r in rows], schema_overrides={"fires_per_run": pl.Float64})


# agent "code": write-file (structured, narrow, repetitive: +3) 5x; debug (debugging, long context, structured: -1) 2x;
# design (open planning, cross-API: -2) 1x  -> SLM 5 of 8
# agent "web": parse (structured, short: +2) 4x; plan (structured, open planning: 0) 4x -> 4 of 8 at threshold 1, 8 of 8 at 0
INV = inventory([
    dict(agent="code", call_type="write file", fires_per_run=5, structured_output=1, narrow_scope=1, repetitive=1),
    dict(agent="code", call_type="debug", fires_per_run=2, structured_output=1, debugging=1, long_multiturn=1),
    dict(agent="code", call_type="design", fires_per_run=1, open_planning=1, cross_api_reasoning=1),
    dict(agent="web", call_type="parse", fires_per_run=4, structured_output=1, short_context=1),
    dict(agent="web", call_type="plan", fires_per_run=4, structured_output=1, open_planning=1),
])


def test_rubric_classification_by_hand():
    c = classify_call_types(INV, Rubric())
    assert c["score"].to_list() == [3, -1, -2, 2, 0]
    assert c["slm_capable"].to_list() == [True, False, False, True, False]
    assert classify_call_types(INV, Rubric(threshold=0))["slm_capable"].to_list() == [True, False, False, True, True]
    # halving the weight of open planning lifts "plan" to 0.5: still below 1, above 0.5
    assert classify_call_types(INV, Rubric(llm_weights={"open_planning": 0.5}, threshold=0.5))["slm_capable"][4]
    assert rubric_score({"structured_output": 1, "debugging": 1}, Rubric(slm_weights={"structured_output": 2.0})) == 1.0
    with pytest.raises(ValueError, match="unknown rubric features"):
        Rubric(llm_weights={"creativity": 1.0})


def test_frequency_weighting_by_hand():
    s = replaceable_share(classify_call_types(INV, Rubric()))
    assert s.rows() == [("code", 8.0, 5.0, 5 / 8), ("web", 8.0, 4.0, 0.5)]
    doubled = apply_frequencies(INV, {"code/debug": 4, "web/plan": 12})
    assert replaceable_share(classify_call_types(doubled, Rubric()))["share"].to_list() == [5 / 10, 4 / 16]
    with pytest.raises(KeyError, match="unknown call types"):
        apply_frequencies(INV, {"code/nothing": 1})
    with pytest.raises(ValueError, match="no calls"):
        replaceable_share(classify_call_types(apply_frequencies(INV, {"web/parse": 0, "web/plan": 0}), Rubric()))


def test_sensitivity_helpers():
    sweep = threshold_sweep(INV, Rubric(), [0, 1, 3, 4])
    web = dict(zip(sweep.filter(pl.col("agent") == "web")["threshold"], sweep.filter(pl.col("agent") == "web")["share"]))
    assert web == {0.0: 1.0, 1.0: 0.5, 3.0: 0.0, 4.0: 0.0}
    oat = one_at_a_time(INV, Rubric())
    plan = oat.filter(pl.col("call_type") == "plan").row(0, named=True)
    assert plan["share_low"] == pytest.approx(4 / 6) and plan["share_high"] == pytest.approx(4 / 12)
    fixed = sensitivity_draws(INV, Rubric(), n_draws=20, freq_spread=1.0, weight_spread=0.0)
    assert fixed.group_by("agent").agg(pl.col("share").unique()).sort("agent")["share"].to_list() == [[5 / 8], [0.5]]
    a = sensitivity_draws(INV, Rubric(), n_draws=30, seed=7)
    assert a.equals(sensitivity_draws(INV, Rubric(), n_draws=30, seed=7))           # reproducible
    assert a["share"].n_unique() > 2 and a["share"].is_between(0, 1).all()


def test_pipeline_shares_on_hand_made_gate():
    calls = pl.DataFrame({"id": ["1", "2", "3", "4", "5", "6", "7"],
                          "agent": ["metagpt", "metagpt", "metagpt", "cradle", "cradle", "cradle", "cradle"]})
    clusters = pl.DataFrame({"id": ["1", "2", "3", "4", "5", "6"], "cluster": [0, 1, -1, 0, 2, 2],
                             "cluster_label": ["a", "b", "outlier", "a", "c", "c"]}, schema_overrides={"cluster": pl.Int64})
    gate = {"threshold": 0.8, "clusters": [{"cluster": 0, "passed": True, "coverage": 1.0, "coverage_interval": [0.9, 1.0]},
                                            {"cluster": 1, "passed": False},
                                            {"cluster": 2, "passed": True, "coverage": 0.5, "coverage_interval": [0.4, 0.6]}],
            "replaceable_share": 0.5}
    out = pipeline_shares(calls, clusters, gate)
    # cradle: call 4 in cluster 0 (all answered), calls 5-6 in cluster 2 (half answered), call 7 unclustered
    assert out.rows() == [("cradle", 4, 1, 2.0, 0.5, (0.9 + 0.8) / 4, (1.0 + 1.2) / 4),
                          ("metagpt", 3, 0, 1.0, 1 / 3, 0.9 / 3, 1 / 3)]
    maybe = {**gate, "clusters": [*gate["clusters"][:1], {"cluster": 1, "passed": False, "could_pass": True}, gate["clusters"][2]]}
    assert pipeline_shares(calls, clusters, maybe)["share_high"].to_list() == pytest.approx([0.55, 2 / 3])  # the upper end
    nobody = {"clusters": [{"cluster": c, "passed": False} for c in (0, 1, 2)]}
    assert pipeline_shares(calls, clusters, nobody)["share"].to_list() == [0.0, 0.0]
    with pytest.raises(ValueError, match="no 'clusters'"):
        pipeline_shares(calls, clusters, {})
    with pytest.raises(Exception, match="missing column 'agent'"):
        pipeline_shares(calls.drop("agent"), clusters, gate)


def test_project_inventory_and_every_shared_callsite(shared_external):
    ct = load_call_types()
    assert set(ct["agent"]) == set(AGENTS) == set(PAPER_ESTIMATES)
    sites = pl.read_csv(shared_external / "agent_callsites.csv")
    mapped = map_callsites(sites, ct)
    assert mapped.height == sites.height and mapped["call_type"].null_count() == 0
    assert dict(mapped.group_by("agent").len().iter_rows()) == {"metagpt": 107, "cradle": 25, "open_operator": 7}
    # the core of each agent's loop lands where the paper's reasoning puts it
    c = classify_call_types(ct, Rubric()).filter(pl.col("fires_per_run") > 0)
    kind = {(a, t): s for a, t, s in c.select("agent", "call_type", "slm_capable").iter_rows()}
    assert kind[("metagpt", "write one code file")] and not kind[("metagpt", "debug failing code")]
    assert not kind[("open_operator", "plan the next browser step")]
    assert kind[("cradle", "detect subtask success")] and not kind[("cradle", "reflect on the last action")]
    shares = replaceable_share(classify_call_types(ct, Rubric()))
    assert shares["share"].is_between(0.2, 0.9).all()


def test_load_call_types_rejects_bad_rows(tmp_path):
    header = "agent,call_type,callsite_pattern,fires_per_run," + ",".join(SLM_FEATURES + LLM_FEATURES)
    f = tmp_path / "ct.csv"
    f.write_text(header + "\nmetagpt,x,.*,1," + ",".join(["2"] + ["0"] * 7) + "\n")
    with pytest.raises(ValueError, match=r"ct.csv:2 \(metagpt/x\): features \['structured_output'\] must be 0 or 1"):
        load_call_types(f)
    f.write_text(header + "\nnobody,x,.*,1," + ",".join(["0"] * 8) + "\n")
    with pytest.raises(ValueError, match="unknown agent 'nobody'"):
        load_call_types(f)
    f.write_text(header + "\nmetagpt,x,(,1," + ",".join(["0"] * 8) + "\n")
    with pytest.raises(ValueError, match="bad callsite_pattern"):
        load_call_types(f)
    with pytest.raises(ValueError, match="match no call type"):
        map_callsites(pl.DataFrame({"agent": ["Cradle"], "callsite": ["X"]}), INV)


def test_explanation_is_generated_from_the_data():
    c = classify_call_types(INV, Rubric())
    summary = pl.DataFrame({"agent": ["metagpt"], "paper": [0.6], "callsite": [0.75], "callsite_low": [0.65],
                            "callsite_high": [0.8], "pipeline": [None]}, schema_overrides={"pipeline": pl.Float64})
    inv = INV.with_columns(agent=pl.lit("metagpt"))
    text = explain_differences(summary, classify_call_types(inv, Rubric()), one_at_a_time(inv, Rubric()))
    assert "15 points above the paper's 60%" in text and "lies outside" in text and "write file (5 a run)" in text


def test_load_pipeline_outputs_from_processed_folder(workspace):
    from slm_research.agents import load_pipeline_outputs
    from slm_research.training import synthetic_calls
    from slm_research.workspace import Workspace
    ws = Workspace(workspace.processed)
    assert load_pipeline_outputs(workspace.processed) is None          # nothing written yet: the notebook says so
    ws.write_calls(synthetic_calls(2).with_columns(id=pl.Series(["1", "2"]), agent=pl.lit("cradle")))
    ws.write_clusters(pl.DataFrame({"id": ["1", "2"], "cluster": [3, -1], "cluster_label": ["x", "outlier"]}), {"clusters": []})
    ws.write_gate({"threshold": 0.5, "clusters": [{"cluster": 3, "passed": True}]})
    calls, clusters, gate = load_pipeline_outputs(workspace.processed)
    assert calls.columns == ["id", "agent"]
    assert pipeline_shares(calls, clusters, gate).rows() == [("cradle", 2, 0, 1.0, 0.5, 0.5, 0.5)]
