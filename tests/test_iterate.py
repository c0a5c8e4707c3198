"""S6: drift metrics, the registry, the promotion policy, the router in the real capture proxy, and a real iteration round."""
import json
import threading
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings, strategies as st

from slm_research.iterate import (IterateConfig, RequestAssigner, cluster_shares, js_divergence,
                                  measure_drift, psi)
from slm_research.calls import request_text
from slm_research.serve import Route, Router, load_router, validate_message
from slm_research.workspace import AdapterRecord, Registry, Workspace


# --- drift metrics --------------------------------------------------------------------------------------------------

shares = st.dictionaries(st.integers(-1, 6), st.integers(1, 50), min_size=1).map(lambda d: cluster_shares([k for k, n in d.items() for _ in range(n)]))

@settings(max_examples=60, deadline=None)
@given(shares, shares)
def test_drift_metrics_are_divergences(p, q):
    assert psi(p, p) == pytest.approx(0, abs=1e-12) and js_divergence(p, p) == pytest.approx(0, abs=1e-12)
    assert psi(p, q) >= 0 and psi(p, q) == pytest.approx(psi(q, p))          # PSI is symmetric (a symmetrised KL)
    assert 0 <= js_divergence(p, q) <= 1 + 1e-12
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p))


def test_drift_report_flags_the_clusters_that_moved():
    ref = [0] * 60 + [1] * 40
    new = [0] * 30 + [1] * 40 + [2] * 20 + [-1] * 10
    r = measure_drift(ref, new, round=3, min_share_change=0.05)
    assert r.drifted == [0, 2]                       # cluster 1 kept its 40%; outliers are reported apart
    assert r.share_change[0] == pytest.approx(-0.3) and r.share_change[2] == pytest.approx(0.2)
    assert r.outlier_rate == pytest.approx(0.1) and r.ref_outlier_rate == 0
    assert r.shifted(0.1) and not measure_drift(ref, ref).shifted(0.1)


# --- registry and promotion -----------------------------------------------------------------------------------------

def _rec(c, v, status, score=0.97, **kw):
    return AdapterRecord(c, v, "lora", {"primary_metric": "exact_match", "adapter_score": score}, f"h{c}{v}", status, "test", **kw)


def test_registry_promotion_retires_the_previous_version_and_keeps_foreign_fields(tmp_path):
    path = tmp_path/"registry.json"
    # an S5-written registry (its own fields, like `base`) must survive S6's writes
    path.write_text(json.dumps({"adapters": [{**_rec(2, 1, "promoted").to_dict(), "base": "/models/base", "extra": {}}]}))
    reg = Registry(path)
    reg.add(_rec(2, 2, "rejected", 0.5))
    reg.add(_rec(2, 3, "promoted", 0.99))
    again = Registry(path)
    assert [(r.version, r.status) for r in again.versions(2)] == [(1, "retired"), (2, "rejected"), (3, "promoted")]
    assert again.promoted(2).version == 3 and again.next_version(2) == 4
    assert json.loads(path.read_text())["adapters"][0]["base"] == "/models/base"
    with pytest.raises(ValueError, match="already has"): again.add(_rec(2, 3, "rejected"))


def test_registry_readers_never_see_a_partial_file(tmp_path):
    reg = Registry(tmp_path/"registry.json")
    reg.add(_rec(0, 1, "promoted"))
    stop, seen, errors = threading.Event(), [], []
    def read():
        while not stop.is_set():
            try: seen.append(len(Registry(tmp_path/"registry.json").records))
            except json.JSONDecodeError as e: errors.append(e)
    t = threading.Thread(target=read); t.start()
    for v in range(2, 60): reg.add(_rec(0, v, "rejected", 0.1))
    stop.set(); t.join()
    assert not errors and seen and min(seen) >= 1 and seen == sorted(seen)
    assert list(tmp_path.iterdir()) == [tmp_path/"registry.json"]


