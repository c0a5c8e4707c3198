"""The S1 capture proxy on loopback, against calling the upstream directly: added latency, throughput, and what a
crash loses.

    .venv/bin/python bench/bench_proxy.py [--requests 300] [--throughput-requests 600] [--concurrency 20]
                                          [--stream-share 0.3] [--upstream-delay-ms 0] [--kill-after 300]

Baseline: the same OpenAI-compatible upstream (slm_research.capture.demo_upstream_app), called directly with the
same client and the same requests (taken from the embedded corpus, so prompts, tool definitions and sizes are
realistic). The upstream and each proxy run in their own process (uvicorn); the client (httpx, asyncio) in this one.

1. Latency at concurrency 1: p50/p99 of (proxied - direct) per call, requests interleaved so drift hits all paths
   alike; the same for the inline writer and for the proxy logging nothing.
2. Throughput at `--concurrency`: requests/s direct, through the proxy (records written by group commit on its event
   loop, `LoopWriter`), through the proxy with a writer thread (`BackgroundWriter`, the design before), with the
   writer inline in each request's handler, and through the same proxy logging nothing (the cost of the HTTP hop). Each path
   runs twice, alternating, and the better run counts (the CPU is shared; alternating spreads the noise).
3. Crash: a fresh proxy under the same load is killed with SIGKILL after `--kill-after` answered calls. Reported:
   calls the clients saw answered, calls in flight at the kill, calls logged; `answered_not_logged` must be 0.
Every proxied call of phases 1-2 must be in the store. Results go to bench/results/proxy-<timestamp>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import tempfile
import time
from pathlib import Path


def _run_upstream(port, delay_s):
    import uvicorn
    from slm_research.capture import demo_upstream_app
    uvicorn.run(demo_upstream_app(delay_s=delay_s), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _run_proxy(port, upstream, store, public_key, pseudonym_key, commit, switch_interval=None):
    import sys
    import uvicorn
    if switch_interval: sys.setswitchinterval(switch_interval)  # how soon the writer thread gets the GIL back
    from slm_research.capture import Pseudonymizer, SegmentWriter, create_app
    writer = SegmentWriter(store, public_key, Pseudonymizer(pseudonym_key)) if store else None  # None: forwards, logs nothing
    uvicorn.run(create_app(upstream, writer, agent="bench", commit=commit), host="127.0.0.1", port=port,
                log_level="warning", access_log=False)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _wait(url, timeout=60):
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


async def _call(client, url, req):
    "One call; returns (ms, answered). A stream counts as answered when its [DONE] arrived."
    t = time.perf_counter()
    if req["stream"]:
        got = b""
        async with client.stream("POST", url + "/v1/chat/completions", json=req) as r:
            async for piece in r.aiter_raw(): got += piece
        ok = r.status_code == 200 and b"data: [DONE]" in got
    else:
        r = await client.post(url + "/v1/chat/completions", json=req)
        ok = r.status_code == 200 and bool(r.json()["choices"])
    return (time.perf_counter() - t) * 1000, ok


ERRORS: dict = {}   # client-side errors per URL (a keep-alive connection closed under a stalled CPU, ...): reported


async def _try(c, url, req):
    import httpx
    try: return await _call(c, url, req)
    except httpx.HTTPError as e:
        ERRORS.setdefault(url, []).append(type(e).__name__); return float("nan"), False


async def _latency(urls, requests):
    "Per request, the latency through each of `urls` in turn (interleaved); requests with an error anywhere are left out."
    import httpx
    async with httpx.AsyncClient(timeout=30) as c:
        for req in requests[:20]:
            for u in urls: await _try(c, u, req)  # warm-up
        rows = []
        for req in requests:
            row = [await _try(c, u, req) for u in urls]
            if all(ok for _, ok in row): rows.append([ms for ms, _ in row])
    return rows


async def _throughput(url, requests, concurrency):
    import httpx
    it = iter(requests)
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency * 2)) as c:
        async def worker():
            for req in it: await _try(c, url, req)
        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(requests) / (time.perf_counter() - t)


async def _crash(url, requests, concurrency, kill_after, pid, timeout_s=120):
    "Load with marked requests; SIGKILL the proxy once `kill_after` calls were answered. Returns (sent, answered)."
    import httpx
    sent, answered, killed = set(), set(), asyncio.Event()
    it = iter(enumerate(requests))
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency * 2)) as c:
        async def worker():
            for i, req in it:
                if killed.is_set(): return
                marker = f"crash-marker-{i}"
                req = {**req, "messages": [{"role": "user", "content": marker}, *req["messages"]]}
                sent.add(marker)
                try: _, ok = await _call(c, url, req)
                except httpx.HTTPError: return
                if ok: answered.add(marker)
                if len(answered) >= kill_after and not killed.is_set():
                    os.kill(pid, signal.SIGKILL); killed.set()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout_s)
    return sent, answered


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="sequential requests per path (latency)")
    ap.add_argument("--throughput-requests", type=int, default=600, help="requests per path and run (throughput)")
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--stream-share", type=float, default=0.3, help="share of streamed requests")
    ap.add_argument("--upstream-delay-ms", type=float, default=0.0, help="simulated LLM time in the upstream (0: pure overhead)")
    ap.add_argument("--kill-after", type=int, default=300, help="answered calls before the proxy is killed (crash phase)")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval in the proxies (default Python's 0.005 s); smaller hands the GIL to the writer thread sooner")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import random
    from slm_research.capture import generate_keys, load_private_keys, read_store
    from slm_research.corpus import generate_records

    rng = random.Random(args.seed)
    n_req = max(args.requests, args.throughput_requests, args.kill_after * 2)
    requests = []
    for rec, _, _ in generate_records(n_req, args.seed):
        req = {k: v for k, v in rec["request"].items() if k in ("messages", "tools", "temperature")}
        req["model"] = "demo-llm"
        req["stream"] = rng.random() < args.stream_share
        requests.append(req)

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        keys = generate_keys(Path(tmp)/"keys")
        up_port, bg_port, thr_port, inl_port, bare_port, crash_port = (_free_port() for _ in range(6))
        upstream, proxy, thread, inline, bare, crash = (
            f"http://127.0.0.1:{p}" for p in (up_port, bg_port, thr_port, inl_port, bare_port, crash_port))
        store = lambda name: str(Path(tmp)/name)
        keyargs = (str(keys["public"]), str(keys["pseudonym"]))
        procs = [ctx.Process(target=_run_upstream, args=(up_port, args.upstream_delay_ms / 1000), daemon=True),
                 ctx.Process(target=_run_proxy, args=(bg_port, upstream, store("bg"), *keyargs, "loop", args.switch_interval), daemon=True),
                 ctx.Process(target=_run_proxy, args=(thr_port, upstream, store("thread"), *keyargs, "thread", args.switch_interval), daemon=True),
                 ctx.Process(target=_run_proxy, args=(inl_port, upstream, store("inline"), *keyargs, "inline", args.switch_interval), daemon=True),
                 ctx.Process(target=_run_proxy, args=(bare_port, upstream, None, *keyargs, "loop", args.switch_interval), daemon=True)]
        for p in procs: p.start()
        try:
            for u in (upstream, proxy, thread, inline, bare): _wait(u)
            rows = asyncio.run(_latency([upstream, proxy, thread, inline, bare], requests[: args.requests]))
            batch = requests[: args.throughput_requests]
            rps = {"direct": [], "proxy": [], "thread": [], "inline": [], "bare": []}
            for _ in range(2):
                for name, url in (("direct", upstream), ("proxy", proxy), ("thread", thread), ("inline", inline), ("bare", bare)):
                    rps[name].append(asyncio.run(_throughput(url, batch, args.concurrency)))
            victim = ctx.Process(target=_run_proxy, args=(crash_port, upstream, store("crash"), *keyargs, "loop", args.switch_interval), daemon=True)
            victim.start(); _wait(crash)
            sent, answered = asyncio.run(_crash(crash, requests[: args.kill_after * 2], args.concurrency, args.kill_after, victim.pid))
            victim.join(10)
        finally:
            for p in procs: p.terminate()  # SIGTERM: uvicorn shuts down gracefully, the proxies seal their segments
            for p in procs: p.join(15)
        priv = load_private_keys(keys["private"])
        n_logged = sum(1 for _ in read_store(store("bg"), priv))
        n_logged_inline = sum(1 for _ in read_store(store("inline"), priv))
        n_logged_thread = sum(1 for _ in read_store(store("thread"), priv))
        report = []
        logged_crash = {r["request"]["messages"][0]["content"] for r in read_store(store("crash"), priv, report)}

    added = [p - d for d, p, _, _, _ in rows]
    added_thread = [t - d for d, _, t, _, _ in rows]
    added_inline = [i - d for d, _, _, i, _ in rows]
    added_bare = [b - d for d, _, _, _, b in rows]
    best = {k: max(v) for k, v in rps.items()}
    result = dict(
        baseline="direct calls to the same upstream with the same httpx client, measured in the same run",
        caveat="2 CPU cores shared with other work while measured: ratios are indicative; rerun on an idle machine",
        requests=args.requests, concurrency=args.concurrency, switch_interval=args.switch_interval, stream_share=args.stream_share,
        upstream_delay_ms=args.upstream_delay_ms,
        direct_ms_p50=_pct([r[0] for r in rows], 50), proxy_ms_p50=_pct([r[1] for r in rows], 50),
        added_ms_p50=_pct(added, 50), added_ms_p99=_pct(added, 99), added_ms_mean=statistics.fmean(added),
        added_ms_p50_thread_writer=_pct(added_thread, 50), added_ms_p50_inline_writer=_pct(added_inline, 50),
        added_ms_p50_no_logging=_pct(added_bare, 50),
        rps_runs=rps, rps_direct=best["direct"], rps_proxy=best["proxy"], rps_proxy_inline_writer=best["inline"],
        rps_proxy_no_logging=best["bare"], rps_proxy_thread_writer=best["thread"],
        rps_ratio=best["proxy"] / best["direct"], rps_ratio_thread_writer=best["thread"] / best["direct"],
        rps_ratio_inline_writer=best["inline"] / best["direct"],
        rps_ratio_no_logging=best["bare"] / best["direct"],
        logged=n_logged, expected_logged=20 + args.requests + 2 * args.throughput_requests,
        logged_inline=n_logged_inline, logged_thread=n_logged_thread, client_errors={u: len(v) for u, v in ERRORS.items()},
        crash=dict(sent=len(sent), answered=len(answered), in_flight_at_kill=len(sent - answered), logged=len(logged_crash),
                   answered_not_logged=len(answered - logged_crash), in_flight_logged=len(logged_crash - answered),
                   segments=[{k: v for k, v in r.__dict__.items() if k != "key_id"} for r in report]),
        machine=dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count(),
                     load_avg=os.getloadavg()),
    )
    out = Path(__file__).parent/"results"/f"proxy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    c = result["crash"]
    print(f"latency (concurrency 1)  direct p50 {result['direct_ms_p50']:.2f} ms | via proxy p50 {result['proxy_ms_p50']:.2f} ms | "
          f"added p50 {result['added_ms_p50']:.2f} ms, p99 {result['added_ms_p99']:.2f} ms (goal: p50 <= 2 ms); "
          f"inline writer {result['added_ms_p50_inline_writer']:.2f} ms; the same proxy logging nothing {result['added_ms_p50_no_logging']:.2f} ms")
    print(f"requests/s at concurrency {args.concurrency}: direct {best['direct']:.0f}, via proxy {best['proxy']:.0f} "
          f"(ratio {result['rps_ratio']:.2f}, goal >= 0.9); writer thread {best['thread']:.0f} (ratio {result['rps_ratio_thread_writer']:.2f}); inline writer {best['inline']:.0f} (ratio {result['rps_ratio_inline_writer']:.2f}); logging nothing {best['bare']:.0f} ({result['rps_ratio_no_logging']:.2f})")
    print(f"kill -9 under load: {c['answered']} answered, {c['in_flight_at_kill']} in flight, {c['logged']} logged; "
          f"answered but not logged: {c['answered_not_logged']} (goal 0)")
    print(f"logged {n_logged} of {result['expected_logged']} proxied calls; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores ({result['caveat']}); results: {out}")
    n_err = len(ERRORS.get(proxy, [])) + len(ERRORS.get(inline, [])) + len(ERRORS.get(thread, []))
    if n_err: print(f"client errors (not counted as answered): {result['client_errors']}")
    if min(n_logged, n_logged_inline, n_logged_thread) < result["expected_logged"] - n_err: raise SystemExit("some proxied calls were not logged")
    if c["answered_not_logged"]: raise SystemExit("the crash lost calls whose answer a client had seen")
    return result


if __name__ == "__main__":
    main()
