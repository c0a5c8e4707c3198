"""S3 speed: embedding + clustering time, peak memory and NMI vs gold, default vs fast path, at 10k and 100k calls.

Run: nice .venv/bin/python bench/bench_cluster.py [--sizes 10000 100000] [--max-default-minutes 15]
     nice .venv/bin/python bench/bench_cluster.py --devsets [bfcl apibench agentbench corpus]
Calls come from the embedded corpus generator, masked by S2 (`slm_research.clean.clean`) once per size and cached
under `.cache/bench/` (masking is not part of the timing). Each (size, method) runs in a child process, so peak
memory (ru_maxrss) is that run's own. Embedding caches are disabled: every run embeds from scratch; the model load
(and the one-off static distillation) happens before the clock starts. The baseline is TF-IDF + SVD(100) + k-means
told the gold number of sub-tasks. The default path is skipped at a size where its time, extrapolated linearly from
the largest size measured, would exceed --max-default-minutes; the output says so.
Goal: fast path at 100k in at most 3 minutes with NMI within 0.02 of the default.

`--devsets` instead prints one table over the S3 development sets in ../shared/external (BFCL multi-turn,
APIBench, AgentBench) and the embedded corpus (5k demo calls, seed 42): S3 automatic, S3 given the true k, and three
anchors on the same MiniLM embeddings in the same run (BERTopic default, BERTopic + k-means(k), MiniLM + k-means(k)):
mean NMI over --seeds seeds (3 by default; one seed moves a score by a few hundredths), the spread, and seconds per set
(embeddings cached, so the times are clustering only).

`--loso` chooses S3's defaults by leave-one-set-out over six development sets (the four above, and BFCL's multi-turn
steps by API classes and live requests by category, as chat logs): for each set in turn, the configuration of
`LOSO_GRID` with the best mean NMI (automatic and given k), or the least worst shortfall from the grid's best, on the
other sets, scored on the set left out, beside the shipped defaults and the best anchor on that set; then the worst
case over the sets left out. Each set's UMAP is computed once per seed and shared by the grid."""
import argparse, json, os, resource, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def masked_calls(n, seed):
    "The masked (CLEAN_SCHEMA) corpus of n calls and its gold sub-tasks, made once and cached."
    import polars as pl
    from slm_research.cluster import cache_dir
    from slm_research.corpus import CORPUS_VERSION, generate_corpus
    out = cache_dir() / "bench" / f"clean-n{n}-s{seed}-v{CORPUS_VERSION}.parquet"  # a new generator makes new calls
    d = generate_corpus(n, seed, progress=False)
    if not out.exists():
        from slm_research.capture import to_frame
        from slm_research.clean import clean
        out.parent.mkdir(parents=True, exist_ok=True)
        clean(to_frame(json.loads(l) for l in open(d / "calls.jsonl")), progress=False).write_parquet(out)
    return pl.read_parquet(out), pl.read_ndjson(d / "gold.jsonl").select("id", "subtask")


def one(n, mode, seed):
    import polars as pl
    from slm_research import cluster as C
    frame, gold = masked_calls(n, seed)
    cfg = C.ClusterConfig.fast(seed=seed) if mode == "fast" else C.ClusterConfig(seed=seed)
    C.get_embedder(cfg.embedder)  # model load (and static distillation, cached) outside the timing
    orig = C.embed
    C.embed = lambda texts, embedder="minilm", cache=None, progress=True: orig(texts, embedder, False, progress)
    t = time.perf_counter()
    if mode == "tfidf":
        labels = C.tfidf_kmeans_baseline(C.build_texts(frame), gold["subtask"].n_unique(), seed)
        assign = pl.DataFrame({"id": frame["id"], "cluster": labels})
    else:
        assign = C.cluster_calls(frame, cfg)
    secs = time.perf_counter() - t
    j = assign.join(gold, on="id")
    s = C.score_clusters(j["subtask"], j["cluster"])
    return dict(n=n, mode=mode, seconds=round(secs, 1), peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), **s)


DEVSETS = {"bfcl": "bfcl_multiturn_turn_domain.jsonl", "apibench": "apibench_domain.jsonl", "agentbench": "agentbench_env.jsonl"}
# OpenAI chat logs, clustered as S3 reads calls, labelled by a field of each line
CHAT_DEVSETS = {"bfcl-steps": ("bfcl_multiturn_calls.jsonl", lambda r: ",".join(sorted(r["involved_classes"]))),
                "bfcl-live": ("bfcl_live_calls.jsonl", lambda r: r["category"])}


def print_markdown(rows: list[dict], cols: list[str]) -> None:
    "`rows` as a Markdown table of the columns `cols`."
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows: print("| " + " | ".join(str(r[c]) for c in cols) + " |")


