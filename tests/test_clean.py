"S2 cleaning: real Presidio engine, real capture store, real files."
import json
import re
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from slm_research.clean import (CleanConfig, MaskingEngine, Placeholders, clean, clean_cmd, clean_jsonl, clean_to_files, mask_records,
                                mask_messages, presidio_pattern_only_results, score_spans)
from slm_research.core import CLEAN_SCHEMA, Quarantine
from slm_research.workspace import Workspace


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
    assert masked == "<TITLE_1> <PERSON_1> and <PERSON_2> moved from <LOCATION_1> to <ADDRESS_1>."
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
    if doc.get("email") == "anna@example.org":   # a nested value under an `email` key may take <EMAIL_1> first
        assert re.fullmatch(r"<EMAIL_\d+>", out["email"])


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


def test_cli_masks_jsonl_and_quarantines_bad_lines(workspace, tmp_path):
    src = tmp_path/"in.jsonl"
    lines = [json.dumps({"text": "Call Anna Kowalski at +1 (555) 123-4567", "id": 7}), "{broken", json.dumps([1, 2]),
             json.dumps({"messages": [{"role": "user", "content": "my ssn is 123-45-6789"}]}), json.dumps({"other": 1})]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path/"out.jsonl"
    res = CliRunner().invoke(clean_cmd, ["--in", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout.strip().splitlines()[-1])
    counts = result["jsonl"]
    assert (counts["n_in"], counts["n_out"], counts["n_quarantined"]) == (5, 2, 3)
    # the workspace's cleaned calls are written too (CLEAN_SCHEMA), from the same lines
    assert (result["lines"], result["lines_quarantined"], result["n_in"]) == (5, 3, 2)
    parquet = pl.read_parquet(workspace.processed/"calls_clean.parquet")
    assert parquet.schema == pl.Schema(CLEAN_SCHEMA) and parquet.height == 2
    assert "Anna Kowalski" not in parquet.write_csv() and "123-45-6789" not in parquet.write_csv()
    first, second = map(json.loads, out.read_text().splitlines())
    assert first["id"] == 7 and first["text"] == "Call <PERSON_1> at <PHONE_1>"
    assert [(e["start"], e["end"], e["label"]) for e in first["entities"]] == [(5, 18, "PERSON"), (22, 39, "PHONE_NUMBER")]
    assert second["messages"][0]["content"] == "my ssn is <SSN_1>" and second["entities"][0]["field"] == "messages.0.content"
    reasons = [json.loads(l) for l in (tmp_path/"out.quarantine.jsonl").read_text().splitlines()]
    assert [r["where"] for r in reasons] == ["in.jsonl:2", "in.jsonl:3", "in.jsonl:5"] and "bad JSON" in reasons[0]["reason"]


def test_cli_option_defaults_come_from_clean_config():
    import dataclasses
    defaults = {f.name: f.default for f in dataclasses.fields(CleanConfig)}
    opts = {p.name: p.default for p in clean_cmd.params}
    for name in ("dates", "names", "ner", "pseudonym_key"):
        assert opts[name] == defaults[name], name


def test_cli_rejects_undecodable_text(tmp_path):
    src = tmp_path/"in.jsonl"
    src.write_text(json.dumps({"text": "ok anna@example.org"}) + "\n" + '{"text": "lone \\ud800 surrogate"}\n')
    counts = clean_jsonl(src, tmp_path/"out.jsonl", progress=False)
    assert (counts["n_out"], counts["n_quarantined"]) == (1, 1)
    assert "UnicodeEncodeError" in (tmp_path/"out.quarantine.jsonl").read_text()


GOLD_MAP = {"GPE": "LOCATION", "DOMAIN_NAME": "URL"}


def _synth_v2(shared_external) -> list[dict]:
    path = shared_external/"pii_presidio_synth_v2.jsonl"
    if not path.exists():
        pytest.skip(f"presidio-research synth v2 gold not found at {path} (shared/external): recall goal not checked")
    return [json.loads(l) for l in path.read_text().splitlines()]


def _per_label(rows, pred) -> dict:
    return {r["label"]: r for r in score_spans([x["spans"] for x in rows], pred, GOLD_MAP).iter_rows(named=True)}


def _ours(engine, rows) -> dict:
    pred = [[{"start": r.start, "end": r.end, "label": r.entity_type} for r in engine.analyze(x["text"])] for x in rows]
    return _per_label(rows, pred)


def _overall(table: dict) -> float:
    n_gold = sum(r["n_gold"] for r in table.values())
    return sum((r["recall"] or 0) * r["n_gold"] for r in table.values() if r["n_gold"]) / n_gold


def test_external_gold_beats_presidio_pattern_only(engine, shared_external):
    "presidio-research synth v2 (never trained on): every label at least the offline baseline's recall, most above."
    rows = _synth_v2(shared_external)
    o, b = _ours(engine, rows), _per_label(rows, [presidio_pattern_only_results(x["text"]) for x in rows])
    assert o["PERSON"]["precision"] > 0.75 and _overall(b) < 0.2          # measured 0.838; the baseline 0.122
    assert o["STREET_ADDRESS"]["recall"] > 0.8 and o["LOCATION"]["recall"] > 0.75   # 0.888 / 0.842 (0.61 / 0.65)
    assert o["ORGANIZATION"]["recall"] > 0.7 and o["ORGANIZATION"]["precision"] > 0.9   # 0.788 / 0.975 (0.348 before)
    assert o["DATE_TIME"]["recall"] > 0.85 and o["CREDIT_CARD"]["recall"] > 0.95        # timestamps, cards by cue
    for label in ("AGE", "TITLE", "NRP", "ZIP_CODE"):                      # 0 before the context rules
        assert o[label]["recall"] > 0.45, label
    assert b["PERSON"]["recall"] == 0 and b["STREET_ADDRESS"]["recall"] == 0
    for label in ["EMAIL_ADDRESS", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "PHONE_NUMBER"]:
        assert o[label]["recall"] >= b[label]["recall"] - 0.05, label


def test_synth_v2_recall_goals(engine, shared_external):
    """Recall on synth v2: overall >= 0.80, PERSON >= 0.85, PHONE_NUMBER >= 0.95, ORGANIZATION >= 0.80 (measured 0.896,
    0.883, 1.000, 0.900; 0.883 / 0.946 / 0.788 before phones by shape and the organisation cues), with no span at all
    on the 113 rows that hold no PII."""
    rows = _synth_v2(shared_external)
    o = _ours(engine, rows)
    assert o["PERSON"]["recall"] >= 0.85, o["PERSON"]
    assert o["PHONE_NUMBER"]["recall"] >= 0.95 and o["ORGANIZATION"]["recall"] >= 0.80, (o["PHONE_NUMBER"], o["ORGANIZATION"])
    assert o["ORGANIZATION"]["precision"] >= 0.95 and o["US_DRIVER_LICENSE"]["recall"] >= 0.8
    assert _overall(o) >= 0.80, {k: round(v["recall"] or 0, 3) for k, v in o.items()}
    empty = [x["text"] for x in rows if not x["spans"]]
    assert len(empty) == 113 and [t for t in empty if engine.analyze(t)] == []


def _found(engine, text) -> set:
    return {(text[r.start:r.end], r.entity_type) for r in engine.analyze(text)}


def test_address_grammar_and_organisation_cues(engine):
    "Invented text: building numbers, cities after streets, codes after countries, company lines, firms by their cues."
    block = "Nadia Borelli\nSenior buyer\nQuintessa Labs\n4417 Vaskikatu 12\nApt. 31\nKorvenmaa\nFinland 44120"
    found = _found(engine, block)
    for value, label in [("Nadia Borelli", "PERSON"), ("Quintessa Labs", "ORGANIZATION"), ("Korvenmaa", "LOCATION"),
                         ("4417 Vaskikatu 12", "STREET_ADDRESS"), ("44120", "STREET_ADDRESS")]:
        assert (value, label) in found, (value, found)
    text = ("Yesterday Odile Marchetti from Brightwater Analytics met us at the Zentrix office; ask the driver to "
            "stop at the corner of Halvard Road and Pine Street. Logged 2031-05-06 14:22:10, card 630427373398 lost.")
    found = _found(engine, text)
    for value, label in [("Odile Marchetti", "PERSON"), ("Brightwater Analytics", "ORGANIZATION"),
                         ("Zentrix", "ORGANIZATION"), ("the corner of Halvard Road and Pine Street", "STREET_ADDRESS"),
                         ("2031-05-06 14:22:10", "DATE_TIME"), ("630427373398", "CREDIT_CARD")]:
        assert (value, label) in found, (value, found)
    plain = "The Settings page lists the London office. During 2019 the team shipped 3 releases; see March 15 notes."
    assert {v for v, _ in _found(engine, plain)} <= {"London", "2019", "March 15"}   # no ordinary word masked


def test_identifiers_that_carry_names_payment_ids_and_zip_codes(engine):
    "User ids with a name in them (mia_li_3668), payment-method ids and zip codes, in text and under JSON keys."
    text = "user mia_li_3668 paid with credit_card_4421983 (pm_1Nx2YzAbCdEf), zip code 94107; see read_me.txt, config_v2"
    masked, _ = engine.mask(text)
    assert masked == "user <USER_1> paid with <PAYMENT_1> (<PAYMENT_2>), zip code <ZIP_1>; see read_me.txt, config_v2"
    args = json.dumps({"user_id": "sophia_garcia_1234", "payment_method_id": "paypal_3820", "zip": "10001", "zipcode": 94107})
    new, _ = mask_messages(engine, [{"role": "tool", "tool_call_id": "t", "content": args}], Placeholders())
    assert json.loads(new[0]["content"]) == {"user_id": "<USER_1>", "payment_method_id": "<PAYMENT_1>", "zip": "<ZIP_1>", "zipcode": "<ZIP_2>"}


@pytest.mark.slow
def test_names_no_list_holds_are_caught_by_the_name_likeness_model(engine):
    from slm_research.clean import name_likeness
    nl = name_likeness()
    assert min(nl(w) for w in ["Radomir", "Thorvald", "Järvilehto"]) > 0.8 and max(nl(w) for w in ["Invoice", "Summary", "Reliable"]) < 0.2
    for text in ["Please cc Radomir Haverbrook on the reply.", "Ticket opened by Caspian Quistwater.", "Thanks, Thorvald Brenchley"]:
        masked = engine.mask(text)[0]
        assert "<PERSON_1>" in masked and not any(w in masked for w in ("Radomir", "Haverbrook", "Caspian", "Quistwater", "Thorvald", "Brenchley")), masked


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
    report = clean_to_files(Workspace(workspace.processed), frame=frame, progress=False)
    assert report["n_in"] == 300 and report["n_out"] + report["n_quarantined"] == 300
    files = [p for d in (workspace.processed, workspace.run_dir) for p in Path(d).rglob("*") if p.is_file()]
    assert any(p.name == "calls_clean.parquet" for p in files)
    for p in files:
        data = p.read_bytes()
        if p.suffix == ".parquet": data += pl.read_parquet(p).write_csv().encode()   # parquet pages may be compressed
        leaked = [c for c in canaries if c.encode() in data]
        assert not leaked, f"{p.name} holds canaries {leaked}"


# --- every field, never losing input ---------------------------------------------------------------------------

REPRO = {"id": "c1", "user_id": "jane.doe@example.com",
         "request": {"user": "jane.doe@example.com", "metadata": {"phone": "+1 415-555-0132"},
                     "messages": [{"role": "user", "name": "Jane_Doe", "content": "I am Jane Doe"}]},
         "response": {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
             {"id": "x", "type": "function", "function": {"name": "f", "arguments": "{\"ssn\": 123456789, \"card\": 4111111111111111}"}}]}}]}}
