"""S5 throughput on the real base (SmolLM2-135M-Instruct): LoRA training plus evaluation, fast path against baseline.

Baseline (today's S5 path): `finetune.train` with fp32 weights and random batches, then the fp32 adapter generating one
held-out call at a time (`slm.generate_batch` with one request a batch). Fast path: the same `finetune.train` with the SFTConfig precision of
`slm.train_precision()` (bf16 autocast on an AVX512-BF16/AMX CPU), the frozen base in bf16 (`--fast-base-dtype`; the
LoRA weights stay fp32) and length-grouped batches (`--no-group-by-length` to drop), then the adapter merged into the
bf16 base and `slm.generate_batch` (batched greedy, left padding). Same data, same steps, same held-out calls, same
run. Reports training tokens/s, evaluation seconds, and the ratio of training (for the same tokens) plus evaluation,
in wall time and in process CPU time (steadier on a shared machine). Goal: >= 3x. Writes bench/results/training.json.
    .venv/bin/python bench/bench_training.py [--steps 10] [--n-eval 16] [--threads N]
    .venv/bin/python bench/bench_training.py --stand-in    # the former bench: LoRA/DoRA vs full on the stand-in base
"""
import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

from slm_research.workspace import split_by_session
from slm_research.scoring import score_answer
from slm_research.training import (TrainConfig as FinetuneConfig, base_config, build_stand_in_base, call_example,
                                   default_threads, run_training as train, sft_dataset, split_rows, synthetic_calls,
                                   train_adapter as finetune)
from slm_research.slm import embedded_slm_path, generate_batch, train_precision


@contextlib.contextmanager
def sft_precision(**precision):
    "`finetune.train` with these SFTConfig precision kwargs (it builds its SFTConfig from `trl` at call time)."
    import trl
    original = trl.SFTConfig
    trl.SFTConfig = lambda **kw: original(**{**kw, **precision})
    try: yield
    finally: trl.SFTConfig = original


def evaluate_path(model, tok, examples, max_new_tokens, batched: bool, batch_size: int):
    t0, c0 = time.perf_counter(), time.process_time()
    if batched: preds = generate_batch(model, tok, examples, max_new_tokens, batch_size=batch_size)
    else: preds = [generate_batch(model, tok, [ex], max_new_tokens, batch_size=1)[0] for ex in examples]
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    exact = sum(score_answer(p, ex["target"])["exact_match"] for p, ex in zip(preds, examples)) / len(examples)
    return preds, {"seconds": seconds, "cpu_seconds": cpu, "calls_per_s": len(examples) / seconds, "exact_match": exact}


def lora_on(base: str, cfg: FinetuneConfig, dtype):
    "The base in `dtype` with fp32 LoRA weights (peft upcasts adapters), as `finetune` configures LoRA."
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                            target_modules=cfg.target_modules, task_type="CAUSAL_LM"))


