"""Privacy audits.

`test_no_canary_in_any_artifact` audits a whole run (`make site-check`, after the ci run and the docs build): the
embedded corpus plants unique PII canaries in the raw logs (listed in its `canaries.json`, beside the gold file the
pipeline never reads). After capture, cleaning and every later step, no canary may appear in any artifact: derived
data, the run folder (executed notebooks, figures, summaries), figures/ or the docs site.

The corpus plants its canaries in message text only. `test_field_canaries_*` plant canaries in every other field that
can carry personal data (top-level `user` / `user_id`, `request.user`, message `name`, metadata, identifier numbers in
tool arguments and tool outputs, fields S2 does not know) and in names no list holds ("Radomir Haverbrook"), take them
through S1 (encrypted store, export) and S2 (the frame step, the JSONL command) and read every artifact written.
"""
import json
import os
import random
from pathlib import Path

import pytest

from slm_research.corpus import read_canaries

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


def _leaks(roots, canaries, label=lambda c: ""):
    "`file: canary prefix...` for every canary found in any file under `roots` (never the whole value), and the number of files read."
    leaks, n_files = [], 0
    for root in roots:
        for f in (p for p in Path(root).rglob("*") if p.is_file()):
            n_files += 1
            data = _readable_bytes(f)
            leaks += [f"{f.name}: {c[:3]}... {label(c)}".rstrip() for c in canaries if c.encode() in data]
    return leaks, n_files


@pytest.mark.site
def test_no_canary_in_any_artifact():
    run_dir = ROOT / os.environ.get("SLM_AUDIT_RUN", "runs/latest-ci")
    assert (run_dir / "summary.json").exists(), f"no run to audit at {run_dir}: run `make ci-run` first"
    canaries = _canaries()
    assert len(canaries) >= 5, "the corpus planted no canaries: the audit would be vacuous"
    leaks, n_files = _leaks(_artifact_roots(run_dir), canaries)
    assert n_files > 10, "nothing to audit"
    assert leaks == [], f"{len(leaks)} canaries leaked into artifacts: {leaks[:20]}"


# --- canaries in every field ------------------------------------------------------------------------------------

# Names in no Faker or GeoNames list, the kind that survived the last audit ("Radomir Haverbrook").
RARE_FIRST = ["Radomir", "Thorvald", "Ysolde", "Eberhart", "Quillon", "Marisol", "Anselm", "Oriel", "Caspian", "Wendeline"]
RARE_LAST = ["Haverbrook", "Quistwater", "Ellingbrand", "Morrowfield", "Pemberthy", "Ashgrove", "Tallowmere", "Brenchley"]
NAME_LEADS = ["Please cc {} on the reply.", "Forward this to {} before Friday.", "{} asked for the summary.",
              "Ticket opened by {}.", "Thanks, {}", "The invoice goes to {} in accounting."]


