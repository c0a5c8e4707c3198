"S1 capture: real X25519/AES-GCM segments, a real proxy on 127.0.0.1 driven by the real openai client, importers under fuzzing."
import asyncio
import json
import os
from pathlib import Path

import openai
import polars as pl
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slm_research.capture import capture_cmd
from slm_research.capture.client import capture_openai
from slm_research.capture.fake_llm import demo_upstream_app, serve
from slm_research.capture.importers import FORMATS, ImportStats, parse_lines
from slm_research.capture.keys import Pseudonymizer, generate_keys, load_private_keys
from slm_research.capture.proxy import RouteResult, create_app
from slm_research.capture.records import RAW_SCHEMA
from slm_research.capture.store import SegmentWriter, StoreError, export_frame, list_segments, read_segment, read_store
from slm_research.core import Quarantine
from slm_research.corpus import generate_records


@pytest.fixture
def keys(tmp_path):
    return generate_keys(tmp_path/"keys")


@pytest.fixture
def writer(tmp_path, keys):
    w = SegmentWriter(tmp_path/"store", keys["public"], Pseudonymizer(keys["pseudonym"]))
    yield w
    w.close()


def corpus(n=120, seed=4):
    return [(r, g) for r, g, _ in generate_records(n, seed)]


def fill(writer, records):
    for r in records: writer.append(r)
    writer.close()


# ---- the encrypted store -------------------------------------------------------------------------

def test_segments_hold_no_plaintext_and_read_back_exactly(tmp_path, keys, writer):
    data = corpus(300)
    writer.max_records = 100
    fill(writer, [r for r, _ in data])
    segs = list_segments(tmp_path/"store")
    assert len(segs) == 3 and all(p.suffix == ".seg" for p in segs)
    blob = b"".join(p.read_bytes() for p in segs)
    needles = {s["text"] for _, g in data for s in g["pii"]} | {r["user_id"] for r, _ in data} | {r["session_id"] for r, _ in data}
    needles |= {m["content"][:30] for r, _ in data for m in r["request"]["messages"] if isinstance(m["content"], str) and len(m["content"]) > 30}
    assert len(needles) > 400
    assert [n for n in needles if n.encode() in blob] == []
    back = list(read_store(tmp_path/"store", load_private_keys(keys["private"])))
    ps = Pseudonymizer(keys["pseudonym"])
    assert [b["id"] for b in back] == [r["id"] for r, _ in data]
    for (r, _), b in zip(data, back):
        assert b["user_id"] == ps(r["user_id"], "user") and b["session_id"] == ps(r["session_id"], "session")
        assert {k: v for k, v in b.items() if k not in ("user_id", "session_id")} == {k: v for k, v in r.items() if k not in ("user_id", "session_id")}


def test_wrong_key_fails_naming_the_segment(tmp_path, keys, writer):
    fill(writer, [r for r, _ in corpus(5)])
    seg = list_segments(tmp_path/"store")[0]
    other = generate_keys(tmp_path/"other")
    with pytest.raises(StoreError, match=f"segment {seg.name}: encrypted to analyst key {keys['key_id']}"):
        list(read_store(tmp_path/"store", load_private_keys(other["private"])))
    # a key whose id matches but whose secret differs (a forged key id) fails authentication, not silently
    forged = {keys["key_id"]: load_private_keys(other["private"])[other["key_id"]]}
    with pytest.raises(StoreError, match=f"segment {seg.name}: cannot unwrap the data key"):
        list(read_segment(seg, forged))


def test_swapped_truncated_or_extended_segments_are_detected(tmp_path, keys, writer):
    writer.max_records = 3
    fill(writer, [r for r, _ in corpus(6)])
    a, b = list_segments(tmp_path/"store")
    priv = load_private_keys(keys["private"])
    ga, gb = a.read_bytes(), b.read_bytes()
    a.write_bytes(gb)  # same name, other segment's content
    with pytest.raises(StoreError, match=f"{a.name}: file holds segment"): list(read_segment(a, priv))
    a.write_bytes(ga[:-40])  # a sealed segment cut short
    with pytest.raises(StoreError, match=a.name): list(read_segment(a, priv))
    a.write_bytes(ga + gb[-60:])  # frames appended after the seal
    with pytest.raises(StoreError, match=f"{a.name}: .*after the seal"): list(read_segment(a, priv))


def test_crash_mid_write_loses_at_most_the_record_being_written(tmp_path, keys, writer):
    for r, _ in corpus(5): writer.append(r)   # not closed: the segment is still `.open`
    seg = list_segments(tmp_path/"store")[0]
    assert seg.suffix == ".open"
    full = seg.read_bytes()
    for cut in (1, 17, 60):  # the process died while writing the last frame
        seg.write_bytes(full[:-cut])
        report = []
        got = list(read_segment(seg, load_private_keys(keys["private"]), report))
        assert len(got) == 4 and report[0].sealed is False and report[0].lost_bytes > 0
    seg.write_bytes(full)
    writer._f = None  # the crashed writer never seals


def test_rotation_new_segments_use_the_new_key(tmp_path, keys):
    store = tmp_path/"store"
    data = [r for r, _ in corpus(8)]
    fill(SegmentWriter(store, keys["public"], Pseudonymizer(keys["pseudonym"])), data[:4])
    new = generate_keys(tmp_path/"keys")  # rotate: capture.pub.pem now points at the new key
    fill(SegmentWriter(store, new["public"], Pseudonymizer(keys["pseudonym"])), data[4:])
    both = load_private_keys([keys["private"], new["private"]])
    assert [r["id"] for r in read_store(store, both)] == [r["id"] for r in data]
    old_seg = list_segments(store)[0]
    with pytest.raises(StoreError, match=f"{old_seg.name}: encrypted to analyst key {keys['key_id']}"):
        list(read_store(store, load_private_keys(new["private"])))
    os.environ.pop("SLM_ANALYST_PRIVATE_KEYS", None)


