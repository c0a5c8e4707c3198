"S5: real training steps on a tiny stand-in base (LoRA, DoRA), adapter isolation, save/reload, resume after a kill, the step over a workspace."
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch

from slm_research.core import CLEAN_SCHEMA, check_schema
from slm_research.calls import parse_assistant
from slm_research.finetune import FinetuneConfig, MIN_TRAIN_CALLS, finetune_order, finetune_to_files, synthetic_workspace
from slm_research.gate import GateConfig, build_gate
from slm_research.heads import HeadPlan
from slm_research.scoring import score_answer
from slm_research.slm import load_base
from slm_research.training import (TrainConfig, base_config, build_stand_in_base, call_example, encode_example,
                                   last_checkpoint, load_adapter, render_texts, split_rows, synthetic_calls,
                                   train_adapter, train_tokenizer, training_dtype)
from slm_research.workspace import Workspace, split_by_session

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def calls():
    return split_by_session(synthetic_calls(160, seed=3), (0.8, 0.1, 0.1), seed=3)


@pytest.fixture(scope="module")
def base(calls, tmp_path_factory):
    "A micro stand-in base, briefly trained on the training split."
    return build_stand_in_base(calls.filter(pl.col("split") == "train"), base_config("micro", steps=40, lr=1e-2, max_length=96),
                               tmp_path_factory.mktemp("base"))


def _logits(model, tok, text="<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"):
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad(): return model(input_ids=ids).logits


def test_split_keeps_conversations_whole(calls):
    assert calls.group_by("session").agg(pl.col("split").n_unique())["split"].max() == 1
    assert set(calls["split"]) == {"train", "val", "test"}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_trains_only_adapter_weights_and_reloads(method, calls, base, tmp_path):
    frame = calls.filter(pl.col("task") == "sentiment")
    cfg = TrainConfig(base=str(base), method=method, steps=30, lr=2e-2, batch_size=4, max_length=96, rank=8, alpha=16,
                         save_steps=100, seed=0)
    res = train_adapter(frame, cfg, tmp_path/"v1")
    assert res.last_loss < res.first_loss * 0.85, res.losses  # the training loss goes down
    fresh, tok = load_base(str(base), training_dtype(cfg))   # the frozen base as training loaded it
    before = dict(fresh.named_parameters())
    changed_adapter = 0
    for name, p in res.model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad
            changed_adapter += int(("lora_B" in name and p.abs().sum() > 0) or "lora_magnitude" in name)
        else:
            assert not p.requires_grad, name
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(p.detach(), before[key].detach()), f"base weight {key} changed"
    assert changed_adapter > 0
    if method == "dora": assert any("lora_magnitude" in n for n, _ in res.model.named_parameters())
    meta = json.loads((tmp_path/"v1"/"meta.json").read_text())
    assert meta["method"] == method and meta["data_hash"] == res.data_hash and meta["base"] == str(base)
    reloaded, tok2 = load_adapter(tmp_path/"v1", training_dtype(cfg))
    res.model.eval()
    torch.testing.assert_close(_logits(reloaded, tok2), _logits(res.model, tok), rtol=0, atol=1e-6)
    assert not torch.allclose(_logits(reloaded, tok2), _logits(fresh, tok))  # the adapter does something


def _kl_to(teacher, student, tok, frame, n=8):
    "Mean KL(teacher || student) over the answer tokens of the first `n` calls of `frame`."
    total = 0.0
    for row in frame.head(n).iter_rows(named=True):
        enc = encode_example(call_example(row), tok, 96)
        ids, answer = torch.tensor([enc["input_ids"]]), torch.tensor(enc["labels"][1:]) != -100
        with torch.no_grad():
            s = torch.log_softmax(student(input_ids=ids).logits[0, :-1][answer], -1)
            t = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1][answer], -1)
        total += torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean").item()
    return total / n


WHOLE = HeadPlan()   # prompts read whole: this test is about the losses, not the heads


@pytest.mark.slow
def test_full_finetuning_then_distillation_from_that_local_teacher(calls, base, tmp_path):
    frame = calls.filter(pl.col("task") == "extract")
    full = train_adapter(frame, TrainConfig(base=str(base), method="full", steps=30, lr=3e-3, batch_size=4, max_length=96,
                                          save_steps=100, seed=0), tmp_path/"teacher", WHOLE)
    assert full.last_loss < full.first_loss * 0.85, full.losses
    fresh, tok = load_base(str(base), torch.float32)
    before = dict(fresh.named_parameters())
    changed = [n for n, p in full.model.named_parameters() if not torch.equal(p.detach(), before[n].detach())]
    assert len(changed) > len(before) // 2  # full fine-tuning moves the base weights themselves
    teacher, _ = load_adapter(tmp_path/"teacher", torch.float32)
    kd = train_adapter(frame, TrainConfig(base=str(base), method="distill", teacher=str(tmp_path/"teacher"), steps=30, lr=2e-2,
                                        batch_size=4, max_length=96, rank=8, alpha=16, kd_alpha=0.9, save_steps=100, seed=0,
                                        bf16=False, base_dtype="float32"),  # exact arithmetic: this is about the loss
                  tmp_path/"student", WHOLE)
    sft = train_adapter(frame, TrainConfig(base=str(base), method="lora", steps=30, lr=2e-2, batch_size=4, max_length=96, rank=8,
                                         alpha=16, save_steps=100, seed=0, bf16=False, base_dtype="float32"), tmp_path/"sft", WHOLE)
    student, _ = load_adapter(tmp_path/"student", torch.float32)
    held_out = frame.filter(pl.col("split") != "train")
    kl = {name: _kl_to(teacher, m, tok, held_out) for name, m in (("base", fresh), ("sft", sft.model), ("distilled", student))}
    assert kl["distilled"] < 0.95 * kl["sft"] < kl["base"], kl  # the KL term pulls the student toward its teacher beyond what its answers teach
    assert json.loads((tmp_path/"student"/"meta.json").read_text())["method"] == "distill" and kd.last_loss < kd.first_loss