REPRO_PII = ["jane.doe@example.com", "415-555-0132", "Jane_Doe", "Jane Doe", "123456789", "4111111111111111"]
KEY = "ab" * 32


def test_every_field_is_masked(tmp_path, workspace):
    "User, request.user, metadata, message name and numeric tool arguments once came out verbatim."
    from slm_research.capture import Pseudonymizer
    src, out = tmp_path/"in.jsonl", tmp_path/"out.jsonl"
    src.write_text(json.dumps(REPRO) + "\n")
    res = CliRunner().invoke(clean_cmd, ["--in", str(src), "--out", str(out), "--pseudonym-key", KEY])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert [v for v in REPRO_PII if v in text] == []
    rec = json.loads(text)
    pseudonym = Pseudonymizer(KEY)("jane.doe@example.com", "user")          # the same pseudonym S1 gives
    assert rec["user_id"] == rec["request"]["user"] == pseudonym
    assert rec["request"]["metadata"]["phone"] == "<PHONE_1>" and rec["request"]["messages"][0]["name"].startswith("<PERSON_")
    args = json.loads(rec["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])   # still JSON
    assert args == {"ssn": "<SSN_1>", "card": "<CARD_1>"}
    assert rec["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "f"   # structure kept
    parquet = pl.read_parquet(workspace.processed/"calls_clean.parquet")
    assert parquet["user"][0] == pseudonym and not [v for v in REPRO_PII if v in parquet.write_csv()]


def test_clean_step_masks_user_names_and_identifier_numbers_at_scale(engine):
    "The frame path (S1 export -> S2) over many records: raw user ids, message names and numeric phones never survive."
    recs = []
    for i in range(60):
        r = _call(i, f"s{i % 7}", f"ticket {i}")
        r["user_id"] = f"user{i}@corp.example"
        r["request"]["messages"][0]["name"] = f"Jane_Doe{i}"
        r["request"]["messages"].append({"role": "assistant", "content": None, "tool_calls": [{"id": "t", "type": "function", "function": {
            "name": "lookup", "arguments": json.dumps({"phone": 4155550100 + i, "note": f"acct {9_000_000_000 + i}"})}}]})
        r["request"]["messages"].append({"role": "tool", "tool_call_id": "t", "name": "lookup", "content": json.dumps({"account": 77_000_000 + i})})
        recs.append(r)
    out = clean(_frame(recs), CleanConfig(pseudonym_key=KEY), Quarantine(Path("/dev/null")), engine=MaskingEngine(CleanConfig(pseudonym_key=KEY)), progress=False)
    dump = out.write_csv()
    for i in range(60):
        for raw in (f"user{i}@corp.example", f"Jane_Doe{i}", str(4155550100 + i), str(77_000_000 + i)):
            assert raw not in dump, raw
    msgs = json.loads(out["messages"][0])
    assert msgs[-1]["name"] == "lookup"                                 # a tool's name on a tool message is kept
    assert json.loads(msgs[1]["tool_calls"][0]["function"]["arguments"])["phone"].startswith("<PHONE_")
    assert out["user"].str.contains(r"^u-[0-9a-f]{20}$").all()


def test_tool_definitions_are_kept_but_scanned_and_reported(engine, workspace):
    tools = [{"type": "function", "function": {"name": "email_owner", "description": "Mail the owner at owner.bob@corp.example",
                                               "parameters": {"type": "object", "properties": {"to": {"type": "string"}}}}}]
    r = _call(1, "s1", "hi")
    r["request"]["tools"] = tools
    report = clean_to_files(Workspace(workspace.processed), CleanConfig(pseudonym_key=KEY), _frame([r]), engine=engine,
                            progress=False)
    out = pl.read_parquet(workspace.processed/"calls_clean.parquet")
    assert json.loads(out["tools"][0]) == tools                          # developer text stays as written
    assert report["tool_findings"] == {"EMAIL_ADDRESS": 1}
    assert report["tool_findings_where"][0]["field"] == "tools.0.function.description"
    assert "owner.bob" not in (workspace.processed/"clean_report.json").read_text()   # reported, never the value


@pytest.mark.parametrize("same", ["out", "quarantine"])
def test_clean_refuses_to_overwrite_its_input(tmp_path, workspace, same):
    "--out equal to --in (or --in equal to OUT.quarantine.jsonl) once left the input at 0 bytes."
    out = tmp_path/"x.jsonl"
    src = out if same == "out" else tmp_path/"x.quarantine.jsonl"
    data = (json.dumps({"text": "mail a@b.org"}) + "\n") * 3
    src.write_text(data)
    res = CliRunner().invoke(clean_cmd, ["--in", str(src), "--out", str(out)])
    assert res.exit_code == 1 and "never overwrites its input" in res.output
    assert isinstance(res.exception, SystemExit)                         # a clear message, not a traceback
    assert src.read_text() == data


def test_bad_bytes_deep_nesting_and_stray_cr_are_quarantined_and_the_rest_processed(tmp_path, workspace):
    "One invalid UTF-8 byte once aborted clean (505 of 2,000 lines lost); 50,000 nested [ gave a RecursionError."
    lines = [json.dumps({"text": f"note {i} from n{i}@example.org"}).encode() for i in range(2000)]
    lines[1499] = b'{"text": "bad \xff byte"}'
    lines[1600] = b"[" * 50_000
    lines[1700] = b'{"text": "stray\rcarriage"}'
    lines[10] = lines[10] + b"\r"                                         # a CRLF ending is fine
    src, out = tmp_path/"in.jsonl", tmp_path/"out.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    old_q = tmp_path/"out.quarantine.jsonl"
    old_q.write_text('{"where": "old", "reason": "from an earlier run"}\n' * 9)
    counts = clean_jsonl(src, out, progress=False)
    assert (counts["n_in"], counts["n_out"], counts["n_quarantined"]) == (2000, 1997, 3)
    q = [json.loads(l) for l in old_q.read_text().splitlines()]          # the older quarantine file is replaced
    assert [r["where"] for r in q] == ["in.jsonl:1500", "in.jsonl:1601", "in.jsonl:1701"]
    assert "invalid UTF-8" in q[0]["reason"] and "nesting" in q[1]["reason"] and "carriage return" in q[2]["reason"]
    masked = out.read_text().splitlines()
    assert len(masked) == 1997 and json.loads(masked[-1])["text"] == "note 1999 from <EMAIL_1>"
    assert not list(tmp_path.glob(".*.tmp"))


def test_missing_output_folder_is_created_and_a_file_parent_refused(tmp_path, workspace):
    src = tmp_path/"in.jsonl"
    src.write_text(json.dumps({"text": "mail a@b.org"}) + "\n")
    out = tmp_path/"new"/"deeper"/"out.jsonl"
    res = CliRunner().invoke(clean_cmd, ["--in", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["text"] == "mail <EMAIL_1>"
    (tmp_path/"afile").write_text("x")
    res = CliRunner().invoke(clean_cmd, ["--in", str(src), "--out", str(tmp_path/"afile"/"out.jsonl")])
    assert res.exit_code == 1 and "is not a folder" in res.output and isinstance(res.exception, SystemExit)


def test_a_crash_leaves_the_previous_output_intact(tmp_path, monkeypatch):
    from slm_research.clean import messages as clean_mod   # where mask_records looks replace_slots up
    src, out = tmp_path/"in.jsonl", tmp_path/"out.jsonl"
    src.write_text("".join(json.dumps({"text": f"a{i}@b.org"}) + "\n" for i in range(5)))
    out.write_text("previous output\n")
    calls = []
    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 3: raise KeyboardInterrupt("crash")
        return real(*a, **k)
    real = clean_mod.replace_slots                   # masks each record's slots: crash at the third record
    monkeypatch.setattr(clean_mod, "replace_slots", boom)
    with pytest.raises(KeyboardInterrupt): clean_jsonl(src, out, progress=False)
    assert out.read_text() == "previous output\n" and not list(tmp_path.glob(".*.tmp"))


def test_cli_cleans_the_workspace_store_without_in(tmp_path, workspace, monkeypatch):
    "`slm-research clean` with no --in reads the encrypted store with the workspace's keys and writes calls_clean.parquet."
    from slm_research import capture
    monkeypatch.setenv("SLM_KEYS_DIR", str(tmp_path/"keys"))
    keys = capture.generate_keys(tmp_path/"keys")
    recs = [_call(i, "s1", f"I am Anna Kowalski, anna{i}@example.org") for i in range(4)]
    with capture.SegmentWriter(workspace.processed/"store", keys["public"]) as w:
        for r in recs: w.append(r)
    res = CliRunner().invoke(clean_cmd, ["--out", str(tmp_path/"calls.jsonl")])
    assert res.exit_code == 0, res.output
    out = pl.read_parquet(workspace.processed/"calls_clean.parquet")
    assert out.height == 4 and "anna0@example.org" not in out.write_csv()
    assert len((tmp_path/"calls.jsonl").read_text().splitlines()) == 4
    empty = CliRunner().invoke(clean_cmd, ["--store", str(tmp_path/"nostore")])
    assert empty.exit_code == 1 and "holds no calls" in empty.output


# --- property: canaries anywhere in a record's structure never survive ---------------------------------------

_NEUTRAL_KEYS = st.sampled_from(["note", "info", "extra", "ref", "who", "contact", "data", "x", "misc"])


@st.composite
def canary_records(draw):
    "A chat record with canaries (emails, formatted phones, cards, identifier numbers, participant names) at random places."
    canaries = []
    def canary(kind=None):
        kind = kind or draw(st.sampled_from(["email", "phone", "card", "number"]))
        n = draw(st.integers(10_000, 99_999))
        value = {"email": f"canary.{n}@example.org", "phone": f"(415) 55{n % 10}-{n % 9000 + 1000}",
                 "card": "4" + "".join(str((n * 7 + i) % 10) for i in range(14)), "number": 730_000_000_000 + n}[kind]
        if kind == "card":   # complete the Luhn digit
            from slm_research.clean import luhn_ok
            value = next(value + str(d) for d in range(10) if luhn_ok(value + str(d)))
        canaries.append(str(value))
        return value
    def blob(depth=0):   # nested metadata-like JSON with canaries among plain values
        kind = draw(st.sampled_from(["canary", "plain", "dict", "list"] if depth < 3 else ["canary", "plain"]))
        if kind == "canary": c = canary(); return c if isinstance(c, int) else f"see {c} ok"
        if kind == "plain": return draw(st.sampled_from(["ok", 3, True, None, 2.5, "plain words"]))
        if kind == "dict": return {draw(_NEUTRAL_KEYS): blob(depth + 1) for _ in range(draw(st.integers(1, 3)))}
        return [blob(depth + 1) for _ in range(draw(st.integers(1, 3)))]
    rec = {"id": f"r{draw(st.integers(0, 10**6))}", "request": {"messages": [{"role": "user", "content": "hello"}]}}
    places = draw(st.sets(st.sampled_from(["user", "user_id", "request.user", "metadata", "name", "content", "args", "tool",
                                           "unknown", "part"]), min_size=1))
    msgs = rec["request"]["messages"]
    if "user" in places: rec["user"] = canary("email")
    if "user_id" in places: rec["user_id"] = str(canary("number"))
    if "request.user" in places: rec["request"]["user"] = canary("email")
    if "metadata" in places: rec["request"]["metadata"] = {draw(_NEUTRAL_KEYS): blob()}
    if "name" in places: msgs[0]["name"] = f"Canary_{draw(st.integers(10_000, 99_999))}"; canaries.append(msgs[0]["name"])
    if "content" in places: msgs[0]["content"] = f"reach me at {canary()}"
    if "part" in places: msgs.append({"role": "user", "content": [{"type": "text", "text": f"card {canary('card')}"}]})
    if "args" in places:
        msgs.append({"role": "assistant", "content": None, "tool_calls": [{"id": "t1", "type": "function", "function": {
            "name": "f", "arguments": json.dumps({draw(_NEUTRAL_KEYS): blob(), "id2": canary("number")})}}]})
    if "tool" in places: msgs.append({"role": "tool", "tool_call_id": "t1", "content": json.dumps({"result": blob()})})
    if "unknown" in places: rec[draw(st.sampled_from(["trace", "ctx", "labels"]))] = blob()
    return rec, canaries


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(canary_records(), min_size=1, max_size=6), bad=st.lists(st.sampled_from([b"\xff\xfe", b"[" * 3000, b'{"a": 1}\r{', b"{no"]), max_size=3),
       seed=st.randoms(use_true_random=False))
def test_property_no_canary_survives_json_valid_counts_kept(tmp_path_factory, batch, bad, seed):
    tmp = tmp_path_factory.mktemp("prop")
    lines = [json.dumps(r).encode() for r, _ in batch] + list(bad)
    seed.shuffle(lines)
    src, out = tmp/"in.jsonl", tmp/"out.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    counts = clean_jsonl(src, out, CleanConfig(pseudonym_key=KEY), progress=False, engine=_PROP_ENGINE)
    assert counts["n_in"] == len(lines) == counts["n_out"] + counts["n_quarantined"]
    assert counts["n_out"] == len(batch)
    written = out.read_text() + (tmp/"out.quarantine.jsonl").read_text()
    leaked = [c for _, cs in batch for c in cs if c in written]
    assert leaked == []
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        for m in rec["request"]["messages"]:
            for tc in m.get("tool_calls") or []: json.loads(tc["function"]["arguments"])   # JSON stays JSON
            if m["role"] == "tool": json.loads(m["content"])


_PROP_ENGINE = MaskingEngine(CleanConfig(pseudonym_key=KEY))


# --- the router's request masking ------------------------------------------------------------------------------

ROUTER_REQUEST = {
    "model": "gpt-4o", "temperature": 0.2, "user": "end-user-7",
    "tools": [{"type": "function", "function": {"name": "lookup_account", "description": "Ask ops@corp.example when unsure",
                                                "parameters": {"type": "object", "properties": {"account_number": {"type": "integer"}}}}}],
    "messages": [
        {"role": "system", "content": "You help customers of Brightwater Analytics."},
        {"role": "user", "name": "Jane_Doe", "content": "I am Jane Doe, jane.doe@example.com, call +1 415-555-0132."},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "t1", "type": "function", "function": {
            "name": "lookup_account", "arguments": json.dumps({"account_number": 7300000012345, "email": "jane.doe@example.com"})}}]},
        {"role": "tool", "tool_call_id": "t1", "name": "lookup_account", "content": json.dumps({"ssn": "123-45-6789", "owner": "Jane Doe"})},
        {"role": "user", "content": [{"type": "text", "text": "And my card 4111 1111 1111 1111?"}]}]}
ROUTER_PII = ["Jane_Doe", "Jane Doe", "jane.doe@example.com", "415-555-0132", "7300000012345", "123-45-6789", "4111 1111 1111 1111"]


def test_mask_request_masks_messages_as_the_clean_step_does(engine):
    "The router's masking is S2's: the same messages give the same masked messages as a logged call through `clean`."
    from slm_research.clean import mask_request
    masked, mapping = mask_request(engine, ROUTER_REQUEST)
    dump = json.dumps(masked["messages"], ensure_ascii=False)
    assert [v for v in ROUTER_PII if v in dump] == []
    assert masked["tools"] == ROUTER_REQUEST["tools"] and masked["user"] == "end-user-7" and masked["temperature"] == 0.2
    assert masked["messages"][3]["name"] == "lookup_account"                 # a tool's name on a tool message is kept
    assert json.loads(ROUTER_REQUEST["messages"][2]["tool_calls"][0]["function"]["arguments"])["account_number"] == 7300000012345
    call = _call(1, "s1", "x")
    call["request"] = {k: v for k, v in ROUTER_REQUEST.items() if k in ("model", "messages", "tools")}
    logged = clean(_frame([call]), engine=engine, progress=False)
    assert json.loads(logged["messages"][0]) == masked["messages"]
    assert set(mapping.values()) >= {"jane.doe@example.com", "7300000012345", "123-45-6789", "4111 1111 1111 1111"}
    assert all(re.fullmatch(r"<[A-Z_]+_\d+>", k) for k in mapping) and all(k in dump for k in mapping)
    again, mapping2 = mask_request(engine, {"messages": [{"role": "user", "content": "mail bob@example.org"}]})
    assert again["messages"][0]["content"] == "mail <EMAIL_1>" and mapping2 == {"<EMAIL_1>": "bob@example.org"}   # per request
    with pytest.raises(ValueError, match="messages"):
        mask_request(engine, {"prompt": "hi"})


def test_unmask_restores_content_and_tool_call_arguments(engine):
    "An SLM answer in placeholders gets the raw values back: text, JSON-string arguments (still JSON) and dict arguments."
    from slm_research.clean import mask_request, unmask
    masked, mapping = mask_request(engine, ROUTER_REQUEST)
    email = next(k for k, v in mapping.items() if v == "jane.doe@example.com")
    person = next(k for k, v in mapping.items() if v in ("Jane Doe", "Jane_Doe"))
    answer = {"role": "assistant", "content": f"Thanks {person}, I wrote to {email}.", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "send", "arguments": json.dumps({"to": email, "cc": [f"{person} <{email}>"], "n": 2}, indent=2)}},
        {"id": "b", "type": "function", "function": {"name": "send", "arguments": {"to": email, "who": person}}},
        {"id": "c", "type": "function", "function": {"name": "send", "arguments": f"to={email}"}}]}
    back = unmask(answer, mapping)
    raw_person = mapping[person]
    assert back["content"] == f"Thanks {raw_person}, I wrote to jane.doe@example.com."
    args = back["tool_calls"][0]["function"]["arguments"]
    assert json.loads(args) == {"to": "jane.doe@example.com", "cc": [f"{raw_person} <jane.doe@example.com>"], "n": 2}
    assert args.count("\n") == answer["tool_calls"][0]["function"]["arguments"].count("\n")   # formatting kept
    assert back["tool_calls"][1]["function"]["arguments"] == {"to": "jane.doe@example.com", "who": raw_person}
    assert back["tool_calls"][2]["function"]["arguments"] == "to=jane.doe@example.com"       # not JSON: plain text
    assert answer["content"].startswith("Thanks <")                                           # the input is not changed
    # the masked assistant message of the request itself comes back as it was (string values)
    original = json.loads(ROUTER_REQUEST["messages"][2]["tool_calls"][0]["function"]["arguments"])
    restored = json.loads(unmask(masked["messages"][2], mapping)["tool_calls"][0]["function"]["arguments"])
    assert restored == {"account_number": str(original["account_number"]), "email": original["email"]}
    quoted = unmask({"role": "assistant", "content": None, "tool_calls": [{"id": "q", "type": "function", "function": {
        "name": "f", "arguments": json.dumps({"note": f"say {person}"})}}]}, {person: 'O"Brien \\ Ann'})
    assert json.loads(quoted["tool_calls"][0]["function"]["arguments"]) == {"note": 'say O"Brien \\ Ann'}   # escaped in JSON
    assert unmask({"role": "assistant", "content": "<PHONE_99> stays"}, mapping)["content"] == "<PHONE_99> stays"


