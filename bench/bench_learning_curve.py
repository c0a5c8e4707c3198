"""How many training calls a cluster's specialist needs: the learning curve behind S5's `max_train_calls`.

For the clusters S5 takes first (`finetune.finetune_order`) in each workspace given, the bench holds one split fixed
(`workspace.evidence_split` with the largest size: its training pool, and every other call scored), trains an adapter
on the first k calls of the pool (whole conversations) for each k, with the same steps, and scores every adapter on the
same calls: agreement on all test calls, and with the acceptance threshold chosen on the calibration calls, coverage
and agreement on the calls it accepts. Every call S5 does not train on is evidence for the gate, so the default is the
smallest k whose winnable share (coverage, where the accepted agreement reaches the gate's rate) is within `--slack`
of the best k's on every cluster. Writes bench/results/learning_curve.json.

    .venv/bin/python bench/bench_learning_curve.py --workspace corpus=DIR --workspace bfcl_live=DIR ... \
        [--sizes 16 32 64 128] [--clusters 2] [--steps 30] [--n-eval 160]

A workspace is a folder with S1-S4 done (`slm-research pipeline` stops after S4 with `--max-clusters` ... or the
notebooks 10-13); `bench_s5_heads.prepare` makes one from a log file.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent


def curve(ws, cluster: int, sizes: list[int], cfg, folder: Path) -> list[dict]:
    "One cluster's points: per training size, agreement, coverage and accepted agreement on the same scored calls."
    from slm_research import slm
    from slm_research.finetune import _scored_split, answer_budget, _score_kw
    from slm_research.gate import choose_threshold, verify
    from slm_research.heads import plan_heads
    from slm_research.scoring import cluster_profile, score_calls, summarise
    from slm_research.training import answered, load_adapter, train_adapter
    from slm_research.workspace import evidence_split
    rows = evidence_split(answered(ws.cluster_frame().filter(pl.col("cluster") == cluster)), max(sizes),
                          cfg.max_train_share, cfg.gate.calibration_share, cfg.seed)
    pool = rows.filter(pl.col("split") == "train")
    sessions = pool["session"].fill_null(pool["id"]).unique(maintain_order=True).to_list()
    calib, test = _scored_split(rows, cfg)
    _, tok = slm.load_base(cfg.base)
    out = []
    for k in sizes:
        keep, n = [], 0
        for s in sessions:
            if n >= k: break
            keep.append(s); n += pool.filter(pl.col("session").fill_null(pl.col("id")) == s).height
        train = pool.filter(pl.col("session").fill_null(pl.col("id")).is_in(keep))
        frame = pl.concat([train, rows.filter(pl.col("split") != "train")])
        plan, profile = plan_heads(train), cluster_profile(frame)
        budget = answer_budget(frame, tok, cfg.max_new_tokens, plan.strip)
        t0 = time.perf_counter()
        train_adapter(frame, cfg, folder/f"c{cluster}-k{k}", plan, answer_tokens=budget)
        model, atok = load_adapter(folder/f"c{cluster}-k{k}", merge=True)
        scored = score_calls(model, atok, pl.concat([calib, test]), profile, plan, **_score_kw(cfg, budget))
        s_cal, s_test = (scored.filter(pl.col("id").is_in(f["id"].implode())) for f in (calib, test))
        chosen = choose_threshold(s_cal["confidence"].to_list(), s_cal["agreement"].to_list(), cfg.gate)
        ev = verify(s_test["confidence"].to_list(), s_test["agreement"].to_list(), chosen["threshold"], cfg.gate)
        a = summarise(s_test)
        out.append({"cluster": cluster, "k": k, "n_train": train.height, "n_test": test.height,
                    "agreement": a["score"], "agreement_interval": a["interval"], "coverage": ev["coverage"],
                    "coverage_interval": ev["coverage_interval"], "accepted_agreement": ev["accepted_agreement"],
                    "winnable": ev["coverage"] if (ev["accepted_agreement"] or 0) >= cfg.gate.threshold else 0.0,
                    "seconds": time.perf_counter() - t0})
        print(json.dumps(out[-1]), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", action="append", required=True, help="name=folder with S1-S4 done (repeatable)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--clusters", type=int, default=2, help="The first N clusters in S5's order, per workspace")
    ap.add_argument("--pick", action="append", default=[], help="name=c1,c2: these clusters of that workspace instead")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--n-eval", type=int, default=160)
    ap.add_argument("--slack", type=float, default=0.05)
    a = ap.parse_args()
    from slm_research.finetune import FinetuneConfig, finetune_order
    from slm_research.workspace import Workspace
    cfg = FinetuneConfig(steps=a.steps, n_eval=a.n_eval, max_train_share=0.5, seed=0)
    points = []
    with tempfile.TemporaryDirectory() as d:
        for spec in a.workspace:
            name, folder = spec.split("=", 1)
            ws = Workspace(Path(folder))
            picked = {n: [int(c) for c in cs.split(",")] for n, cs in (p.split("=", 1) for p in a.pick)}
            order = picked.get(name) or finetune_order(ws.cluster_frame(), [c["cluster"] for c in ws.selected_clusters()],
                                                       cfg)[:a.clusters]
            for c in order:
                points += [{"set": name, **p} for p in curve(ws, c, a.sizes, cfg, Path(d)/name)]
    frame = pl.DataFrame(points)
    best = frame.group_by("set", "cluster").agg(best=pl.col("winnable").max())
    ok = frame.join(best, on=["set", "cluster"]).with_columns(ok=pl.col("winnable") >= pl.col("best") - a.slack)
    per_k = ok.group_by("k").agg(pl.col("ok").all()).sort("k")
    chosen = next((k for k, good in per_k.iter_rows() if good), max(a.sizes))
    (ROOT/"bench"/"results").mkdir(parents=True, exist_ok=True)
    (ROOT/"bench"/"results"/"learning_curve.json").write_text(json.dumps({"points": points, "chosen": chosen,
                                                                            "slack": a.slack, "steps": a.steps}, indent=1))
    with pl.Config(tbl_rows=-1, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        print(frame.select("set", "cluster", "k", "n_train", "n_test", "agreement", "coverage", "accepted_agreement",
                           "winnable", "seconds"))
    print(f"smallest size within {a.slack} of the best winnable share on every cluster: {chosen}")


if __name__ == "__main__":
    main()