_KILLABLE = """
import sys, polars as pl
from slm_research.training import TrainConfig, synthetic_calls, train_adapter
from slm_research.workspace import split_by_session
calls = split_by_session(synthetic_calls(160, seed=3), (0.8, 0.1, 0.1), seed=3).filter(pl.col("task") == "summary")
train_adapter(calls, TrainConfig(base=sys.argv[1], steps=400, save_steps=3, lr=1e-2, batch_size=2, max_length=96,
                                 rank=4, alpha=8, num_threads=1), sys.argv[2])
"""


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(calls, base, tmp_path):
    out = tmp_path/"v1"
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(base), str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "SLM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while last_checkpoint(out) is None:
            assert proc.poll() is None, "training finished or crashed before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)  # no clean shutdown: the run just dies
        proc.wait(30)
    finally:
        if proc.poll() is None: proc.kill()
    ckpt = last_checkpoint(out)
    step = int(ckpt.name.split("-")[1])
    assert not (out/"meta.json").exists() and step >= 3
    frame = calls.filter(pl.col("task") == "summary")
    res = train_adapter(frame, TrainConfig(base=str(base), steps=step + 6, save_steps=3, lr=1e-2, batch_size=2,
                                           max_length=96, rank=4, alpha=8), out)
    assert res.resumed_from == step and res.steps == step + 6
    assert (out/"adapter_config.json").exists() and not (out/"checkpoints").exists()


