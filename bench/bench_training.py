"""Training throughput (tokens/s) of LoRA vs full fine-tuning on the stand-in base, on this CPU.

Baseline: full fine-tuning of the same base on the same data, measured in the same run. Writes
bench/results/training.json and prints the ratio.
    .venv/bin/python bench/bench_training.py [--preset tiny] [--steps 30]
"""
import argparse
import json
import tempfile
from pathlib import Path

import polars as pl

from slm_research.finetune import (FinetuneConfig, base_config, build_stand_in_base, default_threads, finetune,
                                   split_by_session, synthetic_calls)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    calls = split_by_session(synthetic_calls(400, seed=a.seed), seed=a.seed)
    out = {"preset": a.preset, "steps": a.steps, "batch_size": a.batch_size, "threads": default_threads(), "runs": {}}
    with tempfile.TemporaryDirectory() as d:
        base = build_stand_in_base(calls.filter(pl.col("split") == "train"), base_config(a.preset, steps=5, seed=a.seed), Path(d)/"base")
        for method, lr in (("full", 1e-3), ("lora", 1e-2), ("dora", 1e-2)):
            cfg = FinetuneConfig(base=str(base), method=method, steps=a.steps, lr=lr, batch_size=a.batch_size,
                                 save_steps=10 * a.steps, seed=a.seed)
            res = finetune(calls, cfg, Path(d)/method)
            out["runs"][method] = {"tokens_per_s": res.tokens_per_s, "trainable_params": res.trainable_params,
                                   "total_params": res.total_params, "seconds": res.train_seconds}
    full = out["runs"]["full"]["tokens_per_s"]
    out["ratio_vs_full"] = {m: r["tokens_per_s"] / full for m, r in out["runs"].items()}
    dest = Path(__file__).parent/"results"/"training.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1))
    for m, r in out["runs"].items():
        print(f"{m:5s} {r['tokens_per_s']:9.0f} tokens/s  x{out['ratio_vs_full'][m]:.2f} vs full  "
              f"({r['trainable_params']:,}/{r['total_params']:,} trainable)")
    print(f"-> {dest}")


if __name__ == "__main__":
    main()