# --- each message on its own, each distinct text once, placeholders by conversation -------------------------------

def test_a_cue_in_one_message_decides_nothing_in_another(engine):
    "`ssn` right before nine digits makes them an SSN within a message; across a message boundary it does not."
    one, _ = mask_messages(engine, [{"role": "user", "content": "my ssn 123456789"}], Placeholders())
    assert one[0]["content"] == "my ssn <SSN_1>"
    two, _ = mask_messages(engine, [{"role": "user", "content": "my ssn"},
                                    {"role": "user", "content": "123456789 is the ticket"}], Placeholders())
    assert two[1]["content"] == "<ID_1> is the ticket"


def _conversation_calls():
    "Two sessions; in s1 the user name is announced by a JSON key in the last call only, and mentioned in the first."
    first = _call(1, "s1", "account qx_77_blorp is locked, mail ann@example.org")
    first["timestamp"] = "2025-03-01T10:00:00Z"
    second = _call(2, "s1", "still locked")
    second["timestamp"] = "2025-03-01T10:05:00Z"
    second["request"]["messages"].append({"role": "assistant", "content": None, "tool_calls": [{"id": "t", "type": "function",
        "function": {"name": "unlock", "arguments": json.dumps({"username": "qx_77_blorp", "email": "bob@example.org"})}}]})
    other = _call(3, "s2", "account qx_77_blorp, mail bob@example.org")
    return [first, second, other]