def test_s6_evidence_over_rounds_promotes_at_most_5_percent_of_a_093_adapter():
    "200 S6 histories of a candidate whose true agreement is 0.93, against a 0.95 gate, decided after every round."
    from slm_research.gate import GateConfig
    from slm_research.iterate import add_evidence, decide_version
    rng, gate = np.random.default_rng(0), GateConfig()
    promoted = 0
    for _ in range(200):
        metrics, status = {}, "candidate"
        for _ in range(20):                          # 20 rounds of 60 new calls, 50 accepted
            metrics = add_evidence(metrics, {"n_scored": 60, "n_accepted": 50, "agree": int(rng.binomial(50, 0.93))})
            status = decide_version(metrics, status, gate).status
            if status != "candidate": break
        promoted += status == "promoted"
    assert promoted <= 10
    # the same loop passes an adapter that does agree (0.995) within a few rounds
    metrics, rounds = {}, 0
    while decide_version(metrics, "candidate", gate).status != "promoted" and rounds < 20:
        metrics, rounds = add_evidence(metrics, {"n_scored": 60, "n_accepted": 50, "agree": int(rng.binomial(50, 0.995))}), rounds + 1
    assert rounds <= 5


# --- the router in the capture proxy, through the real openai client ------------------------------------------------

@pytest.fixture(scope="module")
def corpus_frame():
    "A small embedded corpus (raw text, in memory only) with each call's true sub-task as its cluster."
    from slm_research.capture import to_frame
    from slm_research.corpus import generate_corpus, iter_jsonl, read_gold
    folder = generate_corpus(600, seed=5, progress=False)
    frame = to_frame(iter_jsonl(folder/"calls.jsonl"))
    gold = read_gold(folder).select("id", "subtask")
    tasks = sorted(gold["subtask"].unique().to_list())
    return frame.join(gold, on="id").with_columns(
        cluster=pl.col("subtask").replace_strict({t: i for i, t in enumerate(tasks)}, return_dtype=pl.Int64),
        cluster_label=pl.col("subtask"))


def _request(row: dict) -> dict:
    req = {"model": row["model"] or "gpt-4o", "messages": json.loads(row["messages"])}
    if tools := json.loads(row["tools"]): req["tools"] = tools
    return req


def _random_tiny_lm_backend(texts):
    "A real causal LM that has learnt nothing: a tokenizer trained on the logs and a randomly initialised Llama."
    from slm_research.slm import generate_batch
    from slm_research.training import base_config, build_stand_in_model, train_tokenizer
    tok = train_tokenizer(texts, vocab_size=400)
    model = build_stand_in_model(tok, base_config("micro")).eval()
    return lambda request: generate_batch(model, tok, [request], max_new_tokens=12)[0]


