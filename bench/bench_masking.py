"""S2 masking: speed and quality of today's engine against the engine of an earlier commit, measured in one run.

The baseline is `slm_research/clean.py` as it was at `--baseline-rev` (default: the engine that joined a record's
texts into one analyzer pass and analysed every copy of a repeated message), loaded from git beside the current
package; both engines run on the same machine in the same process, one after the other, so their ratio holds on a
shared machine where absolute numbers do not.

Speed (S2 calls/s through the frame step `clean`, engine built beforehand, warm word caches, analysis cache emptied
before each timed run; the best of `--repeat` runs):
- `../shared/external/bfcl_multiturn_calls.jsonl`: 1,142 steps of 200 multi-turn conversations (history repeats
  about 4x across a conversation's steps);
- a log whose history repeats about 16x: the BFCL conversations chained four or five at a time into longer ones
  and logged at every assistant step, as an agent's log grows.
Quality, both engines on the same texts:
- presidio-research synth v2 (`../shared/external/pii_presidio_synth_v2.jsonl`, 1,500 sentences labelled by others):
  per-label precision and recall (gold GPE counts as LOCATION, DOMAIN_NAME as URL), and the spans predicted on its
  rows that hold no PII (false alarms);
- the embedded corpus's gold (`--n` calls), each record masked as S2 masks it (per label; PASSWORD, API_KEY and
  ACCESS_TOKEN count as SECRET).
Presidio's offline configuration (no_op NLP engine, pattern recognizers) is scored beside them.

    .venv/bin/python bench/bench_masking.py [--baseline-rev REV] [--repeat 3] [--n 600] [--seed 0]
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import polars as pl

from slm_research import clean as current
from slm_research.clean import files as clean_files   # `_as_call`: a JSONL line as a call record
from slm_research.capture import to_frame
from slm_research.corpus import generate_corpus, text_fields

BASELINE_REV = "5b776bd"   # the last commit before each message was analysed on its own and once a run
GOLD_MAP = {"GPE": "LOCATION", "DOMAIN_NAME": "URL"}
SECRET_MAP = {"PASSWORD": "SECRET", "API_KEY": "SECRET", "ACCESS_TOKEN": "SECRET"}


def shared_external() -> Path:
    env = os.environ.get("SLM_SHARED")
    return Path(env)/"external" if env else ROOT.parent/"shared"/"external"


def baseline_module(rev: str):
    "`slm_research/clean.py` at `rev`, imported as `slm_research._clean_baseline` (its relative imports resolve here)."
    source = subprocess.run(["git", "show", f"{rev}:slm_research/clean.py"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bench-masking-"))/"_clean_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("slm_research._clean_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def empty_caches(engine) -> None:
    "Forget every analysis kept by an engine (today's run-long cache; the baseline's scans of tool definitions)."
    getattr(engine, "_cache", {}).clear()
    engine.__dict__.pop("_developer_scans", None)


def bfcl_calls() -> list[dict]:
    path = shared_external()/"bfcl_multiturn_calls.jsonl"
    return [clean_files._as_call(json.loads(line), f"{path.name}:{i}") for i, line in enumerate(path.read_text().splitlines(), 1)]


def repeated_calls(chain=(4, 5)) -> list[dict]:
    """BFCL's conversations (the last step of each, which holds the whole history) chained `chain` at a time, in turn,
    into longer conversations, each logged at every assistant message with the history before it: a growing log."""
    path = shared_external()/"bfcl_multiturn_calls.jsonl"
    last = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["user"] not in last or len(r["messages"]) > len(last[r["user"]]["messages"]): last[r["user"]] = r
    convs, calls, k, c = list(last.values()), [], 0, 0
    while k < len(convs):
        n = chain[c % len(chain)]
        group, k, c = convs[k:k + n], k + n, c + 1
        msgs = [m for g in group for m in g["messages"]]
        for j, m in enumerate(msgs):
            if m["role"] != "assistant": continue
            calls.append(clean_files._as_call({"id": f"chain{c}-s{j}", "session_id": f"chain{c}", "user_id": group[0]["user"],
                                           "timestamp": f"2025-01-01T00:{c // 60:02d}:{c % 60:02d}.{j:06d}Z",
                                           "messages": msgs[:j + 1], "tools": group[0]["tools"]}, f"chain{c}:{j}"))
    return calls


def repetition(frame: pl.DataFrame) -> float:
    "Characters of messages over characters of distinct messages."
    total, distinct = 0, {}
    for msgs in frame["messages"]:
        for m in json.loads(msgs):
            t = json.dumps(m, sort_keys=True)
            total += len(t); distinct[t] = len(t)
    return total / sum(distinct.values())


def speed(name: str, frame: pl.DataFrame, engines: dict, repeat: int) -> dict:
    "Calls/s of each engine's `clean` on `frame` (best of `repeat`, caches emptied), and how many calls come out the same."
    out, masked = {"calls": frame.height, "history_repetition": round(repetition(frame), 1)}, {}
    for who, (mod, engine) in engines.items():
        mod.clean(frame[:20], engine=engine, progress=False)   # warm-up: lazy imports, word caches
    times = {who: [] for who in engines}
    for _ in range(repeat):
        for who, (mod, engine) in engines.items():
            empty_caches(engine)
            t0 = time.perf_counter()
            masked[who] = mod.clean(frame, engine=engine, progress=False)
            times[who].append(time.perf_counter() - t0)
    for who in engines:
        out[f"{who}_calls_per_s"] = round(frame.height / min(times[who]), 1)
    out["speedup"] = round(min(times["baseline"]) / min(times["current"]), 2)
    same = sum(a == b for a, b in zip(masked["baseline"]["messages"], masked["current"]["messages"]))
    out["same_masked_messages"] = f"{same}/{frame.height}"
    print(f"{name}: {json.dumps(out)}", flush=True)
    return out


def per_label(table: pl.DataFrame) -> dict:
    rows = [r for r in table.iter_rows(named=True) if r["n_gold"] or r["n_pred"]]
    n_gold = sum(r["n_gold"] for r in rows)
    return {"overall_recall": round(sum((r["recall"] or 0) * r["n_gold"] for r in rows) / max(n_gold, 1), 3),
            "labels": {r["label"]: {"n_gold": r["n_gold"], "n_pred": r["n_pred"],
                                    "recall": None if r["recall"] is None else round(r["recall"], 3),
                                    "precision": None if r["precision"] is None else round(r["precision"], 3)}
                       for r in sorted(rows, key=lambda r: -r["n_gold"])}}


def synth_v2(engines: dict) -> dict:
    path = shared_external()/"pii_presidio_synth_v2.jsonl"
    if not path.exists(): return {"skipped": f"{path} is absent"}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    gold = [r["spans"] for r in rows]
    empty = [i for i, g in enumerate(gold) if not g]
    out = {"n_texts": len(rows), "n_without_pii": len(empty)}
    preds = {"presidio_pattern_only": [current.presidio_pattern_only_results(r["text"]) for r in rows]}
    for who, (mod, engine) in engines.items():
        preds[who] = [[{"start": x.start, "end": x.end, "label": x.entity_type} for x in engine.analyze(r["text"])] for r in rows]
    for who, pred in preds.items():
        out[who] = per_label(current.score_spans(gold, pred, GOLD_MAP))
        out[who]["false_alarms_without_pii"] = sum(len(pred[i]) for i in empty)
    return out


def embedded(engines: dict, n: int, seed: int) -> dict:
    "The embedded corpus's gold, each engine masking the records as S2 does (the baseline one record after another)."
    corpus = generate_corpus(n, seed, progress=False)
    records = [json.loads(line) for line in (corpus/"calls.jsonl").read_text().splitlines()]
    gold = {g["id"]: g["pii"] for g in map(json.loads, (corpus/"gold.jsonl").read_text().splitlines())}
    results = {}
    base_mod, base = engines["baseline"]
    conv = {}
    results["baseline"] = [base_mod.mask_record(base, r, conv.setdefault(r["session_id"], base_mod.Placeholders()))[1]
                           for r in records]
    results["current"] = [m[1] for m in current.mask_records(engines["current"][1], records)]
    out = {"n_calls": len(records)}
    for who, ents in results.items():
        G, P = [], []
        for r, e in zip(records, ents):
            g = gold.get(r["id"], [])
            for f in {x["field"] for x in g} | {x["field"] for x in e}:
                G.append([x for x in g if x["field"] == f]); P.append([x for x in e if x["field"] == f])
        out[who] = per_label(current.score_spans(G, P, SECRET_MAP))
    G, P = [], []
    for r in records:
        g = gold.get(r["id"], [])
        for f, text in text_fields(r):
            G.append([x for x in g if x["field"] == f]); P.append(current.presidio_pattern_only_results(text))
    out["presidio_pattern_only"] = per_label(current.score_spans(G, P, SECRET_MAP))
    return out


def main(rev: str, repeat: int, n: int, seed: int) -> dict:
    base_mod = baseline_module(rev)
    t0 = time.perf_counter()
    engines = {"baseline": (base_mod, base_mod.MaskingEngine(base_mod.CleanConfig(seed=seed))),
               "current": (current, current.MaskingEngine(current.CleanConfig(seed=seed)))}
    result = {"baseline_rev": rev, "engines_built_s": round(time.perf_counter() - t0, 1),
              "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start (shared)"}
    if (shared_external()/"bfcl_multiturn_calls.jsonl").exists():
        result["bfcl_multiturn"] = speed("bfcl_multiturn", to_frame(bfcl_calls()), engines, repeat)
        result["repeated_16x"] = speed("repeated_16x", to_frame(repeated_calls()), engines, repeat)
    result["synth_v2"] = synth_v2(engines)
    result["embedded_gold"] = embedded(engines, n, seed)
    out = ROOT/"bench"/"results"/"masking.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--n", type=int, default=600, help="embedded corpus calls scored against its gold")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    main(a.baseline_rev, a.repeat, a.n, a.seed)
