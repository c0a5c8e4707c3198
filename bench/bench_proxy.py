"""Added latency and throughput of the S1 capture proxy on loopback, against calling the upstream directly.

    .venv/bin/python bench/bench_proxy.py [--requests 300] [--concurrency 8] [--stream-share 0.3] [--upstream-delay-ms 0]

Baseline: the same OpenAI-compatible upstream (slm_research.capture.demo_upstream_app), called
directly with the same `openai` client and the same requests (taken from the embedded corpus, so
prompts, tool definitions and sizes are realistic). The upstream and the proxy each run in their own
process (uvicorn), the client in this one. Reported: the proxy's added latency per call (p50/p99 of
proxied minus direct, requests interleaved), requests/s with `--concurrency` client threads through
the proxy vs direct, and a check that every proxied call was logged (encrypted) in the store.
Results go to bench/results/proxy-<timestamp>.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _run_upstream(port, delay_s):
    import uvicorn
    from slm_research.capture import demo_upstream_app
    uvicorn.run(demo_upstream_app(delay_s=delay_s), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _run_proxy(port, upstream, store, public_key, pseudonym_key):
    import uvicorn
    from slm_research.capture import Pseudonymizer, SegmentWriter, create_app
    writer = SegmentWriter(store, public_key, Pseudonymizer(pseudonym_key))
    uvicorn.run(create_app(upstream, writer, agent="bench"), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _wait(url, timeout=30):
    import httpx
    t = time.time()
    while time.time() - t < timeout:
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200: return
        except httpx.HTTPError: time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="sequential requests per path (latency)")
    ap.add_argument("--throughput-requests", type=int, default=600, help="requests per path for the throughput run")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--stream-share", type=float, default=0.3, help="share of streamed requests")
    ap.add_argument("--upstream-delay-ms", type=float, default=0.0, help="simulated LLM time in the upstream (0: measure pure overhead)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import random
    import openai
    from slm_research.capture import generate_keys, load_private_keys, read_store
    from slm_research.corpus import generate_records

    rng = random.Random(args.seed)
    requests = []
    for rec, _, _ in generate_records(max(args.requests, args.throughput_requests), args.seed):
        req = {k: v for k, v in rec["request"].items() if k in ("messages", "tools", "temperature")}
        req["model"] = "demo-llm"
        req["stream"] = rng.random() < args.stream_share
        requests.append(req)

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        keys = generate_keys(Path(tmp)/"keys")
        store = Path(tmp)/"store"
        up_port, px_port = _free_port(), _free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        proxy = f"http://127.0.0.1:{px_port}"
        procs = [ctx.Process(target=_run_upstream, args=(up_port, args.upstream_delay_ms / 1000), daemon=True),
                 ctx.Process(target=_run_proxy, args=(px_port, upstream, str(store), str(keys["public"]), str(keys["pseudonym"])), daemon=True)]
        for p in procs: p.start()
        try:
            _wait(upstream); _wait(proxy)
            direct = openai.OpenAI(base_url=upstream + "/v1", api_key="x", max_retries=0)
            via = openai.OpenAI(base_url=proxy + "/v1", api_key="x", max_retries=0)

            def call(client, req):
                t = time.perf_counter()
                r = client.chat.completions.create(**req)
                if req["stream"]:
                    for _ in r: pass
                return (time.perf_counter() - t) * 1000

            for req in requests[:20]: call(direct, req); call(via, req)  # warm-up (connections, imports)
            lat_direct, lat_proxy = [], []
            for req in requests[: args.requests]:  # interleaved, so drift hits both paths alike
                lat_direct.append(call(direct, req)); lat_proxy.append(call(via, req))
            added = [p - d for p, d in zip(lat_proxy, lat_direct)]

            def throughput(client):
                batch = requests[: args.throughput_requests]
                t = time.perf_counter()
                with ThreadPoolExecutor(args.concurrency) as ex: list(ex.map(lambda r: call(client, r), batch))
                return len(batch) / (time.perf_counter() - t)
            rps_direct, rps_proxy = throughput(direct), throughput(via)
        finally:
            for p in procs: p.terminate()  # SIGTERM: uvicorn shuts down gracefully, the proxy seals its segment
            for p in procs: p.join(15)
        n_logged = sum(1 for _ in read_store(store, load_private_keys(keys["private"])))

    result = dict(
        baseline="direct calls to the same upstream with the same openai client",
        requests=args.requests, concurrency=args.concurrency, stream_share=args.stream_share, upstream_delay_ms=args.upstream_delay_ms,
        direct_ms_p50=_pct(lat_direct, 50), proxy_ms_p50=_pct(lat_proxy, 50),
        added_ms_p50=_pct(added, 50), added_ms_p99=_pct(added, 99), added_ms_mean=statistics.fmean(added),
        rps_direct=rps_direct, rps_proxy=rps_proxy, rps_ratio=rps_proxy / rps_direct,
        logged=n_logged, expected_logged=20 + args.requests + args.throughput_requests,
        machine=dict(platform=platform.platform(), python=platform.python_version(), cpus=__import__("os").cpu_count()),
    )
    out = Path(__file__).parent/"results"/f"proxy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"latency  direct p50 {result['direct_ms_p50']:.2f} ms | via proxy p50 {result['proxy_ms_p50']:.2f} ms | "
          f"added p50 {result['added_ms_p50']:.2f} ms, p99 {result['added_ms_p99']:.2f} ms")
    print(f"requests/s with {args.concurrency} clients: direct {rps_direct:.0f}, via proxy (logged) {rps_proxy:.0f} "
          f"(ratio {result['rps_ratio']:.2f})")
    print(f"logged {n_logged} of {result['expected_logged']} proxied calls; results: {out}")
    if n_logged != result["expected_logged"]: raise SystemExit("some proxied calls were not logged")
    return result


if __name__ == "__main__":
    main()