def test_keys_from_environment(tmp_path, keys, monkeypatch):
    monkeypatch.setenv("SLM_CAPTURE_PUBLIC_KEY", Path(keys["public"]).read_text())
    monkeypatch.setenv("SLM_PSEUDONYM_KEY", Path(keys["pseudonym"]).read_text().strip())
    monkeypatch.setenv("SLM_ANALYST_PRIVATE_KEYS", str(keys["private"]))
    monkeypatch.setenv("SLM_KEYS_DIR", str(tmp_path/"empty"))
    fill(SegmentWriter(tmp_path/"s"), [r for r, _ in corpus(3)])
    assert len(list(read_store(tmp_path/"s"))) == 3


def test_export_frame_has_the_raw_schema(tmp_path, keys, writer):
    fill(writer, [r for r, _ in corpus(50)])
    frame = export_frame(tmp_path/"store", load_private_keys(keys["private"]))
    assert frame.schema == pl.Schema(RAW_SCHEMA) and frame.height == 50
    assert frame["timestamp"].null_count() == 0 and frame["messages"].str.starts_with("[").all()


# ---- segment formats: repeated history stored once, format 1 still read --------------------------

FIXTURE_V1 = Path(__file__).parent/"fixtures"/"store_v1"
V1_KEY = "b002d146c58fccc31eb718294c66e7810e6bbc5f2d00b8dc5f5bff5763288b70"   # a throwaway key made for the fixture


def test_a_store_written_before_format_2_still_reads_and_exports(tmp_path):
    "The fixture was written by the segment writer before format 2 existed (see its README); copied, never changed."
    import shutil
    import warnings
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from slm_research.capture.keys import key_id
    from slm_research.capture.records import to_frame
    from slm_research.capture.store import ExportStats
    store = shutil.copytree(FIXTURE_V1, tmp_path/"store")
    key = X25519PrivateKey.from_private_bytes(bytes.fromhex(V1_KEY))
    priv = {key_id(key.public_key()): key}
    expected = json.loads((store/"records.json").read_text())
    assert all(p.read_bytes().startswith(b"SLMSEG1\n") for p in list_segments(store))
    report = []
    assert list(read_store(store, priv, report)) == expected
    assert [(r.n_records, r.sealed, r.status) for r in report] == [(3, True, "ok"), (2, True, "ok"), (1, False, "ok")]
    stats = ExportStats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # no gap to warn about
        frame = export_frame(store, priv, stats=stats)
    assert frame.equals(to_frame(expected)) and stats.n_read == 6
    # a store that goes on in format 2 after an upgrade: one export reads both formats, the manifest covers both
    w = SegmentWriter(store, key.public_key(), Pseudonymizer(b"f" * 32))
    fill(w, [{**valid_raw(1), "id": "after-upgrade"}])
    assert list_segments(store)[-1].read_bytes().startswith(b"SLMSEG2\n")
    both = export_frame(store, priv, strict=True)
    assert both["id"].to_list() == [r["id"] for r in expected] + ["after-upgrade"]


def write_both_formats(tmp_path, keys, records, max_records=10_000):
    "The same records written in format 1 and format 2: {format: (store, bytes of its segments)}."
    out = {}
    for fmt in (1, 2):
        store = tmp_path/f"format{fmt}"
        fill(SegmentWriter(store, keys["public"], Pseudonymizer(keys["pseudonym"]), max_records, format=fmt), records)
        out[fmt] = store, sum(p.stat().st_size for p in list_segments(store))
    return out


def test_format_2_stores_repeated_history_once_and_exports_the_same_frame(tmp_path, keys, shared_external):
    "Real multi-turn logs: every step repeats the conversation and the tool schemas. Several segments, as in a long capture."
    with (shared_external/"bfcl_multiturn_calls.jsonl").open("rb") as f:
        records = list(parse_lines(f, "openai", "bfcl"))
    stores = write_both_formats(tmp_path, keys, records, max_records=400)
    priv = load_private_keys(keys["private"])
    (old, old_bytes), (new, new_bytes) = stores[1], stores[2]
    assert len(list_segments(new)) == 3
    assert export_frame(new, priv, strict=True).equals(export_frame(old, priv, strict=True))
    assert list(read_store(new, priv)) == list(read_store(old, priv))
    assert new_bytes * 4 <= old_bytes, (old_bytes, new_bytes)
    seg = list_segments(new)[0].read_bytes()
    assert not any(t["function"]["description"][:30].encode() in seg for t in records[0]["request"]["tools"])   # encrypted all the same


def test_format_2_reads_back_every_record_of_the_corpus_exactly(tmp_path, keys):
    "Key order, nulls, non-ASCII text, records without messages or tools, records that are not calls at all."
    records = [r for r, _ in corpus(150)]
    records += [{"id": "odd-1", "request": {"invalid_body": [1, 2]}}, {"id": "odd-2", "request": {"messages": "not a list"}},
                {"id": "odd-3", "request": {"tools": [], "messages": [], "model": "m"}}, {"id": "odd-4"},
                {"id": "odd-5", "request": {"messages": [{"role": "user", "content": "naïve\u2028line\nnext"}] * 3}}]
    stores = write_both_formats(tmp_path, keys, records, max_records=40)
    priv = load_private_keys(keys["private"])
    old, new = list(read_store(stores[1][0], priv)), list(read_store(stores[2][0], priv))
    assert new == old and [json.dumps(r) for r in new] == [json.dumps(r) for r in old]     # the same key order too
    assert export_frame(stores[2][0], priv).equals(export_frame(stores[1][0], priv))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [1, 2])
