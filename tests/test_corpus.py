"The embedded corpus: deterministic, realistic in shape, gold spans exact, mix as documented, canaries planted once."
import collections
import json
from pathlib import Path

import pytest

from slm_research.capture import validate_record
from slm_research.corpus import (AGENT_SHARE, DRIFT_SUBTASKS, PII_LABELS, SUBTASKS, generate_corpus, generate_records,
                                 get_field, iter_jsonl, read_canaries, read_gold, resolve_mix)


@pytest.fixture
def root(tmp_path, monkeypatch):
    "A throwaway workspace root, so the corpus is not written into the repository's data/raw/generated."
    (tmp_path/"settings.ini").touch()
    (tmp_path/"nbs").mkdir()
    monkeypatch.setenv("SLM_ROOT", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def sample():
    return list(generate_records(3000, 11))


def test_same_seed_same_bytes_and_folder_is_reused(root):
    a = generate_corpus(400, 5, progress=False)
    first = (a/"calls.jsonl").read_bytes()
    assert a == root/"data"/"raw"/"generated"/"corpus-n400-s5"
    (a/"calls.jsonl").unlink()  # a reused folder is not rewritten (`canaries.json` marks it complete)...
    assert generate_corpus(400, 5) == a and not (a/"calls.jsonl").exists()
    import shutil; shutil.rmtree(a)  # ...and a fresh one is identical
    assert (generate_corpus(400, 5, progress=False)/"calls.jsonl").read_bytes() == first
    assert (generate_corpus(400, 6, progress=False)/"calls.jsonl").read_bytes() != first
    assert not list((root/"data"/"raw"/"generated").glob("*.*"))  # no temporary folders left


# sha256 of the files of `generate_corpus(300, 1)` as the generator wrote them before it was split into modules (one
# per agent, registered in `corpus.FAMILIES`). A change to any generator changes them: bump CORPUS_VERSION, then these.
CORPUS_N300_S1 = {
    "calls.jsonl": "be1fb60917c96bbf8cf8c8bceff17369af371d88ac7dfb4b3752adb0589ba312",
    "canaries.json": "b0edbb261b401348f17f23b047e305e820f4b160b04791e3a39f655d576fe1d2",
    "gold.jsonl": "bcdb9b94d224fbca537a6a4c8fc652c4b30bb6ed45cb66e240af29904220c02b",
    "meta.json": "b7b058dcd2514e8c1f734e8e94a3502e9ce0f3fd09290a40197ee588ca729168",
}


def test_the_generated_bytes_are_those_of_version_3(root):
    import hashlib
    from slm_research.corpus import CORPUS_VERSION
    out = generate_corpus(300, 1, progress=False)
    assert CORPUS_VERSION == 3
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.iterdir()} == CORPUS_N300_S1


def test_the_families_are_registered_by_name():
    from slm_research.corpus import FAMILIES, GENERATORS
    from slm_research.corpus.callsites import Family, SubTask
    assert list(FAMILIES) == ["metagpt", "open_operator", "cradle"]
    assert set(GENERATORS) == set(SUBTASKS) | set(DRIFT_SUBTASKS)
    assert all(GENERATORS[s.name] is FAMILIES[s.agent].generators[s.name] for s in [*SUBTASKS.values(), *DRIFT_SUBTASKS.values()])
    with pytest.raises(ValueError, match="without a generator"):   # a call site cannot be registered without its generator
        Family("x", 1.0, (1, 2), ["m"], [SubTask("a", "x", 1.0, "A.run", "a")], {})


def test_records_have_the_contract_shape(sample):
    for rec, gold, _ in sample:
        validate_record(rec)
        assert set(rec) == {"id", "timestamp", "agent", "session_id", "user_id", "request", "response", "latency_ms", "error"}
        assert gold["id"] == rec["id"] and gold["agent"] == rec["agent"] and gold["subtask"] in SUBTASKS
        assert (rec["response"] is None) == (rec["error"] is not None)
        if rec["response"]:
            msg = rec["response"]["choices"][0]["message"]
            assert msg["content"] or msg.get("tool_calls")
            u = rec["response"]["usage"]
            assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
            for tc in msg.get("tool_calls") or []: json.loads(tc["function"]["arguments"])
    ids = [r["id"] for r, _, _ in sample]
    assert len(set(ids)) == len(ids)
    stamps = [r["timestamp"] for r, _, _ in sample]
    assert stamps == sorted(stamps) or sum(a > b for a, b in zip(stamps, stamps[1:])) < len(stamps) * 0.05


