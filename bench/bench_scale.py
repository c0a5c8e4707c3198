"""S2 masking and S3 assignment: the local engine against Ray with 1 and 2 workers, in the same run.

    .venv/bin/python bench/bench_scale.py                 # 100k and 1M generated calls (hours on 2 cores)
    .venv/bin/python bench/bench_scale.py --n 2000        # a quick check
    .venv/bin/python bench/bench_scale.py --n 1000000 --workers 2 --skip-s3   # S2 only, one Ray configuration
    .venv/bin/python bench/bench_scale.py --n 1000000 --workers 1 2 --no-local-s2   # 1M: S2 on Ray only, S3 both

Each configuration runs in its own subprocess, so the driver's peak memory (ru_maxrss) is its own. The baseline is the
local engine (one process, the whole log in memory) measured in the same run; Ray rows give calls/s, the ratio to the
baseline and the driver's peak memory (the Ray driver writes the output piece by piece, so its peak should not grow with
the log). Outputs are compared with the local engine's a slice at a time, so the comparison itself holds no whole log.
The per-worker throughput (calls over the seconds the workers spent inside
batches, actor start-up excluded) of the largest Ray run projects a 16-worker cluster's time at 100M calls: an
extrapolation (linear scaling), labelled so. Results: bench/results/bench_scale-n<N>-w<W>.json.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT/"bench"/"results"


TILE = 200_000   # above this many calls the log is the 200k corpus repeated, with its call and session ids renamed


def shards_of(n: int, seed: int, per_shard: int) -> Path:
    """The generated corpus of `n` calls split into JSONL shards of `per_shard` lines (made once, reused). Above `TILE`
    calls, the `TILE`-call corpus is repeated with call, session and user ids suffixed by the copy's number: the same
    calls to mask, distinct ids (generating 1M calls one by one takes hours on a shared 2-core machine)."""
    from slm_research.corpus import generate_corpus
    out = RESULTS/f"scale-shards-n{n}-s{seed}-p{per_shard}"
    if (out/"done").exists(): return out
    corpus = generate_corpus(min(n, TILE), seed)
    out.mkdir(parents=True, exist_ok=True)
    f, i, k = None, 0, 0
    for copy in range(-(-n // TILE)):
        with open(corpus/"calls.jsonl") as src:
            for line in src:
                if k == n: break
                if copy:
                    rec = json.loads(line)
                    for key in ("id", "session_id", "user_id"): rec[key] = f"{rec[key]}-t{copy}"
                    line = json.dumps(rec, ensure_ascii=False) + "\n"
                if k % per_shard == 0:
                    if f: f.close()
                    f = open(out/f"part-{i:05d}.jsonl", "w"); i += 1
                f.write(line); k += 1
    if f: f.close()
    (out/"done").write_text("")
    return out


def start_ray(workers: int) -> None:
    "A local Ray; Ray gives its raylet 30 s to register, which a busy machine (and `nice`) can exceed: try again."
    import ray
    from slm_research.scale import ray_init
    for attempt in range(30):
        try: ray_init(num_cpus=max(2, workers)); return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 29: raise
            ray.shutdown(); time.sleep(30)


def run_one(args) -> dict:
    "One configuration in this process: returns its report with the driver's peak memory."
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.step == "s2":
        from slm_research.scale import clean_local, clean_ray
        if args.engine == "local": rep = clean_local(args.source, out_dir=out)
        else:
            start_ray(args.workers); t0 = time.perf_counter()
            rep = clean_ray(args.source, out_dir=out, workers=args.workers, batch_calls=args.batch_calls)
    else:
        import polars as pl
        from slm_research.scale import assign_ray
        if args.engine == "local":
            from slm_research.cluster import load_clusterer
            frame = pl.read_parquet(args.source)
            load_clusterer(args.clusterer).assign(frame).select("id", "cluster", "cluster_label").write_parquet(out/"clusters.parquet")
            rep = {"n_in": frame.height, "n_out": frame.height}
        else:
            start_ray(args.workers); t0 = time.perf_counter()
            rep = assign_ray(args.source, args.clusterer, out, workers=args.workers, batch_calls=args.batch_calls)
    seconds = time.perf_counter() - t0
    calls_per_s = round(rep["n_in"] / seconds, 1)
    return {"n": rep["n_in"], "seconds": round(seconds, 2), "calls_per_s": calls_per_s, "load_avg_1m": os.getloadavg()[0],
            # Ray: calls over the seconds workers spent inside batches (actor start-up excluded); local: calls/s
            "per_worker_calls_per_s": rep.get("per_worker_calls_per_s", calls_per_s),
            "driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def same_parquet(a: Path, b: Path, rows: int = 50_000) -> bool:
    "Do two Parquet files hold equal frames? Compared `rows` at a time, so neither is ever whole in memory."
    import polars as pl
    n = pl.scan_parquet(a).select(pl.len()).collect().item()
    if n != pl.scan_parquet(b).select(pl.len()).collect().item(): return False
    return all(pl.scan_parquet(a).slice(i, rows).collect().equals(pl.scan_parquet(b).slice(i, rows).collect())
               for i in range(0, n, rows))


def spawn(step, engine, workers, source, out, batch_calls, clusterer="") -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLM_CACHE": tempfile.mkdtemp(prefix="bench-scale-cache-")}
    # the static embedder is distilled once into the project cache: share it, not the embedding cache
    models = ROOT/".cache"/"models"
    if models.is_dir(): (Path(env["SLM_CACHE"])/"models").symlink_to(models)
    cmd = [sys.executable, __file__, "--one", step, "--engine", engine, "--workers", str(workers), "--source", str(source),
           "--out", str(out), "--batch-calls", str(batch_calls), "--clusterer", str(clusterer)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode: raise RuntimeError(f"{step} {engine} x{workers} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench(n: int, seed: int, batch_calls: int, workers: list[int], s3: bool = True, local_s2: bool = True) -> list[dict]:
    import polars as pl
    from slm_research.cluster import ClusterConfig, fit_clusters
    src = shards_of(n, seed, per_shard=max(500, min(50_000, n // 8)))
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-scale-n{n}-"))
    rows = []
    # Ray first: the driver's peak memory is the figure that matters most, and a long run may be cut short
    for w in workers:
        r = spawn("s2", "ray", w, src, tmp/f"s2-ray{w}", batch_calls)
        rows.append({"step": "S2 mask", "engine": "ray", "workers": w, **r})
        print(json.dumps(rows[-1]), flush=True)
    base = None
    if local_s2:
        base = spawn("s2", "local", 1, src, tmp/"s2-local", batch_calls)
        rows.insert(0, {"step": "S2 mask", "engine": "local", "workers": 1, **base})
        print(json.dumps(rows[0]), flush=True)
        for r in rows[1:]:
            r["same_output"] = same_parquet(tmp/f"s2-ray{r['workers']}"/"calls_clean.parquet", tmp/"s2-local"/"calls_clean.parquet")
            print(json.dumps({"S2 ray workers": r["workers"], "same_output": r["same_output"]}), flush=True)
    if not s3: return _finish(rows, base, None, tmp)
    masked = tmp/("s2-local" if local_s2 else f"s2-ray{workers[-1]}")/"calls_clean.parquet"
    import numpy as np
    n_masked = pl.scan_parquet(masked).select(pl.len()).collect().item()
    pick = np.sort(np.random.default_rng(seed).choice(n_masked, min(n_masked, 5000), replace=False)).tolist()
    sample = pl.scan_parquet(masked).with_row_index("_i").filter(pl.col("_i").is_in(pick)).drop("_i").collect()
    model = fit_clusters(sample, ClusterConfig.fast(reducer="pca", seed=seed)).clusterer.save(tmp/"clusterer")
    (tmp/"s3-local").mkdir()
    base3 = spawn("s3", "local", 1, masked, tmp/"s3-local", batch_calls * 2, model)
    rows.append({"step": "S3 assign", "engine": "local", "workers": 1, **base3})
    print(json.dumps(rows[-1]), flush=True)
    for w in workers:
        r = spawn("s3", "ray", w, masked, tmp/f"s3-ray{w}", batch_calls * 2, model)
        same = same_parquet(tmp/f"s3-ray{w}"/"clusters.parquet", tmp/"s3-local"/"clusters.parquet")
        rows.append({"step": "S3 assign", "engine": "ray", "workers": w, **r, "same_output": same})
        print(json.dumps(rows[-1]), flush=True)
    return _finish(rows, base, base3, tmp)


def _finish(rows, base, base3, tmp) -> list[dict]:
    for r in rows:
        b = base if r["step"] == "S2 mask" else base3
        r["vs_local"] = round(r["calls_per_s"] / b["calls_per_s"], 2) if b else None
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def project(rows: list[dict], n_calls: int = 100_000_000, workers: int = 16) -> list[dict]:
    "Hours for `n_calls` on `workers` workers from the largest Ray run's per-worker throughput (extrapolated)."
    from slm_research.scale import project_seconds
    out = []
    for step in ("S2 mask", "S3 assign"):
        ray_rows = [r for r in rows if r["step"] == step and r["engine"] == "ray"]
        if not ray_rows: continue
        r = max(ray_rows, key=lambda r: (r["n"], r["workers"]))
        out.append({"step": step, "n_calls": n_calls, "workers": workers, "from_n": r["n"], "from_workers": r["workers"],
                    "per_worker_calls_per_s": r["per_worker_calls_per_s"], "kind": "extrapolated",
                    "hours": round(project_seconds(n_calls, r["per_worker_calls_per_s"], workers) / 3600, 2)})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-calls", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--skip-s3", action="store_true", help="S2 only")
    ap.add_argument("--no-local-s2", action="store_true",
                    help="S2 on Ray only (no baseline, no same-output check; S3 reads Ray's output): the local engine "
                         "takes about an hour at 1M calls on 2 cores")
    ap.add_argument("--one", choices=["s2", "s3"], help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="local", help=argparse.SUPPRESS)
    ap.add_argument("--source", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--clusterer", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.step, args.workers = args.one, args.workers[0]
        print(json.dumps(run_one(args))); return
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = [r for n in args.n for r in bench(n, args.seed, args.batch_calls, args.workers, not args.skip_s3, not args.no_local_s2)]
    result = {"rows": rows, "projection": project(rows), "cpus": os.cpu_count(),
              "load_avg": os.getloadavg(), "note": "baseline: the local engine (one process) in the same run"}
    name = f"bench_scale-n{'-'.join(map(str, args.n))}-w{'-'.join(map(str, args.workers))}.json"
    (RESULTS/name).write_text(json.dumps(result, indent=1))
    print(f"{'step':<10} {'engine':<6} {'w':>2} {'n':>8} {'calls/s':>9} {'vs local':>8} {'per worker':>10} {'driver MB':>9} same")
    for r in rows:
        print(f"{r['step']:<10} {r['engine']:<6} {r['workers']:>2} {r['n']:>8} {r['calls_per_s']:>9} {r['vs_local']:>8} "
              f"{r['per_worker_calls_per_s']:>10} {r['driver_peak_mb']:>9} {r.get('same_output', '')}")
    for p in result["projection"]:
        print(f"{p['step']}: {p['n_calls']:,} calls on {p['workers']} workers ~ {p['hours']} h "
              f"(extrapolated from {p['per_worker_calls_per_s']} calls/s per worker at n={p['from_n']})")


if __name__ == "__main__":
    main()