def test_router_in_the_proxy_serves_gated_clusters_and_falls_back(corpus_frame, tmp_path):
    from openai import OpenAI
    from slm_research.capture import Pseudonymizer, SegmentWriter, create_app, demo_upstream_app, generate_keys, read_store, serve

    by_task = {t: corpus_frame.filter(pl.col("subtask") == t) for t in ("next_step", "write_code", "start_url")}
    assert all(f.height >= 3 for f in by_task.values())
    held = {t: f.row(0, named=True) for t, f in by_task.items()}           # the live requests; not in the fit
    known = corpus_frame.filter(~pl.col("id").is_in([r["id"] for r in held.values()]))
    assigner = RequestAssigner.fit(known, embedder="static")
    cluster = {t: held[t]["cluster"] for t in held}
    for t, row in held.items(): assert assigner.assign_request(_request(row)) == cluster[t], t

    # next_step: gated, answered by a nearest-neighbour responder over the cluster's logged answers (always well formed)
    nn = known.filter(pl.col("cluster") == cluster["next_step"])
    nn_vectors = assigner._embed([request_text(m, t) for m, t in zip(nn["messages"], nn["tools"])])
    def nearest_answer(request):
        v = assigner._embed([request_text(request["messages"], request.get("tools"))])
        return json.loads(nn["response"][int(np.argmax(nn_vectors @ v[0]))])
    # start_url: gated, but its SLM (an untrained model) cannot write the JSON the cluster always answers in
    routes = [Route(cluster["next_step"], nearest_answer, "slm/cluster-next/v1"),
              Route(cluster["start_url"], _random_tiny_lm_backend(corpus_frame["messages"].head(80).to_list()), "slm/cluster-url/v1", expects_json=True)]
    router = Router(assigner.assign_request, routes)

    keys = generate_keys(tmp_path/"keys")
    upstream_app = demo_upstream_app()
    with serve(upstream_app) as upstream:
        writer = SegmentWriter(tmp_path/"store", keys["public"], Pseudonymizer(keys["pseudonym"]))
        with serve(create_app(upstream.url, writer, router)) as proxy:
            client = OpenAI(base_url=proxy.url + "/v1", api_key="sk-test-not-a-secret", max_retries=0)
            out = {t: client.chat.completions.create(**_request(held[t])) for t in ("next_step", "write_code", "start_url")}
    # the gated cluster was answered by the SLM, with a tool the request offers; the upstream never saw it
    assert out["next_step"].model == "slm/cluster-next/v1"
    names = {t["function"]["name"] for t in _request(held["next_step"])["tools"]}
    assert out["next_step"].choices[0].message.tool_calls[0].function.name in names
    # the ungated cluster and the invalid SLM answer went upstream
    assert out["write_code"].id.startswith("chatcmpl-demo") and out["start_url"].id.startswith("chatcmpl-demo")
    assert upstream_app.state.calls["calls"] == 2
    logged = {json.dumps(r["request"]["messages"]): r for r in read_store(tmp_path/"store", keys["private"])}
    assert len(logged) == 3
    rec = {t: logged[json.dumps(_request(held[t])["messages"])] for t in held}
    assert rec["next_step"]["served_by"] == "slm/cluster-next/v1" and rec["next_step"]["cluster"] == cluster["next_step"]
    assert rec["write_code"]["served_by"] == "upstream" and "no adapter that passed the gate" in rec["write_code"]["fallback_reason"]
    assert rec["start_url"]["served_by"] == "upstream" and rec["start_url"]["fallback_reason"].startswith("invalid SLM output")


def test_router_validation_catches_what_an_agent_would_choke_on():
    req = {"messages": [{"role": "user", "content": "go"}], "tools": [{"type": "function", "function": {"name": "goto"}}]}
    tool = lambda name, args: {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {"name": name, "arguments": args}}]}
    assert validate_message(tool("goto", '{"url": "https://a.b"}'), req) is None
    assert "unknown tool" in validate_message(tool("rm_rf", "{}"), req)
    assert "not a JSON object" in validate_message(tool("goto", "[1]"), req)
    assert validate_message({"role": "assistant", "content": "done"}, {**req, "tool_choice": "required"}) == "the request requires a tool call"
    assert validate_message({"role": "assistant", "content": "```json\n{}\n```"}, req, expects_json=True) == "content is not valid JSON"
    failing = Router(lambda r: 0, [Route(0, lambda r: 1 / 0, "slm/x")]).handle(req)
    assert failing.response is None and failing.fallback_reason.startswith("SLM failed: ZeroDivisionError")


# --- a real round: S3's clusterer, S5's training, S6's loop, then the router built from the workspace ---------------

