"""Context distillation on real multi-turn agent steps (BFCL): the constant heads found, and what a specialist reads."""
import json

import polars as pl
import pytest

from slm_research.calls import prefix_hash, split_prefix
from slm_research.heads import plan_heads
from slm_research.slm import cut_prompt, embedded_slm_path, render_head, render_prompt


@pytest.fixture(scope="module")
def steps(shared_external):
    "BFCL multi-turn steps as logged calls: the request (every message but the answer), its tools, its conversation."
    rows = [json.loads(l) for l in open(shared_external/"bfcl_multiturn_calls.jsonl")]
    return pl.DataFrame({"session": [r["user"] for r in rows],
                         "messages": [json.dumps(r["messages"][:-1]) for r in rows],
                         "tools": [json.dumps(r["tools"]) for r in rows],
                         "classes": ["+".join(sorted(r["involved_classes"])) for r in rows]})


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(embedded_slm_path()))


def test_each_conversation_carries_one_head_and_the_heads_are_the_tool_sets(steps):
    heads = steps.with_columns(head=pl.Series([prefix_hash(m, t) for m, t in zip(steps["messages"], steps["tools"])]))
    assert heads.group_by("session").agg(pl.col("head").n_unique())["head"].max() == 1
    # 200 conversations, a few dozen heads: conversations over the same API classes mostly share their tool set
    per_class = heads.group_by("classes").agg(pl.col("head").n_unique())
    assert heads["head"].n_unique() < 50 and (per_class["head"] == 1).mean() > 0.7


def test_the_plan_strips_the_tool_sets_a_cluster_repeats(steps):
    one_class = steps.filter(pl.col("classes") == steps["classes"].mode()[0])
    plan = plan_heads(one_class)
    assert plan.strip and len(plan.variants) == 1 and plan.head_chars > 5_000
    mixed = plan_heads(steps)                                   # all 20 tool-set combinations together
    covered = sum(v["n_calls"] for v in mixed.variants.values())
    assert mixed.strip and covered >= steps.height / 2 and covered < steps.height
    rare = [(m, t) for m, t, c in zip(steps["messages"], steps["tools"], steps["classes"])
            if prefix_hash(m, t) not in mixed.variants]
    assert rare and not any(mixed.covers(m, t) for m, t in rare[:20])    # heads too rare to learn go to the LLM


def test_a_specialist_reads_the_latest_turns_without_the_head(steps, tok):
    "The head and the stripped prompt are the two halves of the prompt; cut to a budget, the last turns stay."
    long = max(steps.iter_rows(named=True), key=lambda r: len(r["messages"]))
    messages, tools = json.loads(long["messages"]), json.loads(long["tools"])
    full, head = render_prompt(tok, messages, tools), render_head(tok, messages, tools)
    stripped = render_prompt(tok, messages, tools, strip=True)
    assert full == head + stripped and "<tools>" in head and "<tools>" not in stripped
    ids = cut_prompt(tok, tok(stripped, add_special_tokens=False)["input_ids"], 256, strip=True)
    text = tok.decode(ids)
    assert len(ids) <= 256 and text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    last_tool = next(m for m in reversed(messages) if m["role"] == "tool")["content"]
    assert last_tool[:60] in text                                   # the newest tool result decides the next step
    assert len(tok(head, add_special_tokens=False)["input_ids"]) > 3_000    # what it does not read, every call


def test_the_user_template_of_a_templated_task_leaves_what_varies():
    "MetaGPT's test-run judge: every request opens and closes with the same instructions; the running output varies."
    from slm_research.corpus import generate_records
    from slm_research.heads import user_template
    turns = [r["request"]["messages"][-1]["content"] for r, g, _ in generate_records(600, 3)
             if g["subtask"] == "judge_test_run"]
    prefix, suffix = user_template(turns)
    assert len(turns) > 20 and "senior development and qa engineer" in prefix and "PASS OR FAIL" in suffix
    inner = [t[len(prefix): len(t) - len(suffix)] for t in turns]
    assert all("Running Output" in t for t in inner)                      # the evidence the verdict rests on stays
    assert sum(map(len, inner)) < 0.7 * sum(map(len, turns))
