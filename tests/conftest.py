import os
from pathlib import Path

import pytest

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