def test_every_single_flipped_byte_is_detected(tmp_path, keys, fmt):
    w = SegmentWriter(tmp_path/"store", keys["public"], Pseudonymizer(keys["pseudonym"]), format=fmt)
    fill(w, [valid_raw(i) for i in range(3)])  # small records: every byte of the file is flipped in turn
    seg = list_segments(tmp_path/"store")[0]
    good, priv = seg.read_bytes(), load_private_keys(keys["private"])
    assert len(list(read_segment(seg, priv))) == 3
    for pos in range(len(good)):
        for bit in (0x01, 0x80):
            bad = bytearray(good); bad[pos] ^= bit
            seg.write_bytes(bytes(bad))
            with pytest.raises(StoreError, match=seg.name):
                list(read_segment(seg, priv))
    seg.write_bytes(good)


def test_a_segment_whose_magic_claims_the_other_format_is_refused(tmp_path, keys, writer):
    fill(writer, [valid_raw(i) for i in range(2)])
    seg = list_segments(tmp_path/"store")[0]
    seg.write_bytes(b"SLMSEG1\n" + seg.read_bytes()[8:])
    with pytest.raises(StoreError, match=f"{seg.name}: magic says format 1, the header format 2"):
        list(read_segment(seg, load_private_keys(keys["private"])))


def test_a_failed_write_leaves_the_segment_open_and_the_next_record_starts_a_new_one(tmp_path, keys, writer):
    "A disk error mid-write must not leave the writer's item table or deflate stream ahead of the file."
    writer.append(valid_raw(0))
    real = writer._f.write
    writer._f.write = lambda data: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="No space"):
        writer.append(valid_raw(1))
    assert writer._f is None and real.__self__.closed
    writer.append(valid_raw(2))
    writer.close()
    report = []
    back = list(read_store(tmp_path/"store", load_private_keys(keys["private"]), report))
    assert [r["id"] for r in back] == ["ok-0", "ok-2"]
    assert sorted((r.sealed, r.n_records, r.status) for r in report) == [(False, 1, "ok"), (True, 1, "ok")]


# ---- proxy and wrapper ---------------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}


def logged(tmp_path, keys):
    return list(read_store(tmp_path/"store", load_private_keys(keys["private"])))


def test_proxy_forwards_and_logs_with_the_real_openai_client(tmp_path, keys, writer):
    with serve(demo_upstream_app()) as up, serve(create_app(up.url, writer, agent="cradle")) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test-not-logged", max_retries=0)
        r = client.chat.completions.create(model="demo-llm", messages=[{"role": "user", "content": "hello there"}],
                                           extra_headers={"X-SLM-User": "u42", "X-SLM-Session": "sess-1"})
        assert r.choices[0].message.content == "echo: hello there"
        chunks = list(client.chat.completions.create(model="demo-llm", messages=[{"role": "user", "content": "stream please"}],
                                                     stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: stream please"
        tc = client.chat.completions.create(model="demo-llm", messages=[{"role": "user", "content": "find x"}], tools=[TOOL], stream=True)
        args = "".join(c.choices[0].delta.tool_calls[0].function.arguments or "" for c in tc if c.choices and c.choices[0].delta.tool_calls)
        assert json.loads(args) == {"text": "find x"}
        assert [m.id for m in client.models.list()] == ["demo-llm"]
        assert up.server.config.app.state.calls["calls"] == 3
    writer.close()
    recs = logged(tmp_path, keys)
    assert len(recs) == 3 and all(r["agent"] == "cradle" and r["served_by"] == "upstream" and r["latency_ms"] > 0 for r in recs)
    ps = Pseudonymizer(keys["pseudonym"])
    assert recs[0]["user_id"] == ps("u42") and recs[0]["session_id"] == ps("sess-1", "session")
    assert recs[1]["response"]["choices"][0]["message"]["content"] == "echo: stream please"
    assert recs[1]["response"]["usage"]["total_tokens"] > 0
    call = recs[2]["response"]["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "lookup" and json.loads(call["function"]["arguments"]) == {"text": "find x"}
    assert recs[2]["request"]["tools"] == [TOOL]
    assert b"sk-test-not-logged" not in b"".join(p.read_bytes() for p in list_segments(tmp_path/"store"))
    assert "sk-test-not-logged" not in json.dumps(recs)


def test_proxy_logs_upstream_failures(tmp_path, keys, writer):
    with serve(create_app("http://127.0.0.1:9", writer)) as proxy:  # nothing listens on port 9
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 502
    writer.close()
    (rec,) = logged(tmp_path, keys)
    assert rec["response"] is None and rec["error"].startswith("upstream unreachable")


class HalfRouter:
    "Serves calls whose last message mentions 'small'; sends the rest upstream."
    def handle(self, request):
        text = request["messages"][-1]["content"]
        if "small" in text:
            return RouteResult({"id": "slm-1", "object": "chat.completion", "created": 0, "model": "slm-cluster-3",
                                "choices": [{"index": 0, "message": {"role": "assistant", "content": "slm answer"}, "finish_reason": "stop"}],
                                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}, "slm:cluster-3/v1", 3)
        return RouteResult(None, "upstream", 5, "low confidence")


def test_proxy_with_router(tmp_path, keys, writer):
    with serve(demo_upstream_app()) as up, serve(create_app(up.url, writer, router=HalfRouter())) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a small one"}]).choices[0].message.content == "slm answer"
        s = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "small, streamed"}], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == "slm answer"
        assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a big one"}]).choices[0].message.content == "echo: a big one"
        assert up.server.config.app.state.calls["calls"] == 1
    writer.close()
    recs = logged(tmp_path, keys)
    assert [(r["served_by"], r["cluster"], r["fallback_reason"]) for r in recs] == [
        ("slm:cluster-3/v1", 3, None), ("slm:cluster-3/v1", 3, None), ("upstream", 5, "low confidence")]


def test_client_wrapper_sync_async_stream_and_errors(tmp_path, keys, writer):
    with serve(demo_upstream_app()) as up:
        client = capture_openai(openai.OpenAI(base_url=up.url + "/v1", api_key="x", max_retries=0), writer, agent="metagpt", user_id="alice")
        assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "one"}]).choices[0].message.content == "echo: one"
        with client.chat.completions.create(model="m", messages=[{"role": "user", "content": "two"}], stream=True) as s:
            assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == "echo: two"

        async def run_async():
            ac = capture_openai(openai.AsyncOpenAI(base_url=up.url + "/v1", api_key="x", max_retries=0), writer, agent="metagpt")
            r = await ac.chat.completions.create(model="m", messages=[{"role": "user", "content": "three"}])
            parts = [c.choices[0].delta.content or "" async for c in await ac.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "four"}], stream=True) if c.choices]
            return r.choices[0].message.content, "".join(parts)
        assert asyncio.run(run_async()) == ("echo: three", "echo: four")
    broken = capture_openai(openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="x", max_retries=0), writer)
    with pytest.raises(openai.APIConnectionError):
        broken.chat.completions.create(model="m", messages=[{"role": "user", "content": "five"}])
    writer.close()
    recs = logged(tmp_path, keys)
    contents = [r["response"]["choices"][0]["message"]["content"] if r["response"] else None for r in recs]
    assert contents == ["echo: one", "echo: two", "echo: three", "echo: four", None]
    assert recs[-1]["error"].startswith("APIConnectionError")
    assert recs[0]["user_id"] == Pseudonymizer(keys["pseudonym"])("alice")
    assert all(r["request"]["messages"][0]["role"] == "user" for r in recs)


