"""S2 masking: per-entity recall and throughput on public gold, beside Presidio pattern-only, measured in the same run.

Gold: presidio-research's synth_dataset_v2 (1,500 texts, labelled by others; `../shared/external/`, read in place,
never trained on). Baseline: Presidio `AnalyzerEngine` with the `no_op` NLP engine and its predefined recognizers
(Presidio's configuration that runs offline). Ours: `slm_research.clean.MaskingEngine` with its defaults.
Gold `GPE` counts as LOCATION and `DOMAIN_NAME` (URLs in this file) as URL, for both engines.
Goals (issue 11): PERSON recall >= 0.85, overall recall >= 0.80, throughput >= 2x the baseline's.

A second part times whole calls of the embedded corpus (`mask_record` against the baseline's analyze + anonymize on
every text field), as the pipeline sees them.

    .venv/bin/python bench/bench_masking.py [--n 1000] [--seed 0] [--repeat 3]
"""
import argparse
import json
import os
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from presidio_anonymizer import AnonymizerEngine

from slm_research.clean import CleanConfig, MaskingEngine, Placeholders, _entity, mask_record, presidio_pattern_only, score_spans
from slm_research.corpus import generate_corpus, text_fields

ROOT = Path(__file__).resolve().parent.parent
GOLD_MAP = {"GPE": "LOCATION", "DOMAIN_NAME": "URL"}


def shared_external() -> Path:
    env = os.environ.get("SLM_SHARED")
    return Path(env)/"external" if env else ROOT.parent/"shared"/"external"


def timed(fn):
    t0 = time.perf_counter(); out = fn(); return time.perf_counter() - t0, out


def per_entity(table) -> dict:
    rows = {r["label"]: r for r in table.iter_rows(named=True) if r["n_gold"]}
    n_gold = sum(r["n_gold"] for r in rows.values())
    return {"overall_recall": round(sum((r["recall"] or 0) * r["n_gold"] for r in rows.values()) / n_gold, 3),
            "overall_hidden": round(sum((r["hidden"] or 0) * r["n_gold"] for r in rows.values()) / n_gold, 3),
            "recall": {k: round(r["recall"] or 0, 3) for k, r in sorted(rows.items())},
            "precision": {k: round(r["precision"], 3) if r["precision"] is not None else None for k, r in sorted(rows.items())},
            "n_gold": {k: r["n_gold"] for k, r in sorted(rows.items())}}


def external(seed: int) -> dict:
    path = shared_external()/"pii_presidio_synth_v2.jsonl"
    if not path.exists(): return {"skipped": f"{path} is absent"}
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    texts, gold = [r["text"] for r in rows], [r["spans"] for r in rows]
    baseline = presidio_pattern_only()
    baseline.analyze("warm-up a@b.org http://x.org", language="en")
    t_build, engine = timed(lambda: MaskingEngine(CleanConfig(seed=seed)))   # trains the name-likeness model once
    engine.analyze("warm-up Anna")
    t_base, pred_base = timed(lambda: [[_entity(r) for r in baseline.analyze(t, language="en")] for t in texts])
    t_ours, pred_ours = timed(lambda: [[_entity(r) for r in engine.analyze(t)] for t in texts])   # cold word cache
    base, ours = per_entity(score_spans(gold, pred_base, GOLD_MAP)), per_entity(score_spans(gold, pred_ours, GOLD_MAP))
    return {"n_texts": len(texts), "engine_build_s": round(t_build, 1),
            "presidio_pattern_only": {"texts_per_s": round(len(texts) / t_base, 1), **base},
            "slm_research_s2": {"texts_per_s": round(len(texts) / t_ours, 1), **ours},
            "speedup": round(t_base / t_ours, 2),
            "goals": {"person_recall_0.85": ours["recall"].get("PERSON", 0) >= 0.85, "overall_recall_0.80": ours["overall_recall"] >= 0.80,
                      "throughput_2x": t_base / t_ours >= 2}}


def embedded(n: int, seed: int, repeat: int) -> dict:
    corpus = generate_corpus(n, seed)
    records = [json.loads(l) for l in (corpus/"calls.jsonl").read_text().splitlines()]
    baseline, anonymizer = presidio_pattern_only(), AnonymizerEngine()
    engine = MaskingEngine(CleanConfig(seed=seed))

    def run_baseline():
        for r in records:
            for _, text in text_fields(r):
                anonymizer.anonymize(text=text, analyzer_results=baseline.analyze(text, language="en"))

    def run_ours():
        conv = {}
        for r in records: mask_record(engine, r, conv.setdefault(r["session_id"], Placeholders()))

    t_base = min(timed(run_baseline)[0] for _ in range(repeat))
    t_ours = min(timed(run_ours)[0] for _ in range(repeat))
    return {"n_calls": len(records), "repeat": repeat, "presidio_pattern_only_calls_per_s": round(len(records) / t_base, 1),
            "slm_research_s2_calls_per_s": round(len(records) / t_ours, 1), "speedup": round(t_base / t_ours, 2)}


def main(n: int, seed: int, repeat: int):
    result = {"synth_v2": external(seed), "embedded_calls": embedded(n, seed, repeat)}
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