def test_scores_compare_parsed_json_and_tool_calls():
    gold = {"content": None, "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}]}
    same = {"tool_calls": [{"function": {"name": "get_weather", "arguments": '{"days": 2, "city": "Oslo"}'}}]}
    wrong_args = {"tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}
    assert score_answer(same, gold)["tool_call_match"] == 1.0
    assert score_answer(wrong_args, gold)["tool_name_match"] == 1.0 and score_answer(wrong_args, gold)["tool_call_match"] == 0.0
    s = score_answer({"content": "{not json"}, {"content": '{"a": 1}'})
    assert s["json_valid"] == 0.0 and s["json_match"] == 0.0 and s["json_fields"] == 0.0
    # field agreement credits the right keys and each right value, where whole-document equality is all-or-nothing
    s = score_answer({"content": '{"progress": "other words", "completed": true}'},
                     {"content": '{"progress": "Found partial results", "completed": true}'})
    assert (s["json_keys"], s["json_values"], s["json_fields"], s["json_match"]) == (1.0, 0.5, 0.75, 0.0)
    # a tool call cut off inside its arguments still names the tool: name accuracy credits it, the action does not
    cut = parse_assistant('<tool_call>{"name": "get_weather", "arguments": {"city": "Os')
    assert score_answer(cut, gold)["tool_name_match"] == 1.0 and score_answer(cut, gold)["action_match"] == 0.0
    # the action ignores the model's commentary arguments, and only those
    why = lambda text, city: {"tool_calls": [{"function": {"name": "get_weather", "arguments": json.dumps(
        {"city": city, "days": 2, "reasoning": text})}}]}
    assert score_answer(why("because", "Oslo"), why("since", "Oslo"))["action_match"] == 1.0
    assert score_answer(why("because", "Oslo"), why("because", "Rome"))["action_match"] == 0.0
    g = build_gate([dict(cluster=0, label="a", share=0.4, n_scored=120, n_accepted=100, agree=100),
                    dict(cluster=1, label="b", share=0.6, n_scored=120, n_accepted=120, agree=60)])
    assert [c["passed"] for c in g["clusters"]] == [True, False] and g["replaceable_share"] == pytest.approx(0.4 * 100 / 120)


def test_decision_fields_are_what_the_agents_act_on():
    "On the embedded corpus: verdicts, flags and routing fields are decision fields; prose and code are not."
    from collections import defaultdict
    from slm_research.corpus import generate_records
    from slm_research.scoring import answer_profile
    answers = defaultdict(list)
    for r, g, _ in generate_records(1500, 4):
        if r["response"]: answers[g["subtask"]].append(r["response"]["choices"][0]["message"])
    assert answer_profile(answers["success_detection"]) == {"kind": "fields", "fields": ["Success"]}
    assert answer_profile(answers["judge_test_run"]) == {"kind": "fields", "fields": ["Send To", "Status"]}
    assert answer_profile(answers["goal_check"]) == {"kind": "fields", "fields": ["completed", "progress"]}
    assert answer_profile(answers["code_review"])["fields"] == ["Code Review Result"]
    for free_text in ("write_code", "write_test", "task_inference"): assert answer_profile(answers[free_text])["kind"] == "text"
    gold = answers["success_detection"][0]
    verdict = gold["content"].rsplit("Success: ", 1)[1]
    right = {"content": f"Reasoning: worded otherwise\nSuccess: {verdict}"}
    wrong = {"content": gold["content"].rsplit("Success: ", 1)[0] + f"Success: {verdict == 'False'}"}  # same words, other verdict
    assert score_answer(right, gold, ["Success"])["field_match"] == 1.0
    assert score_answer(wrong, gold, ["Success"])["field_match"] == 0.0

@pytest.mark.slow
def test_finetune_scores_zero_shot_then_trains_chooses_a_threshold_and_gates(workspace, base):
    ws = synthetic_workspace(workspace.processed, n=160, seed=1)
    check_schema(ws.read_calls(), CLEAN_SCHEMA, "test")
    cfg = FinetuneConfig(base=str(base), steps=4, batch_size=4, max_length=96, max_train_calls=16, n_eval=24,
                         max_new_tokens=16, rank=4, alpha=8, max_clusters=2)
    result = finetune_to_files(ws, cfg)
    saved = ws.read_gate()
    assert saved["threshold"] == 0.95 and saved["min_gate_calls"] == GateConfig().min_calls and len(saved["clusters"]) == 2
    for row in saved["clusters"]:
        assert {"cluster", "label", "primary_metric", "base_score", "base_interval", "adapter_score", "adapter_interval",
                "coverage", "coverage_interval", "accepted_interval", "acceptance", "n_scored", "n_accepted",
                "head_tokens", "passed", "share", "n_train"} <= set(row)
        assert row["base_interval"][0] <= row["base_score"] <= row["base_interval"][1]
        assert row["n_train"] <= 16 + 4 and row["n_calibration"] + row["n_test"] <= 24
        assert not row["passed"]                          # a dozen test calls can never pass a 95% gate
        meta = json.loads((ws.root/row["path"]/"meta.json").read_text())
        assert meta["acceptance"]["threshold"] == row["acceptance"] and meta["heads"]["strip"] == row["strip"]
    reg = ws.registry().records
    assert {r.status for r in reg} <= {"candidate", "rejected"} and all(r.data_hash and r.reason for r in reg)
    assert result["replaceable_share"] == 0.0
    # a second run is a new version of one cluster's adapter, recorded beside the first; the other rows are kept
    finetune_to_files(ws, cfg, clusters=[saved["clusters"][0]["cluster"]])
    assert [r.version for r in ws.registry().records][-1] == 2 and len(ws.read_gate()["clusters"]) == 2


def test_clusters_too_small_to_learn_from_are_taken_last(workspace):
    ws = synthetic_workspace(workspace.processed, n=1000, seed=0)
    frame = ws.cluster_frame(0)
    clusters = sorted(frame["cluster"].unique().to_list())
    cfg = FinetuneConfig()
    first = finetune_order(frame, clusters, cfg)[0]
    few = frame.filter(pl.col("cluster") == first).head(2 * MIN_TRAIN_CALLS - 1)["id"]
    small = frame.filter((pl.col("cluster") != first) | pl.col("id").is_in(few.implode()))
    order = finetune_order(small, clusters, cfg)
    # after every cluster a specialist can learn; only the free-text summaries (cluster 2, decided by no reader) follow
    assert order[-2:] == [first, 2] and first != 2


def test_long_prompt_is_cut_in_the_middle_or_stripped_to_its_latest_turns(calls):
    tok = train_tokenizer(render_texts(calls.head(40)), 512)
    ex = call_example(calls.row(0, named=True))
    ex["messages"][-1]["content"] = "filler words " * 200 + ex["messages"][-1]["content"]
    enc = encode_example(ex, tok, 96)
    prompt = tok(tok.apply_chat_template(ex["messages"], tools=ex["tools"] or None, add_generation_prompt=True,
                                         tokenize=False), add_special_tokens=False)["input_ids"]
    answer = [t for t in enc["labels"] if t != -100]
    n_prompt = len(enc["input_ids"]) - len(answer)
    assert len(enc["input_ids"]) == 96 and len(prompt) > 96
    assert answer[-2] == tok.eos_token_id  # the whole answer, up to its end-of-turn token
    head = enc["input_ids"][:n_prompt]
    assert head[:10] == prompt[:10] and head[-10:] == prompt[-10:]  # system prompt and latest request both kept
    # stripped of its head (system prompt, tools), the example keeps the latest turns and the same answer
    stripped = encode_example(ex, tok, 96, strip=True)
    assert [t for t in stripped["labels"] if t != -100] == answer
    text = tok.decode(stripped["input_ids"])
    assert "<tools>" not in text and "filler words" in text and text.count("<|im_start|>") >= 1