# ---- importers -------------------------------------------------------------------------------------

def test_importers_read_each_format(tmp_path):
    ft = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                       {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
          "tools": [TOOL]}
    batch = {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "q"}]}}
    st_ = ImportStats()
    recs = list(parse_lines([json.dumps(ft), json.dumps(batch)], "openai", "a", stats=st_))
    assert [r["id"] for r in recs] == ["input:1", "req-1"] and recs[0]["response"]["choices"][0]["finish_reason"] == "tool_calls"
    assert recs[0]["request"]["tools"] == [TOOL] and recs[1]["response"] is None
    sg = {"id": "conv7", "system": "be brief", "conversations": [
        {"from": "human", "value": "weather?"}, {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}]}
    recs = list(parse_lines([json.dumps(sg)], "sharegpt", "a"))
    assert [r["id"] for r in recs] == ["conv7-t1", "conv7-t3"]
    assert recs[0]["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "weather"
    assert [m["role"] for m in recs[1]["request"]["messages"]] == ["system", "user", "assistant", "tool"]
    old_style = {"resourceSpans": [{"scopeSpans": [{"spans": [{"spanId": "s1", "traceId": "t", "attributes": [
        {"key": "gen_ai.system", "value": {"stringValue": "openai"}},
        {"key": "gen_ai.prompt.0.role", "value": {"stringValue": "user"}}, {"key": "gen_ai.prompt.0.content", "value": {"stringValue": "hi"}},
        {"key": "gen_ai.completion.0.role", "value": {"stringValue": "assistant"}}, {"key": "gen_ai.completion.0.content", "value": {"stringValue": "yo"}}]}]}]}]}
    (r,) = parse_lines([json.dumps(old_style)], "otel", "a")
    assert r["response"]["choices"][0]["message"]["content"] == "yo" and r["session_id"] == "t"
    assert list(parse_lines([json.dumps(old_style)], "otlp", "a")) == [r]   # otlp: the same format


def valid_raw(i: int) -> dict:
    return {"id": f"ok-{i}", "agent": "a", "timestamp": "2025-03-01T00:00:00Z", "user_id": "u", "session_id": None,
            "request": {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]},
            "response": {"choices": [{"index": 0, "message": {"role": "assistant", "content": "a"}}]}, "latency_ms": 1.0, "error": None}


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(
                               ["messages", "role", "content", "conversations", "from", "value", "body", "resourceSpans", "scopeSpans",
                                "spans", "attributes", "key", "id", "agent", "request", "response", "choices", "message", "tool_calls", "x"]), c, max_size=5),
                           max_leaves=25)
mutated = {**valid_raw(0), "id": "mutated"}
garbage = st.one_of(json_values.map(json.dumps), st.text(max_size=60), st.binary(max_size=60),
                    st.builds(lambda k, v: json.dumps({**mutated, k: v}), st.sampled_from(list(mutated)), json_values))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(garbage, st.integers(0, 10**6).map(lambda i: json.dumps(valid_raw(i)))), max_size=12), st.sampled_from(FORMATS))
