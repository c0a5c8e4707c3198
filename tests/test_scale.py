"Scale (S2, S3, S5 on Ray): a real local Ray with 2 CPUs, real masking, real clustering, real training steps."
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

pytest.importorskip("ray")

from slm_research.capture import to_frame
from slm_research.clean import CleanConfig, clean
from slm_research.cluster import ClusterConfig, fit_clusters
from slm_research.core import CLEAN_SCHEMA, Quarantine
from slm_research.corpus import generate_records
from slm_research.finetune import FinetuneConfig, synthetic_workspace
from slm_research.training import base_config, build_stand_in_base, split_rows
from slm_research.scale import (ORDER, assign_frame, assign_ray, clean_local, clean_ray, cluster_ray, ray_init, read_shard,
                                train_clusters_ray, write_in_order)

ROOT = Path(__file__).resolve().parent.parent
N_CALLS = 800


@pytest.fixture(scope="module", autouse=True)
def pseudonym_key():
    """One pseudonym key for every masking engine here (the driver's and Ray's workers', which inherit it): without one
    each engine draws its own and the session and user pseudonyms differ."""
    before = os.environ.get("SLM_PSEUDONYM_KEY")
    os.environ["SLM_PSEUDONYM_KEY"] = "5ca1e" * 8
    yield
    if before is None: os.environ.pop("SLM_PSEUDONYM_KEY")
    else: os.environ["SLM_PSEUDONYM_KEY"] = before


