"""S3 speed: embedding + clustering time, peak memory and NMI vs gold, default vs fast path, at 10k and 100k calls.

Run: .venv/bin/python bench/bench_cluster.py [--sizes 10000 100000] [--skip-default-above N]
The default path at 100k takes tens of minutes on 2 cores (MiniLM ~ 70-400 texts/s); --skip-default-above
skips it above N calls. Each size runs in a child process so peak memory (ru_maxrss) is per run.
Calls come from the embedded corpus generator; they are converted to CLEAN_SCHEMA in memory (with
slm_research.clean's masking when that module exists) and nothing is written but the numbers.
Embedding caches are disabled so every run embeds from scratch."""
import argparse, json, os, resource, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def to_frame(calls_path):
    import polars as pl
    from datetime import datetime
    from slm_research.core import CLEAN_SCHEMA
    rows = []
    for line in open(calls_path):
        r = json.loads(line); req = r["request"]; resp = r.get("response") or {}
        msg = (resp.get("choices") or [{}])[0].get("message") if resp else None
        u = resp.get("usage") or {}
        rows.append(dict(id=r["id"], timestamp=datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")), agent=r["agent"],
                         session=r["session_id"], user=r["user_id"], model=req.get("model", ""), messages=json.dumps(req["messages"]),
                         tools=json.dumps(req.get("tools") or []), response=json.dumps(msg), latency_ms=float(r.get("latency_ms") or 0),
                         prompt_tokens=u.get("prompt_tokens"), completion_tokens=u.get("completion_tokens")))
    return pl.DataFrame(rows, schema=CLEAN_SCHEMA)


def one(n, mode, seed):
    import polars as pl
    from slm_research import cluster as C
    from slm_research.corpus import generate_corpus
    d = generate_corpus(n, seed, progress=False)
    frame = to_frame(d / "calls.jsonl")
    gold = pl.read_ndjson(d / "gold.jsonl").select("id", "subtask")
    cfg = C.ClusterConfig.fast(seed=seed) if mode == "fast" else C.ClusterConfig(seed=seed)
    C.get_embedder(cfg.embedder)  # model load (and static distillation, cached) outside the timing
    orig = C.embed
    C.embed = lambda texts, embedder="minilm", cache=None, progress=True: orig(texts, embedder, False, progress)
    t = time.perf_counter()
    if mode == "tfidf":
        texts = C.build_texts(frame)
        labels = C.tfidf_kmeans_baseline(texts, gold["subtask"].n_unique(), seed)
        assign = pl.DataFrame({"id": frame["id"], "cluster": labels})
    else:
        assign = C.cluster_calls(frame, cfg)
    secs = time.perf_counter() - t
    j = assign.join(gold, on="id")
    s = C.score_clusters(j["subtask"], j["cluster"])
    return dict(n=n, mode=mode, seconds=round(secs, 1), peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), **s)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-default-above", type=int, default=None)
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(int(a.child[0]), a.child[1], a.seed))); sys.exit()
    results = []
    for n in a.sizes:
        for mode in ("tfidf", "fast", "default"):
            if mode == "default" and a.skip_default_above and n > a.skip_default_above:
                print(f"n={n} default: skipped (--skip-default-above {a.skip_default_above})"); continue
            out = subprocess.run([sys.executable, __file__, "--seed", str(a.seed), "--child", str(n), mode],
                                 capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if out.returncode: print(out.stderr[-2000:]); continue
            r = json.loads(out.stdout.strip().splitlines()[-1]); results.append(r); print(r, flush=True)
    by = {(r["n"], r["mode"]): r for r in results}
    for n in a.sizes:
        if (n, "default") in by and (n, "fast") in by:
            d, f = by[(n, "default")], by[(n, "fast")]
            print(f"n={n}: fast is {d['seconds'] / f['seconds']:.1f}x faster than default; NMI {f['nmi']} vs {d['nmi']} (diff {f['nmi'] - d['nmi']:+.3f})")
    out_dir = ROOT / "bench" / "results"; out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_cluster.json").write_text(json.dumps(results, indent=1))