def test_placeholders_belong_to_the_conversation_not_to_the_order_of_calls(engine):
    """A value found in any call of a session is masked in all of them with one placeholder, whatever the order of the
    rows; another session neither learns it nor shares its numbering."""
    frame = _frame(_conversation_calls())
    out = clean(frame, engine=engine, progress=False)
    msgs = {r["id"]: json.loads(r["messages"]) for r in out.iter_rows(named=True)}
    assert msgs["call-1"][0]["content"] == "account <USER_1> is locked, mail <EMAIL_1>"
    assert json.loads(msgs["call-2"][1]["tool_calls"][0]["function"]["arguments"]) == {"username": "<USER_1>", "email": "<EMAIL_2>"}
    assert msgs["call-3"][0]["content"] == "account qx_77_blorp, mail <EMAIL_1>"       # s2 knows nothing of s1
    for seed in range(3):
        shuffled = clean(frame.sample(fraction=1.0, shuffle=True, seed=seed), engine=engine, progress=False)
        assert shuffled.sort("id").equals(out.sort("id"))
    records = _conversation_calls()                                                  # the JSONL path agrees
    masked = mask_records(engine, records[::-1])[::-1]
    assert masked[0][0]["request"]["messages"][0]["content"] == "account <USER_1> is locked, mail <EMAIL_1>"
    assert masked[2][0]["request"]["messages"][0]["content"] == "account qx_77_blorp, mail <EMAIL_1>"


