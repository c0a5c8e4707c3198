"core: workspace resolution, progress bars outside a terminal, the notebook display set-up."
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slm_research import core

ROOT = Path(__file__).resolve().parent.parent


def _env_without_workspace(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLM_")}
    env["HOME"] = str(tmp_path / "home")  # nothing from the user's folders either
    return env


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def test_keygen_outside_a_workspace_refuses_in_one_line_and_writes_nothing(tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    checkout_keys = Path(core.__file__).resolve().parent.parent / ".keys"  # what the old fallback rotated
    before = _tree(checkout_keys)
    proc = subprocess.run([sys.executable, "-c", "from slm_research.cli import main; main()", "capture", "keygen"],
                          cwd=cwd, env=_env_without_workspace(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "no slm-research workspace" in err and "cd into one" in err and "SLM_ROOT" in err
    assert list(cwd.iterdir()) == [] and not (tmp_path / "home").exists()
    assert _tree(checkout_keys) == before


def test_project_root_finds_the_workspace_upwards_and_honours_slm_root(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    (ws / "nbs" / "deep").mkdir(parents=True)
    (ws / "settings.ini").write_text("[ci]\n")
    monkeypatch.delenv("SLM_ROOT", raising=False)
    monkeypatch.chdir(ws / "nbs" / "deep")
    assert core.project_root() == ws.resolve()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(core.WorkspaceNotFound, match="cd into one, or set SLM_ROOT"):
        core.paths()
    with pytest.raises(ValueError):  # callers that catch ValueError still catch it
        core.project_root()
    monkeypatch.setenv("SLM_ROOT", str(ws))
    assert core.paths(mkdir=False).settings == ws.resolve() / "settings.ini"


def test_a_folder_with_only_settings_is_not_a_workspace(tmp_path, monkeypatch):
    (tmp_path / "settings.ini").write_text("[ci]\n")
    monkeypatch.delenv("SLM_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert core.find_workspace() is None


def test_progress_to_a_pipe_prints_a_few_lines_not_one_per_update():
    script = ("from slm_research.core import progress\n"
              "for _ in progress(range(3000), desc='records', mininterval=0): pass\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "SLM_PROGRESS"})
    assert proc.returncode == 0, proc.stderr
    redraws = proc.stderr.count("\r") + proc.stderr.count("\n")
    assert "3000/3000" in proc.stderr and redraws <= 4, proc.stderr
    # plain tqdm with the same mininterval, for comparison, writes far more
    plain = subprocess.run([sys.executable, "-c", script.replace("from slm_research.core import progress",
                                                                 "from tqdm import tqdm as progress")],
                           capture_output=True, text=True, timeout=120)
    assert plain.stderr.count("\r") + plain.stderr.count("\n") > 100


def test_progress_is_off_under_the_runner(monkeypatch, capsys):
    monkeypatch.setenv("SLM_PROGRESS", "0")
    assert list(core.progress(range(5), desc="x")) == list(range(5))
    assert capsys.readouterr().err == ""


def test_notebook_setup_keeps_figures_small_and_tables_wide():
    import plotly.graph_objects as go
    import plotly.io as pio
    import polars as pl
    core.setup_plotly(); core.setup_display()
    bundle = pio.renderers[pio.renderers.default].to_mimebundle(go.Figure(go.Scatter(y=[1, 2])).to_dict())
    assert set(bundle) == {"application/vnd.plotly.v1+json"} and len(str(bundle)) < 20_000
    rows = pl.DataFrame({"i": range(25), "why": ["a reason that is longer than thirty characters, in full"] * 25})
    text = repr(rows)
    assert text.count("a reason that is longer than thirty characters, in full") == 25 and "…" not in text
