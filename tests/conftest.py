import os
from pathlib import Path

import pytest


def pytest_configure(config):
    """`make pytest` runs two test processes (pytest-xdist): each on its own core, as the runner's lanes, so that one's
    thread pools (OpenMP, polars) do not stall the other's; what a test starts (a kernel, a CLI) stays on that core."""
    worker, n = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker:
        from slm_research.runner import lane_cpus
        cpus = lane_cpus(int(worker.removeprefix("gw")), n)
        if cpus: os.sched_setaffinity(0, cpus)

ROOT = Path(__file__).resolve().parent.parent


def _shared_external() -> Path:
    env = os.environ.get("SLM_SHARED")
    return Path(env) / "external" if env else ROOT.parent / "shared" / "external"


@pytest.fixture(scope="session")
def shared_external() -> Path:
    "Public data labelled by others (../shared/external), read in place, never copied into the repo."
    path = _shared_external()
    if not path.is_dir():
        pytest.skip(f"shared external data not found at {path}")
    return path


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    "An isolated profile and run folder so a test never touches data/processed of a real run."
    monkeypatch.setenv("SLM_PROFILE", f"pytest-{os.getpid()}")
    monkeypatch.setenv("SLM_RUN_DIR", str(tmp_path / "run"))
    from slm_research.core import paths
    p = paths()
    yield p
    import shutil
    shutil.rmtree(p.processed, ignore_errors=True)


CHROMIUM = "/usr/bin/chromium"   # Debian's; never a downloaded browser
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    "Headless Chromium for the docs-site and JupyterLab checks."
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        # launch() gives every run a fresh, temporary user-data-dir
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()
