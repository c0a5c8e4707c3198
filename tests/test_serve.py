"""The router serves what the gate certified: masked requests, the adapter's heads, its confidence threshold; through
the real capture proxy, with an adapter trained on masked logs."""
import json

import polars as pl
import pytest

from slm_research.heads import plan_heads
from slm_research.serve import AdapterServer, Route, Router

pytestmark = pytest.mark.slow

SYSTEM = "You send reminders for the accounts team. Call the tool."
NOTIFY = [{"type": "function", "function": {"name": "notify", "description": "Send a reminder",
                                             "parameters": {"type": "object", "properties": {
                                                 "to": {"type": "string"}, "topic": {"type": "string"}}}}}]


def _calls(n=96):
    "Masked logs, as S2 leaves them: the person is a placeholder in the request and in the logged tool call."
    import datetime as dt
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Please remind <PERSON_1> about the invoice, ticket {i % 7}."}]
        answer = {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{i}", "type": "function", "function": {
            "name": "notify", "arguments": json.dumps({"to": "<PERSON_1>", "topic": "invoice"})}}]}
        rows.append(dict(id=f"call-{i:04d}", timestamp=dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc), agent="a",
                         session=f"s{i}", user="u", model="llm", messages=json.dumps(msgs), tools=json.dumps(NOTIFY),
                         response=json.dumps(answer), latency_ms=1.0, prompt_tokens=0, completion_tokens=0))
    return pl.DataFrame(rows).with_columns(pl.col("timestamp").cast(pl.Datetime("us", "UTC")))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    "A stand-in base and a LoRA adapter trained on the masked calls."
    from slm_research.training import TrainConfig, base_config, build_stand_in_base, train_adapter
    root = tmp_path_factory.mktemp("serve")
    calls = _calls().with_columns(split=pl.lit("train"))
    base = build_stand_in_base(calls, base_config("micro", steps=120, lr=1e-2, max_length=160), root/"base")
    train_adapter(calls, TrainConfig(base=str(base), steps=60, lr=2e-2, batch_size=8, max_length=160, rank=8, alpha=16,
                                     save_steps=1000), root/"adapter", answer_tokens=40)
    meta = json.loads((root/"adapter"/"meta.json").read_text())
    (root/"adapter"/"meta.json").write_text(json.dumps({**meta, "max_prompt_tokens": 120, "tool_threshold": 0.5}))
    return root/"adapter"


def _request(name: str, system: str = SYSTEM) -> dict:
    return {"model": "gpt-4o", "tools": NOTIFY, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": f"Please remind {name} about the invoice, ticket 3."}]}


def test_a_raw_request_is_masked_answered_and_restored_through_the_proxy(adapter, tmp_path):
    from openai import OpenAI
    from slm_research.capture import Pseudonymizer, SegmentWriter, create_app, demo_upstream_app, generate_keys, serve
    from slm_research.clean import MaskingEngine, mask_request, unmask
    engine = MaskingEngine()
    raw = _request("Maria Garcia")
    masked, mapping = mask_request(engine, raw)
    assert "<PERSON_1>" in masked["messages"][1]["content"] and mapping["<PERSON_1>"] == "Maria Garcia"
    seen = []
    backend = AdapterServer().backend(adapter)
    def recording(request):
        seen.append(json.dumps(request)); return backend(request)
    plan = plan_heads(_calls())
    router = Router(lambda r: 0, [Route(0, recording, "slm/cluster-0/v1", plan=plan)],
                    mask=lambda r: mask_request(engine, r), unmask=unmask)
    keys = generate_keys(tmp_path/"keys")
    upstream_app = demo_upstream_app()
    with serve(upstream_app) as upstream:
        writer = SegmentWriter(tmp_path/"store", keys["public"], Pseudonymizer(keys["pseudonym"]))
        with serve(create_app(upstream.url, writer, router)) as proxy:
            client = OpenAI(base_url=proxy.url + "/v1", api_key="sk-test-not-a-secret", max_retries=0)
            out = client.chat.completions.create(**raw)
            drifted = client.chat.completions.create(**_request("Maria Garcia", system="You are a new assistant."))
    assert out.model == "slm/cluster-0/v1", out
    call = out.choices[0].message.tool_calls[0].function
    assert call.name == "notify" and json.loads(call.arguments)["to"] == "Maria Garcia"   # restored in the arguments
    assert seen and all("Maria" not in s and "Garcia" not in s for s in seen)              # never in the model's input
    # a changed system prompt is a head the adapter never learnt: the LLM answers it
    assert drifted.id.startswith("chatcmpl-demo") and len(seen) == 1
    assert upstream_app.state.calls["calls"] == 1


def test_the_router_defers_below_the_acceptance_threshold(adapter):
    backend = AdapterServer().backend(adapter)
    sure = Router(lambda r: 0, [Route(0, backend, "slm/c0", acceptance=0.0)]).handle(_request("<PERSON_1>"))
    answer_confidence = backend(_request("<PERSON_1>"))["confidence"]
    assert sure.served_by == "slm/c0" and 0 < answer_confidence <= 1
    picky = Router(lambda r: 0, [Route(0, backend, "slm/c0", acceptance=min(1.0, answer_confidence + 1e-6))])
    assert picky.handle(_request("<PERSON_1>")).fallback_reason.startswith("SLM not sure")