def devset(name, seed):
    "(frame, gold labels) of a development set; `corpus` is the embedded demo corpus (5k calls, seed 42, masked)."
    import polars as pl
    if name == "corpus":
        frame, g = masked_calls(5000, 42)
        return frame, frame.select("id").join(g, on="id", how="left")["subtask"].to_list()
    ext = Path(os.environ["SLM_SHARED"]) / "external" if os.environ.get("SLM_SHARED") else ROOT.parent / "shared" / "external"
    if name in CHAT_DEVSETS:
        from slm_research.capture import to_frame
        from slm_research.capture.importers import parse_lines
        file, label = CHAT_DEVSETS[name]
        lines = (ext / file).read_text().splitlines()
        frame = to_frame(parse_lines(lines, "openai", name))
        gold = {r["id"]: label(r) for r in map(json.loads, lines)}
        return frame, [gold[i] for i in frame["id"]]
    b = pl.read_ndjson(ext / DEVSETS[name]).with_row_index("n").with_columns(id=pl.col("n").cast(pl.String))
    return b, b["label"].to_list()


def anchors(texts, gold, seed):
    "NMI results of the three anchors on MiniLM embeddings of `texts` (BERTopic's UMAP seeded), with seconds each."
    from bertopic import BERTopic
    from sklearn.cluster import KMeans
    from umap import UMAP
    from slm_research import cluster as C
    k, emb, st = len(set(gold)), C.embed(texts, "minilm", progress=False), C.get_embedder("minilm").model
    umap = lambda: UMAP(n_neighbors=15, n_components=5, min_dist=0.0, metric="cosine", random_state=seed)
    runs = {"BERTopic default": lambda: BERTopic(embedding_model=st, umap_model=umap()).fit_transform(texts, emb)[0],
            "BERTopic + k-means(k)": lambda: BERTopic(embedding_model=st, umap_model=umap(),
                                                      hdbscan_model=KMeans(k, n_init=10, random_state=seed)).fit_transform(texts, emb)[0],
            "MiniLM + k-means(k)": lambda: KMeans(k, n_init=10, random_state=seed).fit_predict(emb)}
    out = {}
    for name, fn in runs.items():
        t = time.perf_counter(); labels = fn(); out[name] = (C.score_clusters(gold, labels), time.perf_counter() - t)
    return out


def devset_table(names, seeds):
    """One row per set: each method's mean NMI over `seeds` (S3's and the anchors' UMAP/k-means seeds alike), since a
    single seed moves these scores by a few hundredths; per-seed scores and the spread are kept in the JSON."""
    import statistics
    from slm_research import cluster as C
    methods = ["S3 automatic", "S3 given k", "BERTopic default", "BERTopic + k-means(k)", "MiniLM + k-means(k)"]
    rows = []
    for name in names:
        frame, gold = devset(name, seeds[0])
        k, t0 = len(set(gold)), time.perf_counter()
        C.embed_parts(C.build_parts(frame), "minilm", progress=False)  # embed (or read the cache) before any clock
        texts = frame["text"].to_list() if "text" in frame.columns else C.build_texts(frame)
        runs = {m: [] for m in methods}
        clusters = {"S3 automatic": [], "S3 given k": []}
        for seed in seeds:
            for label, kk in (("S3 automatic", None), ("S3 given k", k)):
                s = C.score_clusters(gold, C.cluster_calls(frame, C.ClusterConfig(k=kk, seed=seed))["cluster"])
                runs[label].append(s["nmi"]); clusters[label].append(s["n_clusters"])
            for label, (s, _) in anchors(texts, gold, seed).items(): runs[label].append(s["nmi"])
        row = dict(set=name, rows=len(frame), labels=k, seeds=list(seeds),
                   **{m: round(statistics.mean(v), 3) for m, v in runs.items()},
                   **{f"{m} per seed": v for m, v in runs.items()},
                   **{f"{m} spread": round(max(v) - min(v), 3) for m, v in runs.items()},
                   **{f"{m} clusters": c for m, c in clusters.items()})
        best = max(row[a] for a in methods[2:])
        row.update({"given k >= best anchor": row["S3 given k"] >= best,
                    "auto within 0.05 of given k": row["S3 automatic"] >= row["S3 given k"] - 0.05,
                    "seconds (set)": round(time.perf_counter() - t0, 1)})
        rows.append(row); print(json.dumps(row), flush=True)
    cols = ["set", "rows", "labels", *methods, "S3 automatic clusters", "S3 given k spread", "given k >= best anchor",
            "auto within 0.05 of given k", "seconds (set)"]
    print(f"mean NMI over seeds {list(seeds)}")
    print_markdown(rows, cols)
    return rows


