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


@pytest.mark.slow
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
    # in batches (bounded memory on long logs) the answers are the same, call for call
    assert got.equals(model.assign(new.with_columns(pl.format("n{}", pl.col("id")).alias("id")), batch_calls=7))
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


@pytest.mark.slow
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


def _bfcl(shared_external):
    return pl.read_ndjson(shared_external / "bfcl_multiturn_turn_domain.jsonl").with_row_index("n").with_columns(id=pl.col("n").cast(pl.String))


@pytest.mark.slow
def test_k_is_exact_where_hdbscan_finds_fewer(shared_external):
    "BFCL with HDBSCAN's default minimum size has 16 micro-clusters; asked for 24, S3 returns exactly 24."
    from slm_research.cluster import Representation, build_parts, embed_parts, micro_clusters, reduce_unique
    b, cfg = _bfcl(shared_external), ClusterConfig(k=24, min_cluster_size=15)
    parts = build_parts(b)
    texts, emb = parts["text"], embed_parts(parts, progress=False)
    x = Representation.fit(texts, emb, cfg.tfidf_weight, cfg.tfidf_dims, cfg.seed).transform(emb, texts)
    micro, _ = micro_clusters(reduce_unique(x, texts, cfg), x, 15)
    assert micro.max() + 1 < 24
    got = cluster_calls(b, cfg)["cluster"]
    assert got.n_unique() == 24 and got.min() == 0
    assert cluster_calls(b, ClusterConfig(k=8))["cluster"].n_unique() == 8  # and when HDBSCAN finds more


def test_k_beyond_distinct_calls_is_a_clear_error(tmp_path):
    few = pl.DataFrame({"id": [str(i) for i in range(40)], "text": ["book a flight", "sort the files"] * 20})
    with pytest.raises(ValueError, match="k=5 clusters asked for, but there are 2 distinct calls"):
        fit_clusters(few, ClusterConfig(k=5))
    src = tmp_path / "few.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in few["text"]))
    r = CliRunner().invoke(cluster_cmd, ["--in", str(src), "--out", str(tmp_path / "out.jsonl"), "--k", "5"])
    assert r.exit_code != 0 and "2 distinct calls" in r.output, r.output
    r = CliRunner().invoke(cluster_cmd, ["--in", str(src), "--out", str(src)])
    assert r.exit_code != 0 and "overwrite the input" in r.output


@pytest.mark.slow
def test_automatic_k_does_not_collapse_on_apibench(shared_external):
    "APIBench (58 domains): automatic k used to find 2 clusters (NMI 0.28); now within 0.05 NMI of S3 given the true k."
    a = pl.read_ndjson(shared_external / "apibench_domain.jsonl").with_row_index("n").with_columns(id=pl.col("n").cast(pl.String))
    auto = score_clusters(a["label"], cluster_calls(a, ClusterConfig())["cluster"])
    told = score_clusters(a["label"], cluster_calls(a, ClusterConfig(k=58))["cluster"])
    assert told["n_clusters"] == 58
    assert auto["n_clusters"] >= 10 and auto["nmi"] >= told["nmi"] - 0.05, (auto, told)


@pytest.mark.slow
def test_automatic_k_within_005_of_given_k_on_agentbench(shared_external):
    """AgentBench (3 environments): automatic k used to cut 46 clusters (NMI 0.39, given k = 3: 0.75). Its 2-way split (shell
    tasks against the rest) is the best cut on the embeddings alone and a strong one, so it is now taken (`strong_split`)."""
    a = pl.read_ndjson(shared_external / "agentbench_env.jsonl").with_row_index("n").with_columns(id=pl.col("n").cast(pl.String))
    auto = score_clusters(a["label"], cluster_calls(a, ClusterConfig())["cluster"])
    told = score_clusters(a["label"], cluster_calls(a, ClusterConfig(k=3))["cluster"])
    assert told["n_clusters"] == 3
    assert auto["nmi"] >= told["nmi"] - 0.05, (auto, told)


@pytest.mark.slow
def test_chat_record_representation_does_not_hurt_plain_requests(shared_external):
    "The same BFCL requests as plain text and as chat records (one user turn, no system prompt, tools or answer)."
    b = _bfcl(shared_external)
    chat = b.select("id", messages=pl.col("text").map_elements(lambda t: json.dumps([{"role": "user", "content": t}]), return_dtype=pl.String),
                    tools=pl.lit("[]"), response=pl.lit(None, dtype=pl.String))
    for k in (None, 8):
        as_text = score_clusters(b["label"], cluster_calls(b, ClusterConfig(k=k))["cluster"])["nmi"]
        as_chat = score_clusters(b["label"], cluster_calls(chat, ClusterConfig(k=k))["cluster"])["nmi"]
        assert as_chat >= as_text - 0.03, (k, as_text, as_chat)


@pytest.mark.slow
def test_cli_reads_chat_records_text_lines_and_parquet(tmp_path, shared_external):
    "Chat records (BFCL live OpenAI logs turned into messages / tools / response), as lists or JSON strings, and CLEAN_SCHEMA Parquet."
    recs = [json.loads(l) for l in (shared_external / "bfcl_live_calls.jsonl").open()][:120]
    chat = [{"id": r["id"], "messages": r["messages"][:-1], "tools": r["tools"], "response": r["messages"][-1]} for r in recs]
    chat[1] = {**chat[1], "messages": json.dumps(chat[1]["messages"]), "tools": json.dumps(chat[1]["tools"])}
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join([json.dumps(c) for c in chat] + ["{oops", json.dumps({"text": "a plain line"}), json.dumps({"messages": 3})]) + "\n")
    r = CliRunner().invoke(cluster_cmd, ["--in", str(src), "--out", str(tmp_path / "out.jsonl"), "--k", "4"])
    assert r.exit_code == 0, r.output
    out = [json.loads(l) for l in (tmp_path / "out.jsonl").open()]
    bad = [json.loads(l) for l in (tmp_path / "out.quarantine.jsonl").open()]
    assert len(out) + len(bad) == len(chat) + 3 and [o["id"] for o in out] == [c["id"] for c in chat]
    assert len({o["cluster"] for o in out}) == 4
    assert [b_["where"] for b_ in bad] == ["chat.jsonl:121", "chat.jsonl:122", "chat.jsonl:123"]
    assert "text record in a file of chat records" in bad[1]["reason"] and "'messages' is not a JSON list" in bad[2]["reason"]
    # the text S3 clusters is the chat record's, built as the notebook builds it
    from slm_research.cluster import build_texts, read_calls
    from slm_research.core import Quarantine
    _, frame = read_calls(src, Quarantine(tmp_path / "q.jsonl"))
    assert build_texts(frame)[0].startswith(chat[0]["messages"][-1]["content"][:40].strip()) or "tools: " in build_texts(frame)[0]
    frame, _ = calls(90)
    frame.write_parquet(tmp_path / "calls_clean.parquet")
    r = CliRunner().invoke(cluster_cmd, ["--in", str(tmp_path / "calls_clean.parquet"), "--out", str(tmp_path / "c.parquet"), "--k", "3"])
    assert r.exit_code == 0, r.output
    got = pl.read_parquet(tmp_path / "c.parquet")
    assert got.height == 90 and got["cluster"].n_unique() == 3 and got["id"].to_list() == frame["id"].to_list()
