"""The router's added latency (S6), measured on loopback with the real `openai` client.

Baseline: the capture proxy without a router, forwarding to an OpenAI-compatible upstream on 127.0.0.1.
Measured in the same run:
  - proxy + router, call of an ungated cluster (assign, then forward): the price every LLM call pays;
  - proxy + router, call of a gated cluster answered by a zero-cost responder (assign, validate, answer):
    the routing overhead without generation;
  - proxy + router, gated cluster answered by the stand-in base model (a real generation);
  - in process: `Router.handle` alone, per embedder (static, MiniLM) of the request assigner.
Each request is a different call of the embedded corpus, so no embedding cache helps.

    .venv/bin/python bench/bench_router.py [--n 60] [--seed 0]
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

import polars as pl

os.environ.setdefault("SLM_PROFILE", "bench")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from slm_research.capture import create_app, demo_upstream_app, serve, to_frame  # noqa: E402
from slm_research.core import paths  # noqa: E402
from slm_research.corpus import generate_corpus, iter_jsonl, read_gold  # noqa: E402
from slm_research.iterate import RequestAssigner  # noqa: E402
from slm_research.serve import Route, Router  # noqa: E402


def requests_of(frame: pl.DataFrame) -> list[dict]:
    out = []
    for row in frame.iter_rows(named=True):
        req = {"model": row["model"] or "gpt-4o", "messages": json.loads(row["messages"])}
        if tools := json.loads(row["tools"]): req["tools"] = tools
        out.append(req)
    return out


def timed(fn, items) -> list[float]:
    ms = []
    for x in items:
        t = time.perf_counter(); fn(x); ms.append((time.perf_counter() - t) * 1000)
    return ms


def summary(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=20)
    return {"median_ms": statistics.median(ms), "p95_ms": q[-1], "n": len(ms)}


def main(n: int, seed: int, reps: int = 3):
    folder = generate_corpus(max(600, 4 * n), seed, progress=False)
    frame = to_frame(iter_jsonl(folder/"calls.jsonl")).join(read_gold(folder).select("id", "subtask"), on="id")
    tasks = sorted(frame["subtask"].unique().to_list())
    frame = frame.with_columns(cluster=pl.col("subtask").replace_strict({t: i for i, t in enumerate(tasks)}, return_dtype=pl.Int64),
                               cluster_label=pl.col("subtask"))
    live = frame.sample(fraction=1.0, shuffle=True, seed=seed)
    fit, live = live.head(live.height // 2), live.tail(live.height - live.height // 2)
    gated_task, ungated_task = "next_step", "write_code"
    gated, ungated = (requests_of(live.filter(pl.col("subtask") == t).head(n)) for t in (gated_task, ungated_task))
    answer = json.loads(fit.filter(pl.col("subtask") == gated_task)["response"][0])
    results = {"n": n, "reps": reps, "seed": seed, "cpu_count": os.cpu_count(), "baseline": "capture proxy without a router, same upstream, same requests"}

    for embedder in ("static", "minilm"):
        assigner = RequestAssigner.fit(fit, embedder=embedder)
        router = Router(assigner.assign_request, [Route(tasks.index(gated_task), lambda r: answer, "slm/instant")])
        router.handle(gated[0])  # load the embedder once
        results[f"handle_in_process_{embedder}"] = summary(timed(router.handle, gated + ungated))

    assigner = RequestAssigner.fit(fit, embedder="static")
    instant = Router(assigner.assign_request, [Route(tasks.index(gated_task), lambda r: answer, "slm/instant")])
    from openai import OpenAI

    with serve(demo_upstream_app()) as upstream:
        # both proxies run at once and take the requests alternately, so drift in the machine's load hits both alike
        with serve(create_app(upstream.url, None, None)) as plain, serve(create_app(upstream.url, None, instant)) as routed:
            clients = {name: OpenAI(base_url=p.url + "/v1", api_key="sk-bench", max_retries=0) for name, p in (("plain", plain), ("routed", routed))}
            for c in clients.values(): c.chat.completions.create(**ungated[0])   # warm-up: connections, lazy imports
            times = {"proxy_no_router_ungated": [], "proxy_router_ungated": [], "proxy_router_gated_instant": []}
            for _ in range(reps):
                for req in ungated:
                    times["proxy_no_router_ungated"] += timed(lambda r: clients["plain"].chat.completions.create(**r), [req])
                    times["proxy_router_ungated"] += timed(lambda r: clients["routed"].chat.completions.create(**r), [req])
                times["proxy_router_gated_instant"] += timed(lambda r: clients["routed"].chat.completions.create(**r), gated)
            results.update({k: summary(v) for k, v in times.items()})
        base = results["proxy_no_router_ungated"]["median_ms"]
        results["added_ms_ungated"] = results["proxy_router_ungated"]["median_ms"] - base
        results["ratio_ungated_vs_baseline"] = results["proxy_router_ungated"]["median_ms"] / base
        results["ratio_gated_instant_vs_baseline"] = results["proxy_router_gated_instant"]["median_ms"] / base

        # a real generation: the stand-in base model (untrained weights, so it answers garbage and falls back;
        # the time is what one generation of up to 32 tokens costs on this CPU)
        from slm_research.slm import generate_batch
        from slm_research.training import base_config, build_stand_in_model, train_tokenizer
        tok = train_tokenizer(fit["messages"].head(200).to_list(), vocab_size=2048)
        model = build_stand_in_model(tok, base_config("tiny")).eval()
        slm = Router(assigner.assign_request, [Route(tasks.index(gated_task), lambda r: generate_batch(model, tok, [r], 32)[0], "slm/tiny")])
        with serve(create_app(upstream.url, None, slm)) as proxy:
            client = OpenAI(base_url=proxy.url + "/v1", api_key="sk-bench", max_retries=0)
            client.chat.completions.create(**gated[0])
            results["proxy_router_gated_tiny_model"] = summary(timed(lambda r: client.chat.completions.create(**r), gated[: max(10, n // 4)]))
        results["ratio_gated_tiny_model_vs_baseline"] = results["proxy_router_gated_tiny_model"]["median_ms"] / base

    out = paths().root/"bench"/"results"/"bench_router.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    for k, v in results.items(): print(f"{k:45s} {v}")
    print(f"wrote {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3, help="passes over the requests (embeddings are not cached)")
    a = ap.parse_args()
    main(a.n, a.seed, a.reps)