def test_each_distinct_text_is_analysed_once_and_the_cache_holds_no_text():
    "A message repeated in every call of a growing conversation is analysed once; the cache keeps keyed hashes and offsets."
    from slm_research.clean import ModelNerRecognizer
    seen = []
    def predict(text):
        seen.append(text)
        return [(text.index("Zorblax"), text.index("Zorblax") + 7, "PER", 0.9)] if "Zorblax" in text else []
    engine = MaskingEngine(extra_recognizers=[ModelNerRecognizer(predict)])
    history, calls = [], []
    for i in range(6):
        history = history + [{"role": "user", "content": f"step {i}: ask Zorblax about order {i}"},
                             {"role": "assistant", "content": f"done {i}"}]
        r = _call(i, "s1", "x")
        r["request"]["messages"] = history
        calls.append(r)
    out = clean(_frame(calls), engine=engine, progress=False)
    assert sorted(seen) == sorted({m["content"] for m in history} | {"ok"})      # 13 distinct texts (responses "ok"), once each
    assert json.loads(out["messages"][5])[0]["content"] == "step 0: ask <PERSON_1> about order 0"
    cached = repr(engine._cache)
    assert engine._cache and not any(w in cached for w in ("Zorblax", "step", "order", "done"))
    assert all(sum(isinstance(x, bytes) and len(x) == 16 for x in k) == 1 for k in engine._cache)   # one keyed hash each
    again = MaskingEngine(CleanConfig(cache_entries=0), extra_recognizers=[ModelNerRecognizer(predict)])
    seen.clear()
    clean(_frame(calls), engine=again, progress=False)                            # no cache: every copy analysed
    assert len(seen) > 13 and not again._cache


