"""The README's own-logs command on a slice of real logs, output to a file, as a user or a CI job would capture it: the
file holds no progress-bar redraws and no error lines."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
N_CALLS = 60
# Python tracebacks, logging's ERROR/CRITICAL (also "[IPKernelApp] ERROR | ..."), glog-style C++ lines ("[... E ...]",
# "E1206 12:00:00"), and Ray's core_worker complaints
ERROR_LINE = re.compile(r"Traceback \(most recent call last\)|^\s*(\[[^\]]*\]\s*)?(ERROR|CRITICAL)\b|\bERROR \||"
                        r"^\[[^\]]* E \d+ \d+\]|^E\d{4} \d\d:|core_worker\.cc", re.M)


def test_error_line_pattern_knows_the_lines_it_looks_for():
    found = ["[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel",
             "[2026-12-06 23:07:49,443 E 8172 8172] core_worker.cc:2465: Actor with class name ...",
             "Traceback (most recent call last):", "ERROR:root:boom", "E1206 23:07:49.443 rpc failed"]
    fine = ["S2 masking: done in 60.3 s", "| 0 | get_current_weather | 0.233 | 4 | tool_name_match | false |",
            "args zero-shot 0.00 [0.00-0.49]", "Scores agree with the teacher (the logged answer, 1.00)"]
    assert all(ERROR_LINE.search(l) for l in found) and not any(ERROR_LINE.search(l) for l in fine)


@pytest.mark.slow
@pytest.mark.timeout(3600)   # S1-S5 with a model on a CPU: minutes on a quiet machine, much more on a busy one
def test_own_logs_pipeline_writes_a_quiet_log(tmp_path, shared_external):
    calls = tmp_path/"calls.jsonl"
    with open(shared_external/"bfcl_live_calls.jsonl") as f:
        calls.write_text("".join(line for _, line in zip(range(N_CALLS), f)))
    ws = tmp_path/"workspace"
    (ws/"nbs").mkdir(parents=True); (ws/"settings.ini").touch()
    env = {**os.environ, "SLM_ROOT": str(ws), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("SLM_PROGRESS", None); env.pop("SLM_PROFILE", None); env.pop("SLM_RUN_DIR", None)
    out = tmp_path/"pipeline.log"
    with open(out, "w") as fh:   # stdout and stderr to a file: not a terminal
        proc = subprocess.run([sys.executable, "-c", "from slm_research.cli import main; main()", "pipeline", "--logs", str(calls), "--format",
                               "openai", "--max-clusters", "1", "--steps", "2", "--n-eval", "4"],
                              cwd=ws, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=3500)
    text = out.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "replaceable share" in text and f"{N_CALLS} lines in" in text   # it did run the chain
    assert "\r" not in text, "progress-bar redraws:\n" + "\n".join(l for l in text.split("\n") if "\r" in l)[:2000]
    assert not ERROR_LINE.search(text), "error lines:\n" + "\n".join(l for l in text.splitlines() if ERROR_LINE.search(l))
