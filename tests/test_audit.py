"""Privacy audit of a whole run (`make site-check`, after the ci run and the docs build).

The embedded corpus plants unique PII canaries in the raw logs (listed in its `canaries.json`,
beside the gold file the pipeline never reads). After capture, cleaning and every later step,
no canary may appear in any artifact: derived data, the run folder (executed notebooks,
figures, summaries), figures/ or the docs site.
"""
import json
import os
from pathlib import Path

import pytest

from slm_research.corpus import read_canaries

pytestmark = pytest.mark.site
ROOT = Path(__file__).resolve().parent.parent


def _readable_bytes(f: Path) -> bytes:
    "A file's bytes, with compressed columnar files (Parquet) decoded so a canary inside them is found."
    if f.suffix == ".parquet":
        import polars as pl
        return pl.read_parquet(f).write_csv().encode()
    return f.read_bytes()


def _canaries():
    "Every canary planted by any corpus generated here (stricter than only the run's own corpus)."
    found = set()
    for f in (ROOT / "data" / "raw" / "generated").glob("*/canaries.json"):
        found |= set(read_canaries(f.parent))
    return sorted(found)


def _artifact_roots(run_dir: Path):
    profile = json.loads((run_dir / "summary.json").read_text())["profile"]
    return [ROOT / "data" / "processed" / profile, run_dir, ROOT / "figures",
            Path(os.environ.get("SLM_SITE_DIR", ROOT / "_docs"))]


def test_no_canary_in_any_artifact():
    run_dir = ROOT / os.environ.get("SLM_AUDIT_RUN", "runs/latest-ci")
    assert (run_dir / "summary.json").exists(), f"no run to audit at {run_dir}: run `make ci-run` first"
    canaries = _canaries()
    assert len(canaries) >= 5, "the corpus planted no canaries: the audit would be vacuous"
    needles = [c.encode() for c in canaries]
    leaks, n_files = [], 0
    for root in _artifact_roots(run_dir):
        for f in (p for p in root.rglob("*") if p.is_file()):
            n_files += 1
            data = _readable_bytes(f)
            leaks += [f"{f.relative_to(ROOT)}: {c.decode()[:3]}..." for c in needles if c in data]
    assert n_files > 10, "nothing to audit"
    assert leaks == [], f"{len(leaks)} canaries leaked into artifacts: {leaks[:20]}"