def test_gold_spans_are_exact_and_cover_every_planted_value(sample):
    labels = collections.Counter()
    for rec, gold, _ in sample:
        for s in gold["pii"]:
            assert get_field(rec, s["field"])[s["start"]:s["end"]] == s["text"], (rec["id"], s)
            labels[s["label"]] += 1
    assert set(labels) <= set(PII_LABELS)
    assert {"PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "STREET_ADDRESS", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS",
            "US_SSN", "DATE_TIME", "API_KEY", "PASSWORD"} <= set(labels)
    where = collections.Counter(s["field"].split(".")[0] + (".args" if "arguments" in s["field"] else "") for _, g, _ in sample for s in g["pii"])
    assert where["request"] and where["request.args"] and where["response"] and where["response.args"]  # PII in prompts, tool args and answers


def test_mix_matches_the_documented_shares(sample):
    agents = collections.Counter(g["agent"] for _, g, _ in sample)
    for agent, share in AGENT_SHARE.items(): assert abs(agents[agent] / len(sample) - share) < 0.06, (agent, agents)
    sub = collections.Counter(g["subtask"] for _, g, _ in sample)
    assert set(sub) == set(SUBTASKS)
    for name, s in SUBTASKS.items():  # within-agent share
        assert abs(sub[name] / agents[s.agent] - s.share) < 0.06, name


def test_subtasks_are_not_separable_by_system_prompt_alone(sample):
    "Realistic difficulty: MetaGPT roles share one system prompt across several sub-tasks."
    by_system = collections.defaultdict(set)
    for rec, g, _ in sample:
        by_system[rec["request"]["messages"][0]["content"]].add(g["subtask"])
    assert max(len(v) for v in by_system.values()) >= 3


def test_response_shapes_per_subtask(sample):
    seen = collections.defaultdict(list)
    for rec, g, _ in sample:
        if rec["response"]: seen[g["subtask"]].append(rec["response"]["choices"][0]["message"])
    assert all(m.get("tool_calls") for m in seen["next_step"]) and all(m.get("tool_calls") for m in seen["plan_actions"])
    assert all("```python" in m["content"] for m in seen["write_code"] if m["content"])
    assert all(m["content"].rstrip().endswith(("Success: True", "Success: False")) for m in seen["success_detection"] if m["content"])
    for m in seen["start_url"]:
        if m["content"] and not m["content"].endswith("}"): continue  # a few answers are truncated at max_tokens
        assert set(json.loads(m["content"])) == {"url", "reasoning"}


def test_canaries_are_unique_and_planted_once(root):
    out = generate_corpus(1500, 3, progress=False)
    canaries = json.loads((out/"canaries.json").read_text())["canaries"]
    assert len(canaries) >= 7
    text = (out/"calls.jsonl").read_text()
    for c in canaries:
        assert text.count(c["text"]) == 1, c["label"]
    gold = {g["id"]: g for g in iter_jsonl(out/"gold.jsonl")}
    for c in canaries: assert any(s["text"] == c["text"] for s in gold[c["id"]]["pii"])
    assert read_canaries(out) == [c["text"] for c in canaries]


def test_drift_mix_and_extra_subtasks(root):
    out = generate_corpus(600, 2, mix={"status_message": 0, "next_step": 0.3}, extra_subtasks=["fill_form", "write_docstring"],
                          id_prefix="r2", start="2025-04-01T00:00:00Z", progress=False)
    assert out.name.startswith("corpus-n600-s2-m")
    g = read_gold(out)
    subs = set(g["subtask"])
    assert {"fill_form", "write_docstring"} <= subs and "status_message" not in subs
    assert g["id"][0] == "r2-000001"
    assert next(iter_jsonl(out/"calls.jsonl"))["timestamp"].startswith("2025-04-01")
    with pytest.raises(KeyError, match="unknown sub-task 'nope'"): resolve_mix({"nope": 1})
    with pytest.raises(ValueError, match="negative"): resolve_mix({"write_code": -1})
    assert set(DRIFT_SUBTASKS) <= set(resolve_mix(extra_subtasks=list(DRIFT_SUBTASKS)))
