"S2 cleaning: real Presidio engine, real capture store, real files."
import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from slm_research.clean import (CleanConfig, MaskingEngine, Placeholders, clean, clean_cmd, clean_jsonl, clean_to_files,
                                mask_messages, presidio_pattern_only_results, score_spans)
from slm_research.core import CLEAN_SCHEMA, Quarantine


@pytest.fixture(scope="module")
def engine():
    return MaskingEngine()


def test_patterns_checksums_and_secrets(engine):
    text = ("card 4111 1111 1111 1111 (not 4111 1111 1111 1112), IBAN DE89 3704 0044 0532 0130 00, SSN 123-45-6789, "
            "ip 10.1.2.3, key sk-proj-abcdefghijklmnopqrstuvwxyz0123, Authorization: Bearer abcdefghijklmnop1234, "
            'db postgresql://admin:Pw0rdXyz@db:5432/app, {"password": "hunter22"}, token = os.environ.get("T")')
    found = {(text[r.start:r.end], r.entity_type) for r in engine.analyze(text)}
    assert ("4111 1111 1111 1111", "CREDIT_CARD") in found and not any(v == "4111 1111 1111 1112" for v, _ in found)
    for value, label in [("DE89 3704 0044 0532 0130 00", "IBAN_CODE"), ("123-45-6789", "US_SSN"), ("10.1.2.3", "IP_ADDRESS"),
                         ("sk-proj-abcdefghijklmnopqrstuvwxyz0123", "SECRET"), ("abcdefghijklmnop1234", "SECRET"),
                         ("Pw0rdXyz", "SECRET"), ("hunter22", "SECRET")]:
        assert (value, label) in found, value
    assert not any("os.environ" in v for v, _ in found)


def test_names_places_addresses_that_presidio_pattern_only_misses(engine):
    text = "Dr. Okonkwo and Maria Kovacz moved from Berlin to 857 Lawrence Route, Valenzuelaview, WI 39297."
    masked, ents = engine.mask(text)
    assert masked == "Dr. <PERSON_1> and <PERSON_2> moved from <LOCATION_1> to <ADDRESS_1>."
    assert all(text[e["start"]:e["end"]] for e in ents)
    assert presidio_pattern_only_results(text) == []   # the offline baseline finds none of them


def test_placeholders_consistent_within_a_conversation_only(engine):
    a, b = Placeholders(), Placeholders()
    assert engine.mask("mail jo@x.org, call 555-123-4567", a)[0] == "mail <EMAIL_1>, call <PHONE_1>"
    assert engine.mask("again (555) 123 4567 and JO@x.org, new ann@y.org", a)[0] == "again <PHONE_1> and <EMAIL_1>, new <EMAIL_2>"
    assert engine.mask("ann@y.org", b)[0] == "<EMAIL_1>"


json_values = st.one_of(st.sampled_from(["Anna Kowalski", "anna@example.org", "555-123-4567", "4111 1111 1111 1111", "Zürich",
                                         "ä \"quoted\" \\ back\nslash", "plain words", "hunter22", "\u2028", "😀 emoji"]),
                        st.text(max_size=20), st.integers(), st.booleans(), st.none())
json_docs = st.recursive(json_values, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.sampled_from(["name", "email", "password", "note", "phone", "q", "items"]), c, max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(st.sampled_from(["name", "email", "password", "note", "args"]), json_docs, min_size=1, max_size=4),
       ascii_only=st.booleans())
