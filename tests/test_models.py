"Cost model (slm_research.models): parameter, FLOP and KV-cache arithmetic checked against hand-computed values and real models."
import json

import pytest
import torch

from slm_research.core import paths
from slm_research.models import (ArchConfig, cost_ratios, decode_bytes_per_token, find_config, fit_latency,
                                 build_random_model, flops_per_token, kv_cache_bytes, load_arch_configs,
                                 measure_decode_latency, non_embedding_params, param_count)

# d=8, 2 heads of 4, 1 KV head, d_ff=16, vocab 10, 2 layers, tied:
# per layer q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192, MLP 3*8*16 = 384, norms 2*8 = 16 -> 592; x2 = 1184
# + embedding 10*8 = 80 + final norm 8 = 1272
TINY = ArchConfig("tiny", n_layers=2, d_model=8, n_heads=2, n_kv_heads=1, d_ff=16, vocab_size=10, tie_embeddings=True)


def test_param_count_tiny_by_hand():
    assert param_count(TINY) == 1272
    untied = ArchConfig("tiny", 2, 8, 2, 1, 16, 10, tie_embeddings=False)
    assert param_count(untied) == 1272 + 80
    assert non_embedding_params(TINY) == non_embedding_params(untied) == 1272 - 80


def test_flops_and_kv_cache_tiny_by_hand():
    # matrices: 2 layers * (192 + 384) + LM head 8*10 = 1232 weights -> 2 FLOPs each
    assert flops_per_token(TINY) == 2464
    # attention: QK^T and AV, 2*ctx*heads*head_dim each, per layer: 4*2*2*4 = 64 per context token
    assert flops_per_token(TINY, context_len=100) == 2464 + 6400
    # K and V, 2 layers, 1 KV head of 4 -> 16 values per token
    assert kv_cache_bytes(TINY, 100) == 16 * 100 * 2
    assert kv_cache_bytes(TINY, 100, bytes_per_value=1) == 1600
    assert decode_bytes_per_token(TINY, 100) == 1272 * 2 + 3200


def test_gpt_style_and_biases_by_hand():
    # GPT-2 style: d=4, 1 layer, 2 heads, d_ff=16, vocab 5, 3 positions, tied, LayerNorm, all biases.
    gpt = ArchConfig.from_hf({"model_type": "gpt2", "n_embd": 4, "n_layer": 1, "n_head": 2, "n_inner": 16,
                              "vocab_size": 5, "n_positions": 3}, name="g")
    assert (gpt.gated_mlp, gpt.norm, gpt.linear_bias, gpt.tie_embeddings) == (False, "layer", True, True)
    # attn 4*16 weights + 16 biases = 80; MLP 2*4*16 + 16 + 4 = 148; 2 LayerNorms 2*8 = 16 -> 244
    # + tokens 20 + positions 12 + final LayerNorm 8 = 284
    assert param_count(gpt) == 284
    qwen = ArchConfig.from_hf({"model_type": "qwen2", "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
                               "num_key_value_heads": 1, "intermediate_size": 16, "vocab_size": 10, "tie_word_embeddings": True})
    assert qwen.qkv_bias and param_count(qwen) == 1272 + 2 * (8 + 4 + 4)


@pytest.mark.parametrize("tie", [True, False])
def test_param_count_matches_a_real_llama(tie):
    cfg = ArchConfig("t", n_layers=3, d_model=24, n_heads=6, n_kv_heads=2, d_ff=40, vocab_size=97, tie_embeddings=tie)
    model = build_random_model(cfg, "float32")
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg)


def test_public_configs_match_reported_counts():
    configs = load_arch_configs()
    assert param_count(configs["SmolLM2-135M"]) == 134_515_008   # ~134.5M, the model card's 135M
    assert param_count(configs["SmolLM2-1.7B"]) == 1_711_376_384
    assert round(param_count(configs["Llama-3.1-8B"]) / 1e9, 2) == 8.03
    assert round(param_count(configs["Llama-3.1-70B"]) / 1e9, 1) == 70.6
    assert round(param_count(configs["GPT-3-175B"]) / 1e9) == 175
    entries = json.loads((paths(mkdir=False).raw / "model_configs.json").read_text())["configs"]
    for e in entries:
        assert abs(param_count(configs[e["name"]]) / e["reported_params"] - 1) < 0.02, e["name"]
        assert e["source"]
    # FLOPs/token at empty context is about 2 * parameters (embeddings aside)
    c = configs["Llama-3.1-70B"]
    assert 1.9 < flops_per_token(c) / param_count(c) < 2.0


def test_find_config_and_errors():
    configs = load_arch_configs()
    assert find_config("135M", configs).name == "SmolLM2-135M"
    assert find_config("Qwen2.5-7B", configs).size == "7B"
    with pytest.raises(KeyError, match="no single config"):
        find_config("13B", configs)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ArchConfig("bad", 2, 8, 3, 2, 16, 10)
    with pytest.raises(ValueError, match="not a Llama-style"):
        configs["GPT-3-175B"].to_llama()


def test_fit_and_ratios():
    fit = fit_latency([1e8, 1e9, 1e10], [2.0, 20.0, 200.0])
    assert fit.slope == pytest.approx(1.0) and not fit.assumed_slope
    one = fit_latency([1e8], [5.0])
    assert one.assumed_slope and one.predict([1e9])[0] == pytest.approx(50.0)
    configs = load_arch_configs()
    r = cost_ratios(configs["Llama-3.1-8B"], configs["Llama-3.1-70B"], fit, context_len=0)
    assert r["flops"] == pytest.approx(flops_per_token(configs["Llama-3.1-70B"]) / flops_per_token(configs["Llama-3.1-8B"]))
    assert r["latency"] == pytest.approx(param_count(configs["Llama-3.1-70B"]) / param_count(configs["Llama-3.1-8B"]), rel=1e-6)
    assert r["latency_kind"] == "extrapolated"
    assert cost_ratios(configs["Llama-3.1-8B"], configs["Llama-3.1-70B"], fit, 0,
                       {"Llama-3.1-8B": 1.0, "Llama-3.1-70B": 9.0})["latency_kind"] == "measured"


def test_measure_decode_latency_runs_real_decode_steps():
    cfg = ArchConfig("t", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=128)
    threads = torch.get_num_threads()
    r = measure_decode_latency(cfg, n_new_tokens=4, prompt_len=6, n_warmup=1, dtype="float32", threads=1)
    assert len(r.step_ms) == 4 and r.ms_per_token == min(r.step_ms) and r.ms_per_token > 0
    assert r.dtype == "float32" and r.params == param_count(cfg) and r.threads == 1
    assert torch.get_num_threads() == threads   # restored
    with pytest.raises(ValueError):
        measure_decode_latency(cfg, n_new_tokens=0)
