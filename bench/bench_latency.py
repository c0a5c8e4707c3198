"""CPU decode latency per generated token of randomly initialised models built from public configs.

    .venv/bin/python bench/bench_latency.py [--sizes 135M 360M 1.7B] [--tokens 16] [--threads 1]

Each size is timed in this run and reported as a ratio against the baseline (the first size, by
default SmolLM2-135M), beside its parameter and FLOP ratios: a ratio well above the parameter
ratio means the larger model runs below the machine's memory bandwidth, one well below means the
small model is overhead-bound. Results go to bench/results/latency-<timestamp>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from slm_research.models import (cpu_supports_bf16, find_config, flops_per_token, load_arch_configs,
                                 measure_decode_latency, param_count)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["135M", "360M", "1.7B"], help="names or size labels from data/raw/model_configs.json; the first is the baseline")
    ap.add_argument("--tokens", type=int, default=16, help="timed decode steps per model")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    configs = load_arch_configs()
    rows = []
    for key in args.sizes:
        cfg = find_config(key, configs)
        r = measure_decode_latency(cfg, n_new_tokens=args.tokens, prompt_len=args.prompt_len, n_warmup=args.warmup,
                                   dtype=args.dtype, seed=args.seed, threads=args.threads)
        rows.append(dict(name=cfg.name, params=r.params, gflops_per_token=flops_per_token(cfg) / 1e9, dtype=r.dtype,
                         ms_per_token=r.ms_per_token, ms_median=r.ms_median, threads=r.threads))
        print(f"  {cfg.name:<16} {r.ms_per_token:9.1f} ms/token (best of {args.tokens}; median {r.ms_median:.1f})", flush=True)

    base = rows[0]
    print(f"\nbaseline: {base['name']} ({base['dtype']}, threads={base['threads']}, bf16 native: {cpu_supports_bf16()})")
    print(f"{'model':<16} {'ms/token':>9} {'latency x':>10} {'params x':>9} {'FLOPs x':>8}")
    for r in rows:
        r.update(latency_ratio=r["ms_per_token"] / base["ms_per_token"], params_ratio=r["params"] / base["params"],
                 flops_ratio=r["gflops_per_token"] / base["gflops_per_token"])
        print(f"{r['name']:<16} {r['ms_per_token']:9.1f} {r['latency_ratio']:10.2f} {r['params_ratio']:9.2f} {r['flops_ratio']:8.2f}")

    out = Path(__file__).resolve().parent / "results" / f"latency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(baseline=base["name"], args=vars(args), machine=platform.machine(),
                                   processor=platform.processor(), results=rows), indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