def test_importers_fuzz_never_crash_and_never_lose_a_record(lines, fmt):
    q = Quarantine(Path(os.devnull))
    stats = ImportStats()
    out = list(parse_lines(lines, fmt, "fuzz", "f.jsonl", q, stats=stats))  # no exception escapes
    assert stats.n_in == stats.n_units_ok + stats.n_quarantined + stats.n_skipped
    assert len(q) == stats.n_quarantined and all(item.reason for item in q.items)
    assert len(out) == stats.n_records
    if fmt == "raw":  # every valid record comes out
        expected = [json.loads(l)["id"] for l in lines if isinstance(l, str) and l.startswith('{"id": "ok-')]
        assert [r["id"] for r in out if r["id"].startswith("ok-")] == expected


# ---- command line ----------------------------------------------------------------------------------

def test_cli_keygen_import_export(tmp_path, monkeypatch, workspace):
    monkeypatch.setenv("SLM_KEYS_DIR", str(tmp_path/"k"))
    runner = CliRunner()
    assert runner.invoke(capture_cmd, ["keygen"]).exit_code == 0
    src = tmp_path/"calls.jsonl"
    src.write_text("\n".join([json.dumps(r) for r, _ in corpus(30)] + ["{broken"]) + "\n")
    res = runner.invoke(capture_cmd, ["import", str(src), "--format", "raw", "--store", str(tmp_path/"store")])
    assert res.exit_code == 0, res.output
    assert "31 in, 30 records stored, 1 quarantined" in res.output
    qfile = workspace.processed/"quarantine"/"capture-import.jsonl"
    assert json.loads(qfile.read_text())["where"] == "calls.jsonl:31"
    res = runner.invoke(capture_cmd, ["export", "--store", str(tmp_path/"store"), "--out", str(workspace.processed/"x.parquet")])
    assert res.exit_code != 0 and "refusing" in res.output
    res = runner.invoke(capture_cmd, ["export", "--store", str(tmp_path/"store"), "--out", str(tmp_path/"x.parquet")])
    assert res.exit_code == 0, res.output
    assert pl.read_parquet(tmp_path/"x.parquet").height == 30


# ---- no raw user id is ever stored ------------------------------------------------

def test_user_ids_are_pseudonymised_in_every_place_they_appear(tmp_path, keys, writer):
    email = "jane.doe@example.com"
    with serve(demo_upstream_app()) as up, serve(create_app(up.url, writer)) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], user=email)
    lines = [json.dumps({"custom_id": "b1", "body": {"model": "m", "user": email, "messages": [{"role": "user", "content": "q"}]}}),
             json.dumps({"id": "p1", "user": email, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})]
    for r in parse_lines(lines, "openai", "imp"): writer.append(r)
    writer.append({**valid_raw(1), "user_id": None, "user": email, "request": {"user": email, "messages": [{"role": "user", "content": "q"}]}})
    writer.close()
    blob = b"".join(p.read_bytes() for p in list_segments(tmp_path/"store"))
    recs = logged(tmp_path, keys)
    pseudonym = Pseudonymizer(keys["pseudonym"])(email)
    assert len(recs) == 4 and email.encode() not in blob and email not in json.dumps(recs)
    assert [r["user_id"] for r in recs] == [pseudonym] * 4
    assert [r["request"]["user"] for r in recs] == [pseudonym] * 4
    assert recs[3]["user"] == pseudonym


# ---- conversation keys --------------------------------------------------------------------------

def conversation_lines(n_conv=40, n_turns=3):
    "OpenAI chat lines with no session id: each conversation's later turns repeat its opening."
    lines, owner = [], {}
    for c in range(n_conv):
        msgs = [{"role": "system", "content": "You are a travel agent."}, {"role": "user", "content": f"Trip {c}: plan it"}]
        for t in range(n_turns):
            lid = f"c{c}-t{t}"
            lines.append(json.dumps({"id": lid, "messages": msgs + [{"role": "assistant", "content": f"answer {t}"}]}))
            owner[lid] = c
            msgs = msgs + [{"role": "assistant", "content": f"answer {t}"}, {"role": "user", "content": f"more {t}"}]
    return lines, owner


def test_conversation_keys_keep_each_conversation_in_one_split(tmp_path, keys, writer):
    from slm_research.workspace import split_by_session
    lines, owner = conversation_lines()
    lines.append(json.dumps({"id": "meta-1", "metadata": {"conversation_id": "conv-x"}, "user": "u1",
                             "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    lines.append(json.dumps({"id": "meta-2", "metadata": {"conversation_id": "conv-x"},
                             "messages": [{"role": "user", "content": "other opening"}, {"role": "assistant", "content": "c"}]}))
    for r in parse_lines(lines, "openai", "imp"): writer.append(r)
    writer.close()
    frame = export_frame(tmp_path/"store", load_private_keys(keys["private"]))
    assert frame["session"].null_count() == 0 and frame["session"].str.starts_with("s-").all()
    sess = dict(zip(frame["id"], frame["session"]))
    assert len({sess[i] for i in owner}) == 40                                      # one session per conversation
    assert all(sess[i] == sess[f"c{c}-t0"] for i, c in owner.items())
    assert sess["meta-1"] == sess["meta-2"]                                          # metadata wins over user and opening
    split = split_by_session(frame.filter(pl.col("id").is_in(list(owner))))
    by_conv = split.with_columns(conv=pl.col("id").replace_strict(owner)).group_by("conv").agg(pl.col("split").n_unique())
    assert by_conv["split"].max() == 1 and split["split"].n_unique() > 1             # no conversation divided, splits used


# ---- export reports every gap --------------------------------------------------------------------