# --- phones by their shape, licences by their cue, organisations by what is said of them ---------------------------

@pytest.mark.parametrize("phone", ["555.123.4567x123", "001-555-123-4567", "001-824-435-0496x303", "+1-555-123-4567 ext. 89",
                                   "012 345 6789", "(12) 3456-7890", "12-34-56-78", "(099) 555-0100", "+44 20 7946 0958",
                                   "07700 063 966"])
def test_phone_numbers_by_shape_not_by_area_code(engine, phone):
    "Extensions, international prefixes, unassigned area codes and other countries' groupings are phone numbers."
    assert engine.mask(f"call {phone} today")[0] == "call <PHONE_1> today"
    assert engine.mask(f"{phone}-Office")[0] == "<PHONE_1>-Office"            # a label after the number


def test_licences_after_a_cue_and_what_stays(engine):
    assert engine.mask("My driver's license number is U62928788557186")[0] == "My driver's license number is <LICENSE_1>"
    assert engine.mask("DL# 2270-66-1551 expired")[0] == "DL# <LICENSE_1> expired"   # not a phone: the cue says licence
    assert engine.mask("3660170548-Fax")[0] == "<PHONE_1>-Fax"
    for plain in ["Apache License 2.0 applies", "zip 94107-1234 only", "version 2024-01-02", "see 12 items",
                  "class User:\n    name: Optional[str] = None\n    admin: bool = False"]:
        assert not [r for r in engine.analyze(plain) if r.entity_type in ("PHONE_NUMBER", "US_DRIVER_LICENSE", "PERSON")], plain


def test_organisations_by_cue_list_possessive_and_legal_form(engine):
    found = lambda t: {(t[r.start:r.end], r.entity_type) for r in engine.analyze(t)}
    for text, org in [("Verdafero is the brainchild of our 3 founders.", "Verdafero"),
                      ("She moved to Balefire Global, which later became Credit Karma in 1980.", "Credit Karma"),
                      ("The version recorded for Capital Cube sold well.", "Capital Cube"),
                      ("Nera Economic Consulting, Blackrock and Greatschools lead the market.", "Blackrock"),
                      ("including Panjiva's Riku Andou and others", "Panjiva"),
                      ("selma is from stillwater supercomputing inc.", "stillwater supercomputing inc.")]:
        assert (org, "ORGANIZATION") in found(text), (text, found(text))
    assert ("Riku Andou", "PERSON") in found("including Panjiva's Riku Andou and others")
    assert not {v for v, l in found("Anna, Paris and Acme Inc. met in Rome.") if l == "ORGANIZATION"} - {"Acme Inc."}