def test_json_stays_valid_and_offsets_point_into_the_original(engine, doc, ascii_only):
    raw = json.dumps(doc, ensure_ascii=ascii_only)
    msgs = [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": raw}}]}]
    new, ents = mask_messages(engine, msgs, Placeholders())
    out = json.loads(new[0]["tool_calls"][0]["function"]["arguments"])   # still valid JSON
    assert set(out) == set(doc)
    for e in ents:   # each span is a whole piece of one raw JSON string literal: it decodes on its own
        piece = raw[e["start"]:e["end"]]
        assert '"' not in piece.replace('\\"', "")
        json.loads('"' + piece + '"')
    if doc.get("email") == "anna@example.org": assert out["email"] == "<EMAIL_1>"


def _frame(records):
    from slm_research.capture import to_frame
    return to_frame(records)


def _call(i, session, text, response_text="ok"):
    return {"id": f"call-{i}", "timestamp": "2025-03-01T10:00:00Z", "agent": "metagpt", "session_id": session, "user_id": "u1",
            "request": {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]},
            "response": {"id": "r", "object": "chat.completion", "created": 0, "model": "gpt-4o",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": response_text}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}},
            "latency_ms": 12.0, "error": None}


def test_clean_step_schema_sessions_and_quarantine(engine):
    frame = _frame([_call(1, "s1", "I am Anna Kowalski, anna@example.org"), _call(2, "s1", "Reply to anna@example.org", "Done, Anna Kowalski"),
                    _call(3, "s2", "bob@example.org here")])
    bad = frame[:1].with_columns(id=pl.lit("call-bad"), messages=pl.lit("[{not json"))
    big = frame[:1].with_columns(id=pl.lit("call-big"), messages=pl.lit(json.dumps([{"role": "user", "content": "x" * 5000}])))
    q = Quarantine(Path("/dev/null"))
    out = clean(pl.concat([frame, bad, big]), CleanConfig(max_chars=4000), q, engine=engine, progress=False)
    assert out.schema == pl.Schema(CLEAN_SCHEMA)
    assert out.height == 3 and len(q) == 2
    assert {r.where: r.reason.split(":")[0] for r in q.items} == {"call-bad": "bad JSON", "call-big": "ValueError"}
    msgs = {r["id"]: json.loads(r["messages"])[0]["content"] for r in out.iter_rows(named=True)}
    assert msgs == {"call-1": "I am <PERSON_1>, <EMAIL_1>", "call-2": "Reply to <EMAIL_1>", "call-3": "<EMAIL_1> here"}
    assert json.loads(out.filter(pl.col("id") == "call-2")["response"][0])["content"] == "Done, <PERSON_1>"
    with pytest.raises(ValueError, match="record call-bad"):
        clean(bad, engine=engine, progress=False)


def test_cli_masks_jsonl_and_quarantines_bad_lines(tmp_path):
    src = tmp_path/"in.jsonl"
    lines = [json.dumps({"text": "Call Anna Kowalski at +1 (555) 123-4567", "id": 7}), "{broken", json.dumps([1, 2]),
             json.dumps({"messages": [{"role": "user", "content": "my ssn is 123-45-6789"}]}), json.dumps({"other": 1})]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path/"out.jsonl"
    res = CliRunner().invoke(clean_cmd, ["--in", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    counts = json.loads(res.stdout.strip().splitlines()[-1])
    assert (counts["n_in"], counts["n_out"], counts["n_quarantined"]) == (5, 2, 3)
    first, second = map(json.loads, out.read_text().splitlines())
    assert first["id"] == 7 and first["text"] == "Call <PERSON_1> at <PHONE_1>"
    assert [(e["start"], e["end"], e["label"]) for e in first["entities"]] == [(5, 18, "PERSON"), (22, 39, "PHONE_NUMBER")]
    assert second["messages"][0]["content"] == "my ssn is <SSN_1>" and second["entities"][0]["field"] == "messages.0.content"
    reasons = [json.loads(l) for l in (tmp_path/"out.quarantine.jsonl").read_text().splitlines()]
    assert [r["where"] for r in reasons] == ["in.jsonl:2", "in.jsonl:3", "in.jsonl:5"] and "bad JSON" in reasons[0]["reason"]


def test_cli_rejects_undecodable_text(tmp_path):
    src = tmp_path/"in.jsonl"
    src.write_text(json.dumps({"text": "ok anna@example.org"}) + "\n" + '{"text": "lone \\ud800 surrogate"}\n')
    counts = clean_jsonl(src, tmp_path/"out.jsonl", progress=False)
    assert (counts["n_out"], counts["n_quarantined"]) == (1, 1)
    assert "UnicodeEncodeError" in (tmp_path/"out.quarantine.jsonl").read_text()


def test_external_gold_beats_presidio_pattern_only(engine, shared_external):
    rows = [json.loads(l) for l in (shared_external/"pii_presidio_synth_v2.jsonl").read_text().splitlines()]
    gold = [r["spans"] for r in rows]
    ours = score_spans(gold, [[{"start": r.start, "end": r.end, "label": r.entity_type} for r in engine.analyze(x["text"])] for x in rows],
                       {"GPE": "LOCATION"})
    base = score_spans(gold, [presidio_pattern_only_results(x["text"]) for x in rows], {"GPE": "LOCATION"})
    o, b = ({r["label"]: r for r in t.iter_rows(named=True)} for t in (ours, base))
    assert o["PERSON"]["recall"] > 0.6 and o["PERSON"]["precision"] > 0.7          # measured 0.68 / 0.81
    assert o["STREET_ADDRESS"]["recall"] > 0.5 and o["LOCATION"]["recall"] > 0.4   # measured 0.56 / 0.49
    assert b["PERSON"]["recall"] == 0 and b["STREET_ADDRESS"]["recall"] == 0
    for label in ["EMAIL_ADDRESS", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "PHONE_NUMBER"]:
        assert o[label]["recall"] >= b[label]["recall"] - 0.05, label


def test_canary_audit_capture_and_cleaning(workspace, tmp_path, monkeypatch):
    "Plant canaries in raw logs, run S1 (encrypted store) and S2, and find none in any artifact."
    from slm_research import capture
    from slm_research.corpus import generate_corpus
    monkeypatch.setenv("SLM_KEYS_DIR", str(tmp_path/"keys"))
    keys = capture.generate_keys(tmp_path/"keys")
    corpus = generate_corpus(300, 0)
    raw = (corpus/"calls.jsonl").read_text()
    canaries = [c["text"] for c in json.loads((corpus/"canaries.json").read_text())["canaries"]]
    assert canaries and all(c in raw for c in canaries)   # the audit can fail: every canary is in the raw logs
    with capture.SegmentWriter(workspace.processed/"store", keys["public"]) as w:
        for line in raw.splitlines(): w.append(json.loads(line))
    frame = capture.export_frame(workspace.processed/"store", keys["private"])
    report = clean_to_files(frame, progress=False)
    assert report["n_in"] == 300 and report["n_out"] + report["n_quarantined"] == 300
    files = [p for d in (workspace.processed, workspace.run_dir) for p in Path(d).rglob("*") if p.is_file()]
    assert any(p.name == "calls_clean.parquet" for p in files)
    for p in files:
        data = p.read_bytes()
        if p.suffix == ".parquet": data += pl.read_parquet(p).write_csv().encode()   # parquet pages may be compressed
        leaked = [c for c in canaries if c.encode() in data]
        assert not leaked, f"{p.name} holds canaries {leaked}"
