"""S2 masking speed and recall against Presidio's offline configuration, measured in the same run.

Baseline: Presidio `AnalyzerEngine` with the `no_op` NLP engine and its predefined recognizers, plus its
`AnonymizerEngine` (replace), run on every text field of a call. Ours: `slm_research.clean.mask_record`.
Goal: at least 2x the baseline's calls/s while also catching names and addresses.

    .venv/bin/python bench/bench_masking.py [--n 1000] [--seed 0] [--repeat 3]
"""
import argparse
import json
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from presidio_anonymizer import AnonymizerEngine

from slm_research.clean import MaskingEngine, Placeholders, mask_record, presidio_pattern_only, score_spans, _entity
from slm_research.corpus import generate_corpus, text_fields

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {"PASSWORD": "SECRET", "API_KEY": "SECRET", "ACCESS_TOKEN": "SECRET"}


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter(); out = fn(); times.append(time.perf_counter() - t0)
    return min(times), out


def main(n: int, seed: int, repeat: int):
    corpus = generate_corpus(n, seed)
    records = [json.loads(l) for l in (corpus/"calls.jsonl").read_text().splitlines()]
    gold = {g["id"]: g["pii"] for g in map(json.loads, (corpus/"gold.jsonl").read_text().splitlines())}
    n_chars = sum(len(t) for r in records for _, t in text_fields(r))

    baseline, anonymizer = presidio_pattern_only(), AnonymizerEngine()
    baseline.analyze("warm-up a@b.org http://x.org", language="en")
    engine = MaskingEngine()

    def run_baseline():
        out = []
        for r in records:
            for field, text in text_fields(r):
                res = baseline.analyze(text, language="en")
                anonymizer.anonymize(text=text, analyzer_results=res)
                out.append((r["id"], field, [_entity(x) for x in res]))
        return out

    def run_ours():
        out, conv = [], {}
        for r in records:
            _, ents = mask_record(engine, r, conv.setdefault(r["session_id"], Placeholders()))
            out.append((r["id"], ents))
        return out

    t_base, base_out = best_of(run_baseline, repeat)
    t_ours, ours_out = best_of(run_ours, repeat)

    def per_field(pairs):
        G, P = [], []
        for rid, field, ents in pairs:
            G.append([g for g in gold[rid] if g["field"] == field]); P.append(ents)
        return score_spans(G, P, SECRETS)
    base_score = per_field(base_out)
    ours_score = per_field([(rid, f, [e for e in ents if e["field"] == f]) for rid, ents in ours_out
                            for f in {g["field"] for g in gold[rid]} | {e["field"] for e in ents}])

    def summary(t):
        rows = {r["label"]: r for r in t.iter_rows(named=True) if r["n_gold"]}
        n_gold = sum(r["n_gold"] for r in rows.values())
        return {"recall_all": round(sum((r["recall"] or 0) * r["n_gold"] for r in rows.values()) / n_gold, 3),
                "hidden_all": round(sum((r["hidden"] or 0) * r["n_gold"] for r in rows.values()) / n_gold, 3),
                **{f"recall_{k}": round(rows[k]["recall"] or 0, 3) for k in ("PERSON", "STREET_ADDRESS", "SECRET") if k in rows}}

    result = {
        "n_calls": len(records), "chars": n_chars, "repeat": repeat,
        "presidio_pattern_only": {"calls_per_s": round(len(records) / t_base, 1), **summary(base_score)},
        "slm_research_s2": {"calls_per_s": round(len(records) / t_ours, 1), **summary(ours_score)},
    }
    result["speedup"] = round(t_base / t_ours, 2)
    result["goal_2x_met"] = result["speedup"] >= 2 and result["slm_research_s2"]["recall_PERSON"] > 0
    out = ROOT/"bench"/"results"/"masking.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    main(a.n, a.seed, a.repeat)
