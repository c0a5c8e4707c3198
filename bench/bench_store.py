"""The S1 store's bytes per call and import speed: segment format 2 (repeated messages and tools stored once per
segment, one deflate stream) against format 1 (each record compressed on its own, the format before), same run.

    .venv/bin/python bench/bench_store.py [--corpus-records 3000] [--repeat 3] [--max-records 10000]

Logs: `bfcl_multiturn_calls.jsonl` (`../shared/external/`, read in place: 1,142 steps of 200 multi-turn
conversations, each step repeating the conversation so far and the tool schemas) and the embedded demo corpus
(`--corpus-records` calls, seed 42, as `make demo` captures it).
For each log and format: `import_file` into a fresh store (parse, validate, pseudonymise, compress, encrypt, append),
timed `--repeat` times with the formats alternating (the machine is shared: the best run of each counts), then the
bytes of the segments per call, and `export_frame` of both stores, which must give the same frame.
Goal: format 2 at most a quarter of format 1's bytes per call on the multi-turn file.
Results go to bench/results/store-<timestamp>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from slm_research.capture.importers import import_file
from slm_research.capture.keys import Pseudonymizer, generate_keys, load_private_keys
from slm_research.capture.store import SegmentWriter, export_frame, list_segments
from slm_research.corpus import generate_corpus

ROOT = Path(__file__).resolve().parent.parent
FORMATS = {1: "format 1 (before)", 2: "format 2"}


def shared_external() -> Path:
    env = os.environ.get("SLM_SHARED")
    return Path(env)/"external" if env else ROOT.parent/"shared"/"external"


def run_import(path: Path, fmt: str, store: Path, keys: dict, segment_format: int, max_records: int) -> tuple[float, int]:
    "Seconds to import `path` into a new store, and the records written."
    t0 = time.perf_counter()
    with SegmentWriter(store, keys["public"], Pseudonymizer(keys["pseudonym"]), max_records, format=segment_format) as w:
        stats = import_file(path, fmt, w)
    return time.perf_counter() - t0, stats.n_records


def measure(name: str, path: Path, fmt: str, keys: dict, tmp: Path, repeat: int, max_records: int) -> dict:
    seconds, stores = {f: [] for f in FORMATS}, {}
    for k in range(repeat):
        for f in (FORMATS if k % 2 == 0 else reversed(list(FORMATS))):   # alternate which format goes first
            store = tmp/f"{name}-f{f}-{k}"
            secs, n = run_import(path, fmt, store, keys, f, max_records)
            seconds[f].append(secs); stores[f] = store
    priv = load_private_keys(keys["private"])
    t0 = time.perf_counter(); frame1 = export_frame(stores[1], priv, strict=True); export1 = time.perf_counter() - t0
    t0 = time.perf_counter(); frame2 = export_frame(stores[2], priv, strict=True); export2 = time.perf_counter() - t0
    if not frame2.equals(frame1): raise SystemExit(f"{name}: format 2 exports another frame than format 1")
    size = {f: sum(p.stat().st_size for p in list_segments(stores[f])) for f in FORMATS}
    rate = {f: n / min(seconds[f]) for f in FORMATS}
    return dict(log=str(path), calls=n, json_bytes_per_call=path.stat().st_size / n,
                bytes_per_call={f: size[f] / n for f in FORMATS}, bytes_ratio=size[2] / size[1],
                import_calls_per_s={f: rate[f] for f in FORMATS}, import_seconds_runs={f: seconds[f] for f in FORMATS},
                import_speed_ratio=rate[2] / rate[1], export_speed_ratio=export1 / export2,
                segments={f: len(list_segments(stores[f])) for f in FORMATS}, frames_identical=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus-records", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-records", type=int, default=10_000, help="records per segment (the writer's default)")
    args = ap.parse_args(argv)
    logs = {"bfcl_multiturn": (shared_external()/"bfcl_multiturn_calls.jsonl", "openai"),
            "demo_corpus": (generate_corpus(args.corpus_records, 42)/"calls.jsonl", "raw")}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        keys = generate_keys(tmp/"keys")
        results = {name: measure(name, path, fmt, keys, tmp, args.repeat, args.max_records) for name, (path, fmt) in logs.items()}
    result = dict(
        baseline="segment format 1 (one zlib-compressed record per frame: the store as it was), written by the same "
                 "SegmentWriter with format=1 in the same run",
        caveat="2 CPU cores shared with other work: speed ratios are the best of --repeat alternating runs",
        repeat=args.repeat, max_records=args.max_records, logs=results,
        machine=dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count(), load_avg=os.getloadavg()),
    )
    out = ROOT/"bench"/"results"/f"store-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for name, r in results.items():
        b, c = r["bytes_per_call"], r["import_calls_per_s"]
        goal = " (goal <= 0.25)" if name == "bfcl_multiturn" else ""
        print(f"{name}: {r['calls']} calls, {r['json_bytes_per_call']:,.0f} bytes of JSON per call; store bytes per call "
              f"{b[1]:,.0f} -> {b[2]:,.0f} (ratio {r['bytes_ratio']:.3f}{goal}); import {c[1]:,.0f} -> {c[2]:,.0f} calls/s "
              f"(x{r['import_speed_ratio']:.2f}); export x{r['export_speed_ratio']:.2f}; frames identical")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; results: {out}")
    return result


if __name__ == "__main__":
    main()
