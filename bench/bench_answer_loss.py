"""S5's training loss on the real base (SmolLM2-135M-Instruct): the LM head at the answer positions only, against
trl's fused head, which scores every position on a CPU (it compacts to the answer positions on Triton devices only).

Both paths are `training.run_training`, the same LoRA settings, data, seed and steps, in one run; the baseline swaps in
trl's own `SFTTrainer.compute_loss`. Examples have a long prompt and a short answer, as S5's do after the head is
stripped. Reports seconds a step, tokens/s and the per-step losses of both (the same to about the third decimal);
writes bench/results/answer_loss.json.
    .venv/bin/python bench/bench_answer_loss.py [--steps 12] [--prompt-words 120]
"""
import argparse
import json
import tempfile
from pathlib import Path

import polars as pl
import torch

from slm_research import training
from slm_research.slm import embedded_slm_path
from slm_research.training import TrainConfig, default_threads, run_training, sft_dataset, synthetic_calls


def long_prompts(frame: pl.DataFrame, words: int) -> pl.DataFrame:
    "Each call's last user turn padded with `words` words of earlier conversation, so prompts outweigh answers."
    filler = " ".join(["the agent read the page and noted what it saw"] * (words // 10))
    def grow(messages: str) -> str:
        msgs = json.loads(messages)
        msgs[-1]["content"] = f"{filler}\n{msgs[-1]['content']}"
        return json.dumps(msgs)
    return frame.with_columns(pl.col("messages").map_elements(grow, return_dtype=pl.String))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prompt-words", type=int, default=120)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from transformers import AutoTokenizer
    base = str(embedded_slm_path())
    tok = AutoTokenizer.from_pretrained(base)
    ds = sft_dataset(long_prompts(synthetic_calls(120, seed=a.seed), a.prompt_words), tok, max_length=256)
    answer = sum(sum(l != -100 for l in r["labels"]) for r in ds) / len(ds)
    length = sum(len(r["input_ids"]) for r in ds) / len(ds)
    cfg = TrainConfig(base=base, steps=a.steps, lr=1e-3, batch_size=8, max_length=256, save_steps=10 * a.steps,
                      seed=a.seed, num_threads=a.threads)
    out = {"base": base, "steps": a.steps, "threads": a.threads, "tokens_per_example": length,
           "answer_tokens_per_example": answer, "runs": {}}
    answer_loss = training._answer_loss_trainer
    with tempfile.TemporaryDirectory() as d:
        for name in ("trl_fused_head", "answer_positions"):
            training._answer_loss_trainer = (lambda cls: cls) if name == "trl_fused_head" else answer_loss
            try: res = run_training(ds, cfg, Path(d)/name, resume=False)
            finally: training._answer_loss_trainer = answer_loss
            out["runs"][name] = {"seconds_per_step": res.train_seconds / res.steps, "tokens_per_s": res.tokens_per_s,
                                 "losses": res.losses}
            print(f"{name:17s} {res.train_seconds / res.steps:5.2f} s a step, {res.tokens_per_s:5.0f} tokens/s, "
                  f"losses {[round(x, 3) for x in res.losses]}")
            del res
    b, f = out["runs"]["trl_fused_head"], out["runs"]["answer_positions"]
    out["speedup"] = b["seconds_per_step"] / f["seconds_per_step"]
    out["max_loss_difference"] = max(abs(x - y) for x, y in zip(b["losses"], f["losses"]))
    print(f"{length:.0f} tokens an example, {answer:.0f} of them answer: the answer-position loss is "
          f"x{out['speedup']:.2f} a step; losses differ by at most {out['max_loss_difference']:.4f}")
    dest = Path(__file__).parent/"results"/"answer_loss.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1))
    print(f"-> {dest}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