def real_base(a):
    from transformers import AutoTokenizer
    torch.set_num_threads(a.threads)
    base = str(embedded_slm_path())
    tok = AutoTokenizer.from_pretrained(base)
    calls = split_by_session(synthetic_calls(a.n_calls, seed=a.seed), seed=a.seed)
    ds = sft_dataset(split_rows(calls, "train"), tok, a.max_length)
    examples = [call_example(r) for r in split_rows(calls, "test").head(a.n_eval).iter_rows(named=True)]
    fast_sft = {**train_precision(), **({"train_sampling_strategy": "group_by_length"} if a.group_by_length else {})}
    out = {"base": base, "steps": a.steps, "batch_size": a.batch_size, "max_length": a.max_length, "n_train": len(ds),
           "n_eval": len(examples), "max_new_tokens": a.max_new_tokens, "threads": a.threads, "runs": {}}
    paths = {"baseline": dict(sft={"bf16": False, "fp16": False}, base_dtype=torch.float32, batched=False),
             "fast": dict(sft=fast_sft, base_dtype=getattr(torch, a.fast_base_dtype), batched=True)}
    preds = {}
    with tempfile.TemporaryDirectory() as d:
        for name, p in paths.items():
            cfg = FinetuneConfig(base=base, method="lora", steps=a.steps, lr=1e-3, batch_size=a.batch_size,
                                 max_length=a.max_length, save_steps=10 * a.steps, seed=a.seed, num_threads=a.threads,
                                 group_by_length=name == "fast" and a.group_by_length)
            model = lora_on(base, cfg, p["base_dtype"])
            c0 = time.process_time()
            with sft_precision(**p["sft"]): res = train(ds, cfg, Path(d)/name, model=model, tokenizer=tok, resume=False)
            train_cpu = time.process_time() - c0
            # the Trainer leaves accelerate's autocast wrapper on the model's forward: drop it before generating
            wrapped = "_original_forward" in res.model.__dict__
            from accelerate.utils import extract_model_from_parallel
            model = extract_model_from_parallel(res.model, keep_fp32_wrapper=False).eval()
            if p["batched"]: model = model.merge_and_unload().to(torch.bfloat16)  # bf16 weights, no autocast
            preds[name], ev = evaluate_path(model, tok, examples, a.max_new_tokens, p["batched"], a.eval_batch_size)
            out["runs"][name] = {"sft": p["sft"], "base_dtype": str(p["base_dtype"]), "batched_eval": p["batched"],
                                 "train_tokens_per_s": res.tokens_per_s, "train_seconds": res.train_seconds,
                                 "train_cpu_seconds": train_cpu, "tokens": res.tokens_per_s * res.train_seconds,
                                 "last_loss": res.last_loss, "autocast_wrapper_left": wrapped, "eval": ev,
                                 "total_seconds": res.train_seconds + ev["seconds"],
                                 "total_cpu_seconds": train_cpu + ev["cpu_seconds"]}
            del model, res
    b, f = out["runs"]["baseline"], out["runs"]["fast"]
    out["ratio"] = {"train_tokens_per_s": f["train_tokens_per_s"] / b["train_tokens_per_s"],
                    "eval": b["eval"]["seconds"] / f["eval"]["seconds"],
                    # the fast path's time for the baseline's training tokens (the samplers draw different batches)
                    "train_plus_eval": b["total_seconds"] / (b["tokens"] / f["train_tokens_per_s"]
                                                             + f["eval"]["seconds"]),
                    "train_plus_eval_cpu": b["total_cpu_seconds"] / (f["train_cpu_seconds"] * b["tokens"] / f["tokens"]
                                                                     + f["eval"]["cpu_seconds"])}
    out["same_answers"] = sum(x == y for x, y in zip(preds["baseline"], preds["fast"])) / len(examples)
    for name, r in out["runs"].items():
        print(f"{name:8s} train {r['train_tokens_per_s']:6.0f} tokens/s ({r['train_seconds']:6.1f} s, "
              f"{r['train_cpu_seconds']:6.1f} CPU s, loss {r['last_loss']:.3f})  "
              f"eval {r['eval']['seconds']:6.1f} s ({r['eval']['cpu_seconds']:6.1f} CPU s) "
              f"for {len(examples)} calls (exact {r['eval']['exact_match']:.2f})  total {r['total_seconds']:6.1f} s")
    r = out["ratio"]
    print(f"fast vs baseline: training x{r['train_tokens_per_s']:.2f}, evaluation x{r['eval']:.2f}, "
          f"training + evaluation x{r['train_plus_eval']:.2f} wall, x{r['train_plus_eval_cpu']:.2f} CPU "
          f"(goal >= 3); {out['same_answers']:.0%} identical answers")
    return out


def stand_in(a):
    calls = split_by_session(synthetic_calls(400, seed=a.seed), seed=a.seed)
    out = {"preset": a.preset, "steps": a.steps, "batch_size": a.batch_size, "threads": default_threads(), "runs": {}}
    with tempfile.TemporaryDirectory() as d:
        train_rows = calls.filter(pl.col("split") == "train")
        base = build_stand_in_base(train_rows, base_config(a.preset, steps=5, seed=a.seed), Path(d)/"base")
        for method, lr in (("full", 1e-3), ("lora", 1e-2), ("dora", 1e-2)):
            cfg = FinetuneConfig(base=str(base), method=method, steps=a.steps, lr=lr, batch_size=a.batch_size,
                                 save_steps=10 * a.steps, seed=a.seed)
            res = finetune(calls, cfg, Path(d)/method)
            out["runs"][method] = {"tokens_per_s": res.tokens_per_s, "trainable_params": res.trainable_params,
                                   "total_params": res.total_params, "seconds": res.train_seconds}
    full = out["runs"]["full"]["tokens_per_s"]
    out["ratio_vs_full"] = {m: r["tokens_per_s"] / full for m, r in out["runs"].items()}
    for m, r in out["runs"].items():
        print(f"{m:5s} {r['tokens_per_s']:9.0f} tokens/s  x{out['ratio_vs_full'][m]:.2f} vs full  "
              f"({r['trainable_params']:,}/{r['total_params']:,} trainable)")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stand-in", action="store_true", help="the stand-in base: LoRA/DoRA vs full fine-tuning")
    ap.add_argument("--preset", default="tiny", help="stand-in size (with --stand-in)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--n-calls", type=int, default=200, help="synthetic calls (the train split trains, test evaluates)")
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--fast-base-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="frozen base weights of the fast path's LoRA training (the adapter is fp32 either way)")
    ap.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                    help="fast path: keep random batches instead of the Trainer's length-grouped sampler")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = stand_in(a) if a.stand_in else real_base(a)
    dest = Path(__file__).parent/"results"/("training_stand_in.json" if a.stand_in else "training.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1, default=str))
    print(f"-> {dest}")


if __name__ == "__main__":
    main()