@pytest.mark.slow
def test_iterate_round_finds_the_new_task_retrains_and_routes(workspace):
    from slm_research.cluster import ClusterConfig, fit_clusters, write_outputs
    from slm_research.core import CLEAN_SCHEMA
    from slm_research.finetune import FinetuneConfig, finetune_to_files
    from slm_research.gate import GateConfig
    from slm_research.training import base_config, build_stand_in_base, synthetic_calls
    from slm_research.iterate import iterate
    ws = workspace.processed
    first = synthetic_calls(180, seed=0, tasks=("weather", "extract", "sentiment"))
    Workspace(ws).write_calls(first)
    fitted = fit_clusters(first.select(list(CLEAN_SCHEMA)), ClusterConfig(embedder="static", reducer="pca", k=3, seed=0))
    write_outputs(first.select(list(CLEAN_SCHEMA)), fitted, ws)
    Workspace(ws).write_selection({"selections": [{"cluster": c, "label": l, "choice": "stand-in"}
                                                  for c, l in zip(fitted.clusterer.clusters, fitted.clusterer.labels)]})
    base = build_stand_in_base(first, base_config("micro", steps=8), ws/"base")
    # gate at 0 so S5 promotes its adapters whatever a micro model learns in a few steps: this test is about the loop
    gate0 = finetune_to_files(ws, FinetuneConfig(base=str(base), steps=10, batch_size=8, max_length=128, rank=4, alpha=8,
                                                 n_eval=6, max_new_tokens=24, max_clusters=1, always_train=True, seed=0,
                                                 gate=GateConfig(threshold=0.0)))
    assert sum(g["passed"] for g in gate0["clusters"]) == 1

    # a new batch: the weather share collapses and a task no cluster knows (status summaries) appears
    batch = synthetic_calls(150, seed=1, tasks=("extract", "sentiment", "summary", "summary")).with_columns(
        id="b1-" + pl.col("id"), session="b1-" + pl.col("session"))
    res = iterate(batch.select(list(CLEAN_SCHEMA)), IterateConfig(min_new_cluster=15, max_retrain=1, min_test=2), ws)
    d = res.drift
    assert d.n_calls == 150 and d.psi > 0.25 and d.shifted()
    assert len(d.new_clusters) == 1
    new = d.new_clusters[0].cluster
    placed = pl.read_parquet(ws/"iterate"/"history.parquet").join(batch.select("id", "task"), on="id")
    in_new = placed.filter(pl.col("cluster") == new)
    assert in_new.height >= 0.8 * batch.filter(pl.col("task") == "summary").height
    assert (in_new["task"] == "summary").mean() >= 0.9                   # the new cluster is the new task
    reg = Workspace(ws).registry()
    s6 = [r for r in reg.records if r.round == 1]
    assert s6 and all(r.status in ("promoted", "candidate", "rejected") and r.data_hash and (ws/r.path/"meta.json").exists()
                      for r in s6)
    assert all(r.metrics["rounds"] for r in s6)                           # each new version has its first evidence
    assert {dd.cluster for dd in res.decisions if dd.version} == {r.cluster for r in s6}
    gate = Workspace(ws).read_gate()
    assert gate["threshold"] == 0.0                                        # S6 kept S5's gate
    assert gate["replaceable_share"] == pytest.approx(sum(g["share"] * g["coverage"] for g in gate["clusters"] if g["passed"]))
    assert json.loads(res.report_path.read_text())["drift"]["new_clusters"][0]["cluster"] == new
    # the same batch again adds nothing
    with pytest.raises(ValueError, match="no new calls"): iterate(batch.select(list(CLEAN_SCHEMA)), IterateConfig(), ws)

    router = load_router(ws, mask=False)
    assert set(router.routes) == {int(g["cluster"]) for g in gate["clusters"] if g["passed"]}
    served = 0
    for c in router.routes:
        ids = placed.filter(pl.col("cluster") == c)["id"].head(2).to_list() or pl.read_parquet(ws/"clusters.parquet").filter(pl.col("cluster") == c)["id"].head(2).to_list()
        rows = pl.concat([first.select(list(CLEAN_SCHEMA)), batch.select(list(CLEAN_SCHEMA))]).filter(pl.col("id").is_in(ids))
        for row in rows.iter_rows(named=True):
            req = _request(row)
            out = router.handle(req)
            assert out.cluster == c
            if out.response is not None:                                  # served: a well-formed answer, from the promoted version
                served += 1
                assert out.served_by == f"slm/cluster-{c}/v{reg.promoted(c).version}"
                assert validate_message(out.response["choices"][0]["message"], req, router.routes[c].expects_json) is None
            else: assert out.fallback_reason.startswith("invalid SLM output")