@pytest.fixture(scope="module")
def local_ray(pseudonym_key):
    "A local Ray of 2 CPUs, started by the first test that asks for it and shut down at the end of the module."
    import ray
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if ray.is_initialized(): ray.shutdown()
    ray_init(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    "800 generated calls in three JSONL shards (sessions cross shard boundaries), plus two broken lines."
    d = tmp_path_factory.mktemp("shards")
    recs = [json.dumps(r) for r, _, _ in generate_records(N_CALLS, seed=5)]
    cuts = [0, 280, 560, N_CALLS]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        lines = recs[a:b]
        if i == 1: lines = lines[:10] + ['{"id": "x", "request": {"messages": []}}', "not json"] + lines[10:]
        (d/f"part-{i}.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture(scope="module")
def local_out(log, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return out, clean_local(log, out_dir=out)


def test_import_does_not_import_ray():
    code = "import sys, slm_research.scale; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_workers_import_this_checkout(local_ray):
    import ray
    import slm_research
    where = ray.get(ray.remote(lambda: __import__("slm_research").__file__).remote())
    assert where == slm_research.__file__


@pytest.mark.slow
def test_local_engine_is_clean_on_the_whole_log(log, local_out):
    out, report = local_out
    assert (report["n_in"], report["n_out"], report["n_quarantined"]) == (N_CALLS + 2, N_CALLS, 2)
    q = [json.loads(line) for line in (out/"clean_quarantine.jsonl").read_text().splitlines()]
    assert [r["where"] for r in q] == ["part-1.jsonl:11", "part-1.jsonl:12"]
    assert q[0]["reason"] == "RecordError: field 'agent' must be a non-empty string" and q[1]["reason"].startswith("bad JSON")
    raw = pl.concat([read_shard(p, i) for i, p in enumerate(sorted(log.glob("*.jsonl")))])
    direct = clean(raw.filter(pl.col("_reason").is_null()).select(list(CLEAN_SCHEMA)), progress=False)
    assert pl.read_parquet(out/"calls_clean.parquet").equals(direct)


@pytest.mark.slow
def test_clean_ray_gives_the_local_bytes_though_a_worker_dies(local_ray, log, local_out, tmp_path, capfd):
    "Ray's output equals the local engine's, every column, though a worker process exits in the middle of a batch."
    out, local = local_out
    work, marker = tmp_path/"work", tmp_path/"died"
    work.mkdir()
    report = clean_ray(log, out_dir=tmp_path/"out", workers=2, batch_calls=120, merge_calls=100, work_dir=work,
                       _fault=f"die:{marker}")
    assert marker.exists()   # a worker process really exited mid-batch: its actor was restarted, the batch retried
    assert (report["n_in"], report["n_out"], report["n_quarantined"]) == (local["n_in"], local["n_out"], 2)
    assert report["n_buckets"] >= 7   # the sessions were really spread over many batches
    assert report["n_pieces"] == 9    # and the driver wrote the 802 calls in pieces of 100
    # Ray's core worker complains (on the driver's stderr) about actors whose constructor arguments are in the object store
    assert "object store" not in capfd.readouterr().err
    assert report["workers"] == 2 and 0 < report["busy_s"] and report["per_worker_calls_per_s"] > 0
    got, want = pl.read_parquet(tmp_path/"out"/"calls_clean.parquet"), pl.read_parquet(out/"calls_clean.parquet")
    assert got["id"].n_unique() == got.height == N_CALLS   # nothing lost, nothing twice
    assert got.equals(want)   # every column; the masked texts are the same strings, byte for byte:
    assert got["messages"].to_list() == want["messages"].to_list() and got["response"].to_list() == want["response"].to_list()
    assert (tmp_path/"out"/"clean_quarantine.jsonl").read_text() == (out/"clean_quarantine.jsonl").read_text()
    # the raw calls of the shuffle lived in work_dir only, and are gone
    assert sorted(p.name for p in (tmp_path/"out").iterdir()) == ["calls_clean.parquet", "clean_quarantine.jsonl", "clean_report.json"]
    assert list(work.iterdir()) == []


@pytest.mark.slow
def test_a_session_split_over_batches_would_number_placeholders_differently(log):
    "The check above can fail: masking each session's calls in two batches gives other placeholders than in one."
    raw = pl.concat([read_shard(p, i) for i, p in enumerate(sorted(log.glob("*.jsonl")))]).filter(pl.col("_reason").is_null())
    frame = raw.select(list(CLEAN_SCHEMA))
    whole = clean(frame, progress=False)
    split = pl.concat([clean(frame[0::2], progress=False), clean(frame[1::2], progress=False)]).sort("id")
    differ = sum(a != b for a, b in zip(whole.sort("id")["messages"], split["messages"]))
    assert differ > len(frame) // 20, differ


@pytest.mark.slow
def test_bad_records_are_quarantined_not_fatal(local_ray, tmp_path):
    calls = to_frame(r for r, _, _ in generate_records(60, seed=2)).select(list(CLEAN_SCHEMA))
    bad = calls.with_columns(pl.when(pl.int_range(pl.len()) % 20 == 3).then(pl.lit("{not json")).otherwise("messages").alias("messages"))
    report = clean_ray(bad, CleanConfig(), out_dir=tmp_path, workers=1, batch_calls=20)
    assert (report["n_in"], report["n_out"], report["n_quarantined"]) == (60, 57, 3)
    q = Quarantine(tmp_path/"x")
    want = clean(bad, quarantine=q, progress=False)
    assert pl.read_parquet(tmp_path/"calls_clean.parquet").equals(want)
    assert [json.loads(l)["where"] for l in (tmp_path/"clean_quarantine.jsonl").read_text().splitlines()] == [r.where for r in q.items]


def test_the_merge_holds_one_group_and_refuses_groups_out_of_order(tmp_path):
    a = pl.DataFrame({"id": ["a", "c"], "_shard": [0, 0], "_row": [0, 2]})
    b = pl.DataFrame({"id": ["b", "d"], "_shard": [0, 1], "_row": [1, 0]})
    a.write_parquet(tmp_path/"a.parquet"); b.write_parquet(tmp_path/"b.parquet")
    out = tmp_path/"out.parquet"
    assert write_in_order([[(tmp_path/"a.parquet", None), (tmp_path/"b.parquet", None)]], out, tmp_path/"a.parquet") == 4
    assert pl.read_parquet(out)["id"].to_list() == ["a", "b", "c", "d"]
    with pytest.raises(AssertionError, match="comes after"):
        write_in_order([[(tmp_path/"b.parquet", None)], [(tmp_path/"a.parquet", None)]], tmp_path/"x.parquet", tmp_path/"a.parquet")
    assert not (tmp_path/"x.parquet").exists() and not list(tmp_path.glob(".*tmp"))
    assert write_in_order([], tmp_path/"empty.parquet", tmp_path/"a.parquet") == 0
    assert pl.read_parquet(tmp_path/"empty.parquet").schema == a.drop(ORDER).schema


@pytest.fixture(scope="module")
def masked(local_out):
    return pl.read_parquet(local_out[0]/"calls_clean.parquet")


@pytest.mark.slow
def test_assign_ray_matches_clusterer_assign_and_survives_a_failing_batch(local_ray, masked, tmp_path):
    fitted = fit_clusters(masked.head(400), ClusterConfig.fast(reducer="pca", seed=1))
    want = fitted.clusterer.assign(masked).select("id", "cluster", "cluster_label")
    assert want["cluster"].n_unique() > 2
    marker = tmp_path/"raised"
    report = assign_ray(masked, fitted.clusterer, tmp_path/"a", workers=2, batch_calls=200, _fault=f"raise:{marker}")
    assert marker.exists() and report["n_out"] == N_CALLS
    assert pl.read_parquet(tmp_path/"a"/"clusters.parquet").equals(want)
    assert assign_frame(fitted.clusterer, masked.head(50)).equals(want.head(50))


@pytest.mark.slow
def test_cluster_ray_equals_fit_clusters_on_a_sample(local_ray, masked, local_out, tmp_path):
    cfg = ClusterConfig.fast(reducer="pca", seed=3, fit_sample=400)
    report = cluster_ray(local_out[0]/"calls_clean.parquet", cfg, tmp_path, workers=2, batch_calls=250)
    assert (report["n_fit"], report["n_out"]) == (400, N_CALLS)
    assert pl.read_parquet(tmp_path/"clusters.parquet").equals(fit_clusters(masked, cfg).assignments)
    assert (tmp_path/"clusterer"/"clusterer.json").exists()


@pytest.mark.slow
def test_two_clusters_train_as_ray_tasks(local_ray, tmp_path):
    ws = synthetic_workspace(tmp_path/"ws", n=160, seed=1)
    frame = ws.cluster_frame(seed=1)
    base = build_stand_in_base(frame.filter(pl.col("split") == "train"), base_config("micro", steps=4, max_length=96), tmp_path/"base")
    cfg = FinetuneConfig(base=str(base), steps=3, batch_size=4, max_length=96, rank=4, alpha=8, save_steps=100)
    result = train_clusters_ray(frame, cfg, tmp_path/"adapters", clusters=[0, 1], num_cpus=1)
    assert result["cluster"].to_list() == [0, 1] and result["steps"].to_list() == [3, 3]
    assert os.getpid() not in result["pid"].to_list()   # trained in Ray worker processes, not the driver
    for c, n_train in zip(result["cluster"], result["n_train"]):
        d = tmp_path/"adapters"/f"cluster-{c}"
        meta = json.loads((d/"meta.json").read_text())
        assert meta["n_train"] == n_train > 0 and (d/"adapter_config.json").exists()
        assert n_train == split_rows(frame.filter(pl.col("cluster") == c), "train").height