def test_export_reports_truncated_missing_and_empty_segments(tmp_path, keys, monkeypatch):
    import random
    import warnings
    from slm_research.capture.store import ExportStats, StoreWarning
    store = tmp_path/"store"
    w = SegmentWriter(store, keys["public"], Pseudonymizer(keys["pseudonym"]), max_records=30)
    for i in range(119): w.append(valid_raw(i))
    a, b, c, crashed = list_segments(store)                   # 30 + 30 + 30 sealed, 29 in the open one
    full = crashed.read_bytes()
    cut = random.Random(3).randrange(len(full) // 3, len(full) - 50)
    crashed.write_bytes(full[:cut])                           # a crash mid-write at a random offset
    b.unlink()                                                # a deleted segment
    (store/"seg-00000000T000000000000-empty.open").write_bytes(b"")          # died before the header
    (store/"seg-00000000T000000000001-short.open").write_bytes(full[:20])    # died inside the header
    priv = load_private_keys(keys["private"])
    stats = ExportStats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = export_frame(store, priv, stats=stats)
    rep = {r.segment: r for r in stats.segments}
    assert rep[b.name].status == "missing" and rep[b.name].lost_records == 30
    part = rep[crashed.name]
    assert part.status == "partial" and part.n_records + part.lost_records == 29 and part.lost_records > 0
    assert len(full) - cut <= part.lost_bytes < len(full) - cut + 200   # the cut-off tail plus the partial frame before it
    assert {r.status for name, r in rep.items() if "empty" in name or "short" in name} == {"skipped"}
    assert frame.height == 60 + part.n_records
    assert len([x for x in caught if issubclass(x.category, StoreWarning)]) == 4
    with pytest.raises(StoreError, match="--strict"):
        export_frame(store, priv, strict=True)
    monkeypatch.setenv("SLM_ANALYST_PRIVATE_KEYS", str(keys["private"]))
    res = CliRunner().invoke(capture_cmd, ["export", "--store", str(store)])
    assert res.exit_code == 0 and "lost_bytes" in res.output and "partial" in res.output and "missing" in res.output
    res = CliRunner().invoke(capture_cmd, ["export", "--store", str(store), "--strict"])
    assert res.exit_code == 1 and "--strict" in res.output and "Traceback" not in res.output
    w._f = None


# ---- non-object JSON and abandoned calls --------------------------------------------------------

def slow_stream_app():
    "An upstream that streams one chunk, then waits: the client gives up in between."
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat():
        async def gen():
            base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
            yield b"data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "part"}}]}).encode() + b"\n\n"
            await asyncio.sleep(3)
            yield b"data: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream")
    return app


def test_proxy_rejects_non_object_json_with_400_and_marks_abandoned_calls(tmp_path, keys, writer):
    import httpx
    import time
    with serve(demo_upstream_app()) as up, serve(create_app(up.url, writer)) as proxy:
        for body in (b"[]", b"42", b"null", b"{not json"):
            r = httpx.post(proxy.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with serve(demo_upstream_app(delay_s=1.0)) as slow, serve(create_app(slow.url, writer)) as proxy:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(proxy.url + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "gone"}]}, timeout=0.2)
        time.sleep(1.5)   # the proxy still gets the upstream's answer, and logs it
    with serve(slow_stream_app()) as slow, serve(create_app(slow.url, writer)) as proxy:
        with httpx.stream("POST", proxy.url + "/v1/chat/completions", json={"model": "m", "stream": True,
                          "messages": [{"role": "user", "content": "left"}]}) as s:
            next(s.iter_raw())  # one chunk, then the client leaves
        time.sleep(0.5)
    writer.close()
    recs = logged(tmp_path, keys)
    assert [r["error"].split(":")[0] for r in recs[:4]] == ["invalid request"] * 4
    assert [r["request"].get("invalid_body", "?") for r in recs[:4]] == [[], 42, None, "?"]
    assert recs[4]["abandoned"] is True and recs[4]["response"]["choices"][0]["message"]["content"] == "echo: gone"
    assert recs[5]["abandoned"] is True and recs[5]["response"]["choices"][0]["message"]["content"] == "part"
    frame = export_frame(tmp_path/"store", load_private_keys(keys["private"]))
    assert frame["abandoned"].to_list() == [False] * 4 + [True, True]


# ---- private Parquet, no duplicates on re-import, one-line key errors ------------------------------

