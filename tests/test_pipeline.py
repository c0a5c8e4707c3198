"""The README's "own logs" commands, run as a user would (subprocesses in a fresh workspace), on real BFCL chat logs."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = [str(Path(sys.executable).parent/"slm-research")]
THREADS = os.environ.get("SLM_THREADS", "2")   # `make pytest` runs two test processes with one thread each
TRAIN = ["--max-clusters", "1", "--steps", "2", "--n-eval", "4", "--batch-size", "4", "--max-length", "192"]


@pytest.fixture(scope="module")
def user_workspace(tmp_path_factory, shared_external):
    "A fresh workspace folder (settings.ini and nbs/) and a slice of BFCL's live chat logs outside it."
    ws = tmp_path_factory.mktemp("ws")
    shutil.copy(ROOT/"settings.ini", ws/"settings.ini"); (ws/"nbs").mkdir()
    lines = (shared_external/"bfcl_live_calls.jsonl").read_text().splitlines()[:160]
    logs = tmp_path_factory.mktemp("logs")/"calls.jsonl"
    logs.write_text("\n".join(lines) + "\n")
    return ws, logs


def run(ws: Path, *args: str, timeout: int = 900) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLM_")} | {"SLM_THREADS": THREADS}
    proc = subprocess.run([*CLI, *args], cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_step_by_step_commands_chain_on_real_logs(user_workspace):
    ws, logs = user_workspace
    run(ws, "capture", "keygen")
    out = run(ws, "capture", "import", str(logs), "--format", "openai")
    assert "160" in out
    run(ws, "clean")
    processed = ws/"data"/"processed"/"dev"
    calls = pl.read_parquet(processed/"calls_clean.parquet")
    assert calls.height + sum(1 for _ in open(processed/"clean_quarantine.jsonl")) == 160
    run(ws, "cluster")
    assert pl.read_parquet(processed/"clusters.parquet").height == calls.height
    out = run(ws, "select")
    assert "S5 trains on: SmolLM2-135M-Instruct" in out
    out = run(ws, "finetune", *TRAIN)
    gate = json.loads((processed/"gate.json").read_text())
    row = gate["clusters"][0]
    assert row["primary_metric"] == "action_match" and row["n_test"] > 0
    assert row["base_interval"][0] <= row["base_score"] <= row["base_interval"][1]
    assert row["coverage_interval"][0] <= row["coverage"] <= row["coverage_interval"][1]
    assert "zero-shot" in out and "coverage" in out and "replaceable share" in out
    assert logs.read_text().count("\n") == 160          # the input was only read


@pytest.mark.slow
def test_pipeline_command_runs_the_chain_from_a_fresh_workspace(user_workspace, tmp_path):
    _, logs = user_workspace
    ws = tmp_path/"fresh"; ws.mkdir()
    shutil.copy(ROOT/"settings.ini", ws/"settings.ini"); (ws/"nbs").mkdir()
    out = run(ws, "pipeline", "--logs", str(logs), "--format", "openai", *TRAIN)
    for step in ("S1 capture", "S2 masking", "S3 clustering", "S4 selection", "S5 fine-tuning"): assert f"{step}: done" in out
    assert "head tok" in out and "coverage" in out and "replaceable share" in out
    gate = json.loads((ws/"data"/"processed"/"dev"/"gate.json").read_text())
    assert {"base_score", "adapter_score", "adapter_tool_call_match", "coverage", "accepted_interval",
            "head_tokens"} <= set(gate["clusters"][0])


def readme_python_chain() -> str:
    "The README's Python block that chains the steps."
    blocks = (ROOT/"README.md").read_text().split("```python\n")[1:]
    return next(b.split("```")[0] for b in blocks if "capture_to_files" in b)


@pytest.mark.slow
def test_readme_python_steps_chain_on_real_logs(user_workspace, tmp_path):
    "The README's Python chain, as written but for the log path and a tiny S5, in a fresh workspace."
    _, logs = user_workspace
    ws = tmp_path/"ws"; ws.mkdir()
    shutil.copy(ROOT/"settings.ini", ws/"settings.ini"); (ws/"nbs").mkdir()
    code = readme_python_chain()
    assert 'FinetuneConfig(max_clusters=4)' in code and '"calls.jsonl"' in code
    code = code.replace('"calls.jsonl"', repr(str(logs))).replace(
        "FinetuneConfig(max_clusters=4)", "FinetuneConfig(max_clusters=1, steps=2, n_eval=4, batch_size=4, max_length=192)")
    code += "\nimport json; print(json.dumps({'n': s1.n_records, 'calls': ws.read_calls().height, "
    code += "'clusters': ws.read_clusters()['cluster'].n_unique(), 'gate': len(gate['clusters'])}))\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLM_")} | {"SLM_THREADS": THREADS}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n"] == 160 and out["calls"] <= 160 and out["clusters"] == 8 and out["gate"] >= 1
    assert (ws/"data"/"processed"/"dev"/"selection.json").exists()
