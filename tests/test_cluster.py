"S3: real embeddings, real BERTopic clustering, assignment of new calls, the CLI, and BFCL vs the TF-IDF baseline."
import json
from datetime import datetime, timezone

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from slm_research.cluster import (ClusterConfig, cluster_cmd, cluster_calls, fit_clusters, load_clusterer,
                                  score_clusters, tfidf_kmeans_baseline, write_outputs)
from slm_research.core import CLEAN_SCHEMA

TASKS = {
    "sql": ("You translate questions into SQL for the analytics warehouse.", ["how many users signed up in {x}", "count orders placed in {x}", "total revenue for {x} by region"], '{"sql": "SELECT 1"}'),
    "trip": ("You are a travel planner that books flights and hotels.", ["book a flight to {x} next week", "find a hotel in {x} for two nights", "plan a weekend trip to {x}"], None),
    "review": ("You review pull requests and point out bugs.", ["review this diff that changes {x}", "is there a bug in {x}", "suggest tests for {x}"], "Looks fine."),
}
FILL = ["Rome", "Oslo", "March", "May", "parser.py", "db.py", "Lima", "June", "api.py", "Kyoto"]


def calls(n=150, seed=0):
    rng = np.random.default_rng(seed)
    rows, gold = [], []
    for i in range(n):
        task = list(TASKS)[i % 3]
        system, templates, answer = TASKS[task]
        user = templates[rng.integers(3)].format(x=FILL[rng.integers(len(FILL))])
        resp = {"role": "assistant", "content": answer} if answer else {"role": "assistant", "tool_calls": [{"function": {"name": "book", "arguments": "{}"}}]}
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        rows.append(dict(id=f"c{i}", timestamp=datetime(2025, 3, 1, i % 24, tzinfo=timezone.utc), agent="a", session="s", user="u",
                         model="m", messages=json.dumps(msgs), tools="[]", response=json.dumps(resp), latency_ms=1.0,
                         prompt_tokens=50, completion_tokens=10))
        gold.append(task)
    return pl.DataFrame(rows, schema=CLEAN_SCHEMA), gold


def test_clusters_recover_tasks_and_are_reproducible(workspace):
    frame, gold = calls()
    res = fit_clusters(frame, ClusterConfig(seed=3))
    assert score_clusters(gold, res.assignments["cluster"])["nmi"] == 1.0
    again = fit_clusters(frame, ClusterConfig(seed=3))
    assert again.assignments.equals(res.assignments)
    summary = write_outputs(frame, res, workspace.processed)
    by_label = {c["cluster"]: c for c in summary["clusters"]}
    trip = res.assignments.filter(pl.col("id") == "c1")["cluster"].item()
    assert by_label[trip]["profile"]["tool_call_share"] == 1.0
    assert sum(c["n_calls"] for c in summary["clusters"]) == len(frame)


def test_saved_clusterer_assigns_new_calls_and_outliers(workspace):
    frame, gold = calls()
    res = fit_clusters(frame, ClusterConfig(k=3))
    res.clusterer.save(workspace.processed / "clusterer")
    model = load_clusterer(workspace.processed / "clusterer")
    new, new_gold = calls(30, seed=7)
    got = model.assign(new.with_columns(pl.format("n{}", pl.col("id")).alias("id")))
    assert score_clusters(new_gold, got["cluster"])["nmi"] == 1.0
    odd = new.head(1).with_columns(messages=pl.lit(json.dumps([{"role": "system", "content": "You are a poet."},
                                                              {"role": "user", "content": "Write a sonnet on autumn rain over the sea."}])))
    assert model.assign(odd)["cluster"].to_list() == [-1]
    # the saved representation (centred embedding + TF-IDF/SVD projection) reproduces the fitted vectors exactly
    assert np.allclose(model.vectors(frame), res.embeddings, atol=1e-5)


def test_fast_path_on_sample_assigns_everything():
    frame, gold = calls(300)
    res = fit_clusters(frame, ClusterConfig.fast(fit_sample=120))
    assert len(res.assignments) == 300
    assert score_clusters(gold, res.assignments["cluster"])["nmi"] > 0.9


def test_cli_keeps_fields_and_quarantines_bad_lines(tmp_path):
    _, gold = calls()
    texts = [f"{TASKS[g][0]} {TASKS[g][1][i % 3].format(x=FILL[i % len(FILL)])}" for i, g in enumerate(gold)]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([json.dumps({"text": t, "i": i}) for i, t in enumerate(texts)] + ["{oops", json.dumps({"text": 3})]) + "\n")
    r = CliRunner().invoke(cluster_cmd, ["--in", str(src), "--out", str(tmp_path / "out.jsonl"), "--k", "3"])
    assert r.exit_code == 0, r.output
    out = [json.loads(l) for l in (tmp_path / "out.jsonl").open()]
    assert [o["i"] for o in out] == list(range(len(texts)))
    assert score_clusters(gold, [o["cluster"] for o in out])["nmi"] == 1.0
    bad = [json.loads(l) for l in (tmp_path / "out.quarantine.jsonl").open()]
    assert [b["where"] for b in bad] == [f"in.jsonl:{len(texts) + 1}", f"in.jsonl:{len(texts) + 2}"]


def test_bfcl_beats_tfidf_baseline(shared_external):
    """The baseline is told k=8. Default path: beats it choosing k itself and told k. Fast path: told k, both metrics; alone, NMI
    (its ARI alone is just below the baseline's: it splits the 8 API classes into ~16 clusters, see notebook 12)."""
    b = pl.read_ndjson(shared_external / "bfcl_multiturn_turn_domain.jsonl").with_row_index("n").with_columns(id=pl.col("n").cast(pl.String))
    base = score_clusters(b["label"], tfidf_kmeans_baseline(b["text"].to_list(), 8))
    for cfg in (ClusterConfig(), ClusterConfig(k=8), ClusterConfig.fast(k=8)):
        ours = score_clusters(b["label"], cluster_calls(b, cfg)["cluster"])
        assert ours["nmi"] > base["nmi"] and ours["ari"] > base["ari"], (cfg.embedder, cfg.k, ours, base)
    fast = score_clusters(b["label"], cluster_calls(b, ClusterConfig.fast())["cluster"])
    assert fast["nmi"] > base["nmi"], (fast, base)


def test_duplicated_task_is_a_cluster_not_outliers():
    "A task sent many times with few distinct texts (a fixed template) must form its own cluster, not outliers."
    frame, gold = calls(150)
    judge = {"role": "assistant", "content": "Engineer"}
    extra = [dict(id=f"j{i}", timestamp=datetime(2025, 3, 1, tzinfo=timezone.utc), agent="a", session="s", user="u", model="m",
                  messages=json.dumps([{"role": "system", "content": "You are a QA engineer."},
                                       {"role": "user", "content": f"Judge the test run {i % 4} and answer NoOne, Engineer or QaEngineer."}]),
                  tools="[]", response=json.dumps(judge), latency_ms=1.0, prompt_tokens=20, completion_tokens=1) for i in range(60)]
    frame = pl.concat([frame, pl.DataFrame(extra, schema=CLEAN_SCHEMA)])
    gold = gold + ["judge"] * 60
    res = fit_clusters(frame, ClusterConfig(seed=1))
    s = score_clusters(gold, res.assignments["cluster"])
    assert s["nmi"] == 1.0 and s["outlier_share"] == 0.0, s