def test_export_parquet_is_private_reimport_adds_no_duplicates_key_errors_are_one_line(tmp_path, monkeypatch, workspace):
    monkeypatch.setenv("SLM_KEYS_DIR", str(tmp_path/"k"))
    runner = CliRunner()
    assert runner.invoke(capture_cmd, ["keygen"]).exit_code == 0
    src = tmp_path/"calls.jsonl"
    src.write_text("\n".join(json.dumps(r) for r, _ in corpus(25)) + "\n")
    store = tmp_path/"store"
    for _ in range(2):
        assert runner.invoke(capture_cmd, ["import", str(src), "--format", "raw", "--store", str(store)]).exit_code == 0
    out = tmp_path/"x.parquet"
    res = runner.invoke(capture_cmd, ["export", "--store", str(store), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert pl.read_parquet(out).height == 25 and "50 records read = 25 out + 25 duplicates" in res.output
    res = runner.invoke(capture_cmd, ["export", "--store", str(store), "--out", str(tmp_path/"missing"/"x.parquet")])
    assert res.exit_code == 1 and "create it first" in res.output and not (tmp_path/"missing").exists()
    res = runner.invoke(capture_cmd, ["export", "--store", str(store), "--key", str(tmp_path/"nope.pem")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert res.output.strip().splitlines() == [f"Error: no analyst private key at {tmp_path/'nope.pem'}"]
    monkeypatch.setenv("SLM_CAPTURE_PUBLIC_KEY", str(tmp_path/"missing.pub"))
    res = runner.invoke(capture_cmd, ["import", str(src), "--format", "raw", "--store", str(store)])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1 and "no capture public key" in res.output


# ---- the real file, end to end through the command line ------------------------------------------

@pytest.mark.slow
def test_cli_imports_and_exports_the_real_bfcl_logs(tmp_path, shared_external, monkeypatch, workspace):
    import subprocess
    import sys
    env = {**os.environ, "SLM_KEYS_DIR": str(tmp_path/"k"), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cli = [str(Path(sys.executable).parent/"slm-research")]
    run = lambda *a: subprocess.run([*cli, *a], env=env, capture_output=True, text=True, timeout=300)
    assert run("capture", "keygen").returncode == 0
    src = shared_external/"bfcl_live_calls.jsonl"
    res = run("capture", "import", str(src), "--format", "openai", "--store", str(tmp_path/"store"))
    assert res.returncode == 0, res.stderr
    n_in, n_stored, n_q = (int(x) for x in __import__("re").search(r"(\d+) in, (\d+) records stored, (\d+) quarantined", res.stdout).groups())
    assert n_in == 1351 and n_in == n_stored + n_q
    res = run("capture", "export", "--store", str(tmp_path/"store"), "--out", str(tmp_path/"calls.parquet"), "--strict")
    assert res.returncode == 0, res.stderr
    frame = pl.read_parquet(tmp_path/"calls.parquet")
    assert frame.height == n_stored and frame["id"].n_unique() == frame.height and frame["session"].null_count() == 0
    assert frame["tools"].str.starts_with('[{"type": "function"').all()


# ---- the proxy under a crash: kill -9 during load --------------------------------------------------

PROXY_MAIN = """
import sys, uvicorn
from slm_research.capture.keys import Pseudonymizer
from slm_research.capture.proxy import create_app
from slm_research.capture.store import SegmentWriter
upstream, port, store, public, pseudonym = sys.argv[1:6]
writer = SegmentWriter(store, public, Pseudonymizer(pseudonym))
uvicorn.run(create_app(upstream, writer), host="127.0.0.1", port=int(port), log_level="warning", access_log=False)
"""


def lingering_upstream_app():
    "Echoes; a stream sends its chunks and [DONE], then keeps the connection open a while (as a slow network can)."
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    app = FastAPI()

    @app.get("/v1/models")
    async def models(): return {"object": "list", "data": []}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        text = "echo: " + body["messages"][-1]["content"]
        base = {"id": "x", "created": 0, "model": "m"}
        if not body.get("stream"):
            return JSONResponse({**base, "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                                                    "finish_reason": "stop"}]})
        async def gen():
            yield b"data: " + json.dumps({**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {
                "role": "assistant", "content": text}, "finish_reason": "stop"}]}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
            await asyncio.sleep(1.0)
        return StreamingResponse(gen(), media_type="text/event-stream")
    return app


@pytest.mark.slow
def test_kill_9_during_load_loses_only_calls_in_flight(tmp_path, keys):
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    answered, lock, stop = set(), threading.Lock(), threading.Event()

    def worker(w):
        with httpx.Client(base_url=url, timeout=15) as c:
            for i in range(40):   # bounded: 20 workers x 40 calls at most, all on loopback
                if stop.is_set(): return
                marker, stream = f"w{w}-{i}", i % 2 == 0
                body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": marker}]}
                try:
                    if stream:
                        with c.stream("POST", "/v1/chat/completions", json=body) as r:
                            got = b""
                            pieces = r.iter_raw()
                            for piece in pieces:
                                got += piece
                                if b"data: [DONE]" in got: break   # the client has its whole answer
                            if r.status_code == 200 and b"data: [DONE]" in got and f"echo: {marker}".encode() in got:
                                with lock: answered.add(marker)
                            for _ in pieces: pass                  # then drains the stream, as the openai client does
                            continue
                    else:
                        r = c.post("/v1/chat/completions", json=body)
                        ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == f"echo: {marker}"
                except httpx.HTTPError: return
                if ok:
                    with lock: answered.add(marker)

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with serve(lingering_upstream_app()) as up:
        proc = subprocess.Popen([sys.executable, "-c", PROXY_MAIN, up.url, str(port), str(tmp_path/"store"), str(keys["public"]),
                                 str(keys["pseudonym"])], env=env)
        try:
            deadline = time.time() + 60
            while True:
                try:
                    if httpx.get(url + "/v1/models", timeout=1).status_code == 200: break
                except httpx.HTTPError: pass
                assert time.time() < deadline and proc.poll() is None, "proxy did not start"
                time.sleep(0.1)
            threads = [threading.Thread(target=worker, args=(w,)) for w in range(20)]
            for t in threads: t.start()
            while len(answered) < 120 and time.time() < deadline: time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill(); proc.wait(10)
            stop.set()
        for t in threads: t.join(30)
    n_answered = len(answered)
    assert n_answered >= 120
    rep = []
    logged = {r["request"]["messages"][0]["content"] for r in read_store(tmp_path/"store", load_private_keys(keys["private"]), rep)}
    assert sorted(answered - logged) == []          # every call whose answer a client saw is in the store
    assert all(not r.sealed for r in rep if r.segment.endswith(".open"))


def test_upstream_passes_on_what_has_arrived_in_one_piece_and_holds_nothing_back():
    "Three chunks that arrived together leave as one piece (one write onward); the first piece does not wait for the rest."
    from slm_research.capture.proxy import Upstream
    chunk = lambda p: b"%x\r\n%s\r\n" % (len(p), p)

    async def main():
        rest_sent = asyncio.Event()
        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n"
                         + b"".join(chunk(b"data: %d\n\n" % i) for i in range(3)))
            await rest_sent.wait()
            writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        up = Upstream(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", timeout=5)
        pieces = (await up.request("GET", "/stream")).aiter_raw()
        first = await asyncio.wait_for(anext(pieces), 2)   # the upstream holds back the end until we have this
        rest_sent.set()
        rest = [p async for p in pieces]
        await up.aclose(); server.close()
        return first, rest

    first, rest = asyncio.run(main())
    assert first == b"data: 0\n\ndata: 1\n\ndata: 2\n\n" and rest == [b"data: [DONE]\n\n"]


def test_a_stream_is_parsed_in_one_pass_and_survives_a_bad_chunk():
    from slm_research.capture.proxy import _parse_sse
    from slm_research.capture.records import assemble_stream
    chunks = [{"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
               "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in ("Hel", "lo, ", "world")]
    raw = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    want = assemble_stream(chunks)
    assert want["choices"][0]["message"]["content"] == "Hello, world"
    assert _parse_sse(raw) == (want, None)
    for bad in (b"data: {not json\n\n", b"data: 1, 2\n\n"):            # skipped, the rest kept
        assert _parse_sse(bad + raw) == (want, None)


def test_loop_writer_commits_a_turn_at_once_and_isolates_a_failure(tmp_path, keys):
    import asyncio
    from slm_research.capture.writers import LoopWriter
    lw = LoopWriter(SegmentWriter(tmp_path/"store", keys["public"], Pseudonymizer(keys["pseudonym"])))

    async def turn():
        def broken(): raise ValueError("cannot build this record")
        futs = [lw.submit(valid_raw(0)), lw.submit(broken), lw.submit(lambda: valid_raw(2))]
        lw.submit(valid_raw(3)).cancel()                                  # a caller that left: still logged
        return await asyncio.gather(*futs, return_exceptions=True)

    results = asyncio.run(turn())
    assert results[0] is None and results[2] is None and isinstance(results[1], ValueError)
    assert lw.n_batches == 1                                             # one write, one flush for the turn
    ids = [r["id"] for r in read_store(tmp_path/"store", load_private_keys(keys["private"]))]
    assert ids == ["ok-0", "ok-2", "ok-3"]                               # written before the callers resumed
    lw.close()
    assert [p.suffix for p in list_segments(tmp_path/"store")] == [".seg"]


def test_background_writer_is_bounded_and_writes_before_it_answers(tmp_path, keys):
    import queue
    import threading
    from slm_research.capture.writers import BackgroundWriter
    seg = SegmentWriter(tmp_path/"store", keys["public"], Pseudonymizer(keys["pseudonym"]))
    gate, real = threading.Event(), seg.append_many
    seg.append_many = lambda records: (gate.wait(10), real(records))   # a disk that stalls
    bw = BackgroundWriter(seg, max_queue=2)
    first = bw.submit(valid_raw(0))
    while bw._q.qsize(): pass                                           # the writer thread holds the first record
    queued = [bw.submit(valid_raw(i)) for i in (1, 2)]
    with pytest.raises(queue.Full):
        bw.submit(valid_raw(3), block=False)                            # back-pressure, not a silent drop
    assert not first.done() and list(read_store(tmp_path/"store", load_private_keys(keys["private"]))) == []
    gate.set()
    for f in [first, *queued]: f.result(10)
    ids = [r["id"] for r in read_store(tmp_path/"store", load_private_keys(keys["private"]))]
    assert ids == ["ok-0", "ok-1", "ok-2"]                              # done means readable, before close
    bw.close()
    assert [p.suffix for p in list_segments(tmp_path/"store")] == [".seg"]


# ---- the capture package's shape ---------------------------------------------------------------------

CAPTURE = Path(__file__).resolve().parent.parent/"slm_research"/"capture"
ABOVE_CAPTURE = {"clean", "cluster", "selection", "finetune", "iterate", "serve", "pipeline", "scale", "cli", "runner", "docs", "agents"}


def test_capture_modules_are_small_import_one_way_and_reach_nothing_above_s1():
    "Each part imports only parts below it (no cycle, never the package root) and no step after S1; none over 900 lines."
    import ast
    parts = {p.stem: p for p in CAPTURE.glob("*.py") if p.stem != "__init__"}
    assert {"keys", "store", "writers", "importers", "client", "proxy", "fake_llm"} <= set(parts)
    graph, above = {}, {}
    for name, path in parts.items():
        text = path.read_text()
        assert len(text.splitlines()) <= 900, f"capture/{name}.py has {len(text.splitlines())} lines"
        mods = [n.module or "" for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ImportFrom) and n.level]
        graph[name] = {m for m in mods if m in parts}
        above[name] = {m.lstrip(".").split(".")[0] for m in mods if m.split(".")[0] in ABOVE_CAPTURE}
        assert "" not in mods, f"capture/{name}.py imports the package root (a cycle through __init__)"
    assert not any(above.values()), above
    assert "store" in graph["writers"] and "records" in graph["store"]      # the reader sees real edges
    done, stack = set(), []
    def visit(n):
        assert n not in stack, f"import cycle: {' -> '.join(stack + [n])}"
        if n in done: return
        stack.append(n); [visit(m) for m in sorted(graph[n])]; stack.pop(); done.add(n)
    for n in sorted(graph): visit(n)