def plant_field_canaries(records: list[dict], seed: int = 0) -> tuple[list[dict], dict[str, list[str]]]:
    "Copies of `records` with a unique canary in each field that can carry PII; the canaries by field."
    rng = random.Random(seed)
    out, planted = [], {}
    def add(field, value):
        planted.setdefault(field, []).append(str(value)); return value
    for i, r in enumerate(records):
        r = json.loads(json.dumps(r))
        tag = f"{rng.getrandbits(32):08x}"
        kind = i % 8
        req, msgs = r["request"], r["request"]["messages"]
        if kind == 0: r["user_id"] = add("user", f"canary.user.{tag}@example.org")
        elif kind == 1: req["user"] = add("request.user", f"canary.ru.{tag}@example.org")
        elif kind == 2: msgs[-1]["name"] = add("message name", f"{rng.choice(RARE_FIRST)}_{rng.choice(RARE_LAST)}{tag[:3]}")
        elif kind == 3: req["metadata"] = {"customer": {"phone": add("metadata", f"+1 415-555-{rng.randint(1000, 9999)}")},
                                           "note": add("metadata", f"vip canary.meta.{tag}@example.org")}
        elif kind == 4:
            n = add("numeric tool argument", 700_000_000_000 + rng.randrange(10**11))
            msgs.append({"role": "assistant", "content": None, "tool_calls": [{"id": f"t{i}", "type": "function", "function": {
                "name": "lookup_account", "arguments": json.dumps({"account_number": n, "limit": 5})}}]})
            msgs.append({"role": "tool", "tool_call_id": f"t{i}", "name": "lookup_account",
                         "content": json.dumps({"ssn": add("tool output number", int(f"{rng.randint(100, 665)}{rng.randint(10, 99)}{rng.randint(1000, 9999)}"))})})
        elif kind == 5: r["trace"] = {"client": {"ip": add("unknown field", f"10.{rng.randint(1, 254)}.{rng.randint(1, 254)}.{rng.randint(1, 254)}")}}
        else:
            name = f"{rng.choice(RARE_FIRST)} {rng.choice(RARE_LAST)}"
            add("rare name", name)
            m = next(m for m in reversed(msgs) if m["role"] == "user")
            lead = rng.choice(NAME_LEADS).format(name)
            if isinstance(m["content"], list): next(p for p in m["content"] if p.get("type") == "text")["text"] += "\n" + lead
            else: m["content"] = (m["content"] or "") + "\n" + lead
        out.append(r)
    return out, planted


@pytest.fixture(scope="module")
def field_canary_records():
    from slm_research.corpus import generate_corpus
    corpus = generate_corpus(160, 0, progress=False)
    records = [json.loads(l) for l in (corpus/"calls.jsonl").read_text().splitlines()]
    return plant_field_canaries(records, seed=1)


def test_field_canaries_are_planted_where_they_should_be(field_canary_records):
    "The audit can fail: every canary is in the raw records, and every field kind carries some."
    records, planted = field_canary_records
    raw = "\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    assert set(planted) == {"user", "request.user", "message name", "metadata", "numeric tool argument", "tool output number",
                            "unknown field", "rare name"}
    assert all(c in raw for cs in planted.values() for c in cs)
    assert sum(map(len, planted.values())) >= 150


@pytest.mark.slow
def test_field_canaries_never_survive_s1_and_s2(field_canary_records, workspace, tmp_path, monkeypatch):
    "S1 (encrypted store, pseudonyms) then S2 (frame step and JSONL command): no planted canary in any artifact."
    from click.testing import CliRunner
    from slm_research import capture
    from slm_research.clean import clean_cmd, clean_to_files
    from slm_research.workspace import Workspace
    records, planted = field_canary_records
    monkeypatch.setenv("SLM_KEYS_DIR", str(tmp_path/"keys"))
    keys = capture.generate_keys(tmp_path/"keys")
    with capture.SegmentWriter(workspace.processed/"store", keys["public"], capture.Pseudonymizer(keys["pseudonym"])) as w:
        for r in records: w.append(r)
    report = clean_to_files(Workspace(workspace.processed), keys=keys["private"], progress=False)
    assert report["n_in"] == len(records) == report["n_out"] + report["n_quarantined"]
    src = tmp_path/"raw"/"calls.jsonl"                    # the same records as JSONL, through the command line
    src.parent.mkdir()
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    res = CliRunner().invoke(clean_cmd, ["--in", str(src), "--out", str(tmp_path/"out"/"calls.jsonl")])
    assert res.exit_code == 0, res.output
    field_of = {c: f for f, cs in planted.items() for c in cs}
    leaks, n_files = _leaks([workspace.processed, workspace.run_dir, tmp_path/"out"], sorted(field_of), lambda c: f"({field_of[c]})")
    assert n_files >= 5
    assert leaks == [], f"{len(leaks)} canaries survived: {leaks[:20]}"
