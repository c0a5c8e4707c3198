"""S5 on long multi-turn agent steps, with and without the heads stripped, measured in one run.

BFCL's multi-turn steps carry about 15,700 characters of tool schemas in every call, and the whole conversation so far.
For one cluster (the largest S3 finds), this bench times S5 two ways on the same calls, the same base and the same
training steps:

- **stripped** (S5 today): the specialist learns the cluster's heads (`heads.plan_heads`) and reads the latest turns
  of the conversation within `max_length`; the base, zero-shot, reads the head once (`slm.HeadCache`) and the same
  turns, and stops once it cannot reach the gate.
- **whole prompts** (S5 before): no head stripped; training examples cut in the middle to `max_length`; zero-shot and
  adapter scoring read each whole prompt up to the model's context, as S5 scored before. That path takes tens of
  seconds a call here, so it scores `--n-before` calls and its seconds per call are reported; its time for the scored
  calls of the stripped path is extrapolated from them (and labelled so).

Reports tokens per training example, training seconds, zero-shot and adapter seconds per call, and S5 seconds per
cluster, with the machine's LoRA tokens/s. Writes bench/results/s5_heads.json.

    .venv/bin/python bench/bench_s5_heads.py [--steps 30] [--n-eval 96] [--n-before 8]
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent


def prepare(logs: Path, folder: Path):
    "S1-S4 on the log into `folder`; returns the workspace."
    from slm_research.capture import CaptureConfig, capture_to_files, export_frame
    from slm_research.clean import CleanConfig, clean_to_files
    from slm_research.cluster import ClusterConfig, cluster_to_files
    from slm_research.selection import select_to_files
    from slm_research.workspace import Workspace
    ws = Workspace(folder)
    s1 = capture_to_files(ws, CaptureConfig(logs=str(logs), format="openai"))
    clean_to_files(ws, CleanConfig(), export_frame(s1.store), progress=False)
    cluster_to_files(ws, ClusterConfig(seed=0), ws.read_calls())
    select_to_files(ws)
    return ws


def stripped_path(ws, cluster: int, cfg) -> dict:
    "S5 as it runs today, on one cluster."
    from slm_research.finetune import finetune_cluster
    t0 = time.perf_counter()
    row = finetune_cluster(ws.cluster_frame(), cluster, "", cfg, ws, 0.0)
    seconds = time.perf_counter() - t0
    n_scored = row["n_calibration"] + row["n_test"]
    return {"tokens_per_example": row["tokens_per_example"], "head_tokens": row["head_tokens"],
            "train_seconds": row["train_seconds"], "zero_shot_seconds": row["zero_shot_seconds"],
            "zero_shot_calls": row["base_n"], "score_seconds": row["score_seconds"], "scored_calls": n_scored,
            "tokens_per_s": row["tokens_per_s"], "s5_seconds": seconds, "adapter_score": row.get("adapter_score"),
            "coverage": row.get("coverage"), "n_train": row["n_train"]}


def whole_prompt_path(ws, cluster: int, cfg, n_before: int, out_dir: Path) -> dict:
    "S5 as it ran before: no head stripped, prompts cut in the middle for training and read whole for scoring."
    from slm_research import slm
    from slm_research.finetune import _scored_split, answer_budget
    from slm_research.heads import HeadPlan
    from slm_research.scoring import cluster_profile, score_calls
    from slm_research.training import answered, load_adapter, train_adapter
    from slm_research.workspace import evidence_split
    rows = evidence_split(answered(ws.cluster_frame().filter(pl.col("cluster") == cluster)), cfg.max_train_calls,
                          cfg.max_train_share, cfg.gate.calibration_share, cfg.seed)
    model, tok = slm.load_base(cfg.base)
    plan, profile = HeadPlan(), cluster_profile(rows)
    budget = answer_budget(rows, tok, cfg.max_new_tokens, False)
    _, test = _scored_split(rows, cfg)
    few = test.head(n_before)
    t0 = time.perf_counter()
    score_calls(model, tok, few, profile, plan, zero_shot=True, max_new_tokens=budget, max_prompt_tokens=None,
                batch_size=cfg.eval_batch_size)
    zero = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = train_adapter(rows, cfg, out_dir, plan, answer_tokens=budget)
    train = time.perf_counter() - t1
    from slm_research.training import sft_dataset
    ds = sft_dataset(rows.filter(pl.col("split") == "train"), tok, cfg.max_length, answer_tokens=budget)
    adapter, atok = load_adapter(out_dir, merge=True)
    t2 = time.perf_counter()
    score_calls(adapter, atok, few, profile, plan, max_new_tokens=budget, max_prompt_tokens=None,
                batch_size=cfg.eval_batch_size)
    score = time.perf_counter() - t2
    return {"tokens_per_example": sum(map(len, ds["input_ids"])) / len(ds), "train_seconds": train,
            "zero_shot_seconds_per_call": zero / few.height, "score_seconds_per_call": score / few.height,
            "calls_timed": few.height, "tokens_per_s": res.tokens_per_s,
            "prompt_tokens_read": sum(len(tok(slm.render_prompt(tok, json.loads(m), json.loads(t)),
                                               add_special_tokens=False)["input_ids"])
                                      for m, t in zip(few["messages"], few["tools"])) / few.height}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--logs", type=Path, default=ROOT.parent/"shared"/"external"/"bfcl_multiturn_calls.jsonl")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--n-eval", type=int, default=96)
    ap.add_argument("--n-before", type=int, default=8)
    ap.add_argument("--workspace", type=Path, default=None, help="A workspace with S1-S4 done (default: run them)")
    a = ap.parse_args()
    from slm_research.finetune import FinetuneConfig
    from slm_research.workspace import Workspace
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        ws = Workspace(a.workspace) if a.workspace else prepare(a.logs, Path(d)/"ws")
        s14 = time.perf_counter() - t
        sizes = ws.cluster_frame().group_by("cluster").len().sort("len", descending=True)
        cluster = int(sizes["cluster"][0])
        cfg = FinetuneConfig(steps=a.steps, n_eval=a.n_eval, seed=0)
        after = stripped_path(ws, cluster, cfg)
        before = whole_prompt_path(ws, cluster, FinetuneConfig(steps=a.steps, n_eval=a.n_eval, seed=0,
                                                               strip_heads=False), a.n_before, Path(d)/"before")
    n_scored, n_zero = after["scored_calls"], after["zero_shot_calls"]
    before["s5_seconds_extrapolated"] = (before["train_seconds"] + n_zero * before["zero_shot_seconds_per_call"]
                                         + n_scored * before["score_seconds_per_call"])
    out = {"logs": str(a.logs), "cluster": cluster, "cluster_calls": int(sizes["len"][0]), "s1_s4_seconds": s14,
           "steps": a.steps, "stripped": after, "whole_prompts": before,
           "ratio_tokens_per_example": before["tokens_per_example"] / after["tokens_per_example"],
           "ratio_s5_seconds": before["s5_seconds_extrapolated"] / after["s5_seconds"]}
    (ROOT/"bench"/"results").mkdir(parents=True, exist_ok=True)
    (ROOT/"bench"/"results"/"s5_heads.json").write_text(json.dumps(out, indent=1))
    print(f"cluster {cluster} ({out['cluster_calls']} calls), {a.steps} steps, LoRA {after['tokens_per_s']:.0f} tokens/s")
    print(f"{'':24}{'stripped':>12}{'whole prompts':>16}")
    print(f"{'tokens per example':24}{after['tokens_per_example']:>12.0f}{before['tokens_per_example']:>16.0f}")
    print(f"{'training s':24}{after['train_seconds']:>12.0f}{before['train_seconds']:>16.0f}")
    print(f"{'zero-shot s per call':24}{after['zero_shot_seconds'] / max(n_zero, 1):>12.2f}"
          f"{before['zero_shot_seconds_per_call']:>16.2f}")
    print(f"{'adapter s per call':24}{after['score_seconds'] / max(n_scored, 1):>12.2f}"
          f"{before['score_seconds_per_call']:>16.2f}")
    print(f"{'S5 s per cluster':24}{after['s5_seconds']:>12.0f}{before['s5_seconds_extrapolated']:>15.0f}*")
    print(f"* extrapolated from {before['calls_timed']} calls timed: {n_zero} zero-shot and {n_scored} scored calls, "
          f"as the stripped path scored. Ratios: tokens/example x{out['ratio_tokens_per_example']:.1f}, "
          f"S5 seconds x{out['ratio_s5_seconds']:.1f}")


if __name__ == "__main__":
    main()