# the defaults S3 ships, and the values leave-one-set-out chooses among
LOSO_GRID = {"tfidf_weight": (0.0, 0.25, 0.5), "min_auto_clusters": (2, 3, 5), "strong_split": (None, 0.25),
             "min_cluster_size": (None, 10), "k_split": (8, 15, 30)}
AUTO_KNOBS = ("tfidf_weight", "min_auto_clusters", "strong_split", "min_cluster_size")   # what automatic k reads
GIVEN_KNOBS = ("tfidf_weight", "min_cluster_size", "k_split")                             # what given k reads


def memoised_reducer():
    "`cluster.reduce_unique`, computed once per (points, reducer settings): the grid shares each set's UMAP."
    import hashlib
    from slm_research import cluster as C
    orig, memo = C.reduce_unique, {}
    def reduce(x, texts, cfg):
        key = (hashlib.sha1(x.tobytes()).hexdigest(), cfg.reducer, cfg.n_components, cfg.n_neighbors, cfg.seed)
        if key not in memo: memo[key] = orig(x, texts, cfg)
        return memo[key]
    C.reduce_unique = reduce


def loso_table(names, seeds):
    """Leave one set out: for each development set, the grid's configuration chosen on the other sets (by mean NMI,
    automatic and given k averaged, and by the least worst shortfall from the grid's best), scored on the one left out,
    beside S3's shipped defaults and the best anchor; then the worst case over the sets left out."""
    import itertools, statistics
    from slm_research import cluster as C
    memoised_reducer()
    configs = [dict(zip(LOSO_GRID, v)) for v in itertools.product(*LOSO_GRID.values())]
    shipped = {k: getattr(C.ClusterConfig(), k) for k in LOSO_GRID}
    assert shipped in configs, f"the shipped defaults {shipped} must be a point of the grid"
    score, best_anchor = {}, {}          # (set, config index) -> mean NMI over seeds of (auto, given k)
    for name in names:
        t0 = time.perf_counter()
        frame, gold = devset(name, seeds[0])
        k = len(set(gold))
        C.embed_parts(C.build_parts(frame), "minilm", progress=False)
        texts = frame["text"].to_list() if "text" in frame.columns else C.build_texts(frame)
        runs = {}
        def nmi(knobs, kk, seed):
            key = (tuple(knobs.items()), kk, seed)
            if key not in runs:
                runs[key] = C.score_clusters(gold, C.cluster_calls(frame, C.ClusterConfig(k=kk, seed=seed, **knobs))["cluster"])["nmi"]
            return runs[key]
        for i, c in enumerate(configs):
            auto = statistics.mean(nmi({k_: c[k_] for k_ in AUTO_KNOBS}, None, s) for s in seeds)
            given = statistics.mean(nmi({k_: c[k_] for k_ in GIVEN_KNOBS}, k, s) for s in seeds)
            score[name, i] = (auto, given)
        best_anchor[name] = max(statistics.mean(v) for v in zip(*[[s["nmi"] for s, _ in anchors(texts, gold, s).values()] for s in seeds]))
        print(json.dumps({"set": name, "runs": len(runs), "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    i_shipped = configs.index(shipped)
    both = {key: sum(v) / 2 for key, v in score.items()}
    top = {n: max(both[n, i] for i in range(len(configs))) for n in names}
    objectives = {"mean NMI": lambda i, rest: statistics.mean(both[n, i] for n in rest),
                  # the worst shortfall from the grid's best on any tuning set: a rule that one set needs is kept
                  "worst regret": lambda i, rest: -max(top[n] - both[n, i] for n in rest)}
    rows = []
    for objective, value in objectives.items():
        for out in names:
            rest = [n for n in names if n != out]
            chosen = max(range(len(configs)), key=lambda i: (round(value(i, rest), 6), i == i_shipped))  # ties: shipped
            rows.append({"objective": objective, "left out": out,
                         "chosen on the others": {k_: v for k_, v in configs[chosen].items() if v != shipped[k_]} or "shipped",
                         "auto (chosen)": round(score[out, chosen][0], 3), "given k (chosen)": round(score[out, chosen][1], 3),
                         "auto (shipped)": round(score[out, i_shipped][0], 3), "given k (shipped)": round(score[out, i_shipped][1], 3),
                         "best anchor": round(best_anchor[out], 3), "best in grid on it": round(top[out], 3)})
            r = rows[-1]
            r["given k >= anchor - 0.02"] = r["given k (chosen)"] >= r["best anchor"] - 0.02
            r["auto within 0.05 of given k"] = r["auto (chosen)"] >= r["given k (chosen)"] - 0.05
            print(json.dumps(r), flush=True)
    cols = list(rows[0])
    print(f"leave-one-set-out over {len(configs)} configurations, mean NMI over seeds {list(seeds)}; shipped: {shipped}")
    print_markdown(rows, cols)
    for objective in objectives:   # the worst case over the sets left out, not the mean
        rs = [r for r in rows if r["objective"] == objective]
        worst_given = min(rs, key=lambda r: r["given k (chosen)"] - r["best anchor"])
        worst_auto = min(rs, key=lambda r: r["auto (chosen)"] - r["given k (chosen)"])
        print(f"{objective}: worst given k - best anchor {worst_given['given k (chosen)'] - worst_given['best anchor']:+.3f} "
              f"({worst_given['left out']}); worst automatic - given k "
              f"{worst_auto['auto (chosen)'] - worst_auto['given k (chosen)']:+.3f} ({worst_auto['left out']})")
    grid = [{**c, **{f"{n} {m}": round(score[n, i][j], 4) for n in names for j, m in enumerate(("auto", "given k"))}}
            for i, c in enumerate(configs)]
    return {"rows": rows, "grid": grid, "shipped": shipped, "seeds": list(seeds)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-default-minutes", type=float, default=15.0)
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--devsets", nargs="*", default=None, help="the development-set table instead (default: all four sets)")
    ap.add_argument("--seeds", type=int, default=3, help="--devsets: seeds per method (0..seeds-1), scores averaged")
    ap.add_argument("--loso", nargs="*", default=None, help="leave-one-set-out over LOSO_GRID instead (default: all six sets)")
    a = ap.parse_args()
    if a.loso is not None:
        rows = loso_table(a.loso or [*DEVSETS, *CHAT_DEVSETS, "corpus"], list(range(a.seed, a.seed + a.seeds)))
        out_dir = ROOT / "bench" / "results"; out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench_cluster_loso.json").write_text(json.dumps(rows, indent=1)); sys.exit()
    if a.devsets is not None:
        rows = devset_table(a.devsets or [*DEVSETS, "corpus"], list(range(a.seed, a.seed + a.seeds)))
        out_dir = ROOT / "bench" / "results"; out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench_cluster_devsets.json").write_text(json.dumps(rows, indent=1)); sys.exit()
    if a.child:
        print(json.dumps(one(int(a.child[0]), a.child[1], a.seed))); sys.exit()
    results, notes = [], []
    for n in sorted(a.sizes):
        masked_calls(n, a.seed)  # generate + mask once, outside any timing
        for mode in ("tfidf", "fast", "default"):
            done = [r for r in results if r["mode"] == "default"]
            if mode == "default" and done:
                est = done[-1]["seconds"] * n / done[-1]["n"] / 60
                if est > a.max_default_minutes:
                    notes.append(f"n={n} default: skipped, extrapolated {est:.0f} min from n={done[-1]['n']} > --max-default-minutes {a.max_default_minutes:g}")
                    print(notes[-1], flush=True); continue
            out = subprocess.run([sys.executable, __file__, "--seed", str(a.seed), "--child", str(n), mode],
                                 capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if out.returncode: print(f"n={n} {mode} failed:\n{out.stderr[-2000:]}", flush=True); continue
            r = json.loads(out.stdout.strip().splitlines()[-1]); results.append(r); print(r, flush=True)
    by = {(r["n"], r["mode"]): r for r in results}
    for n in sorted(a.sizes):
        f, b = by.get((n, "fast")), by.get((n, "tfidf"))
        d = by.get((n, "default")) or next((by[(m, "default")] for m in sorted(a.sizes, reverse=True) if m < n and (m, "default") in by), None)
        if f and d:
            same = d["n"] == n
            notes.append(f"n={n}: fast {f['seconds']} s ({f['seconds'] / 60:.1f} min, {f['peak_rss_mb']} MB), NMI {f['nmi']} vs default "
                         + (f"{d['nmi']} ({d['seconds']} s; fast is {d['seconds'] / f['seconds']:.1f}x faster)" if same else f"{d['nmi']} at n={d['n']} (default not run at {n})")
                         + f", diff {f['nmi'] - d['nmi']:+.3f}; goal (<= 3 min, |diff| <= 0.02) "
                         + ("met" if f["seconds"] <= 180 and abs(f["nmi"] - d["nmi"]) <= 0.02 else "NOT met")
                         + (f"; TF-IDF baseline NMI {b['nmi']} ({b['seconds']} s)" if b else ""))
            print(notes[-1])
    out_dir = ROOT / "bench" / "results"; out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_cluster.json").write_text(json.dumps(dict(results=results, notes=notes), indent=1))
