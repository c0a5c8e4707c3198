"""The S1 capture proxy on loopback, against calling the upstream directly: added latency, throughput, CPU per call,
and what a crash loses.

    .venv/bin/python bench/bench_proxy.py [--requests 300] [--throughput-requests 2000] [--concurrency 20]
                                          [--stream-share 0.3] [--upstream-delay-ms 0] [--kill-after 300]

Baseline: the same OpenAI-compatible upstream (slm_research.capture.fake_llm.demo_upstream_app), called directly with the
same client and the same requests (taken from the embedded corpus, so prompts, tool definitions and sizes are
realistic). The upstream and each proxy run in their own process (uvicorn); the client (httpx, asyncio) in this one.
The proxy paths (`PATHS`): group commit on the event loop (`LoopWriter`, the default), a writer thread
(`BackgroundWriter`), the writer inline in each request's handler, and the same proxy logging nothing (the HTTP hop).

1. Latency at concurrency 1: p50/p99 of (proxied - direct) per call, requests interleaved so drift hits all paths alike.
2. Throughput at `--concurrency`, twice: the mixed workload (`--stream-share` streamed) and non-streamed calls only.
   The proxy passes on what has arrived of a stream in one piece, so through it the client reads fewer, larger pieces
   than from the upstream directly, which can put the mixed ratio above 1; the non-streamed ratio has no such effect.
   Each path runs twice, alternating, and the better run counts (the CPU is shared; alternating spreads the noise).
   Also reported: the proxy's and the upstream's CPU time per call (their processes' user + system time), which
   does not depend on which process is the bottleneck on this machine.
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
    from slm_research.capture.fake_llm import demo_upstream_app
    uvicorn.run(demo_upstream_app(delay_s=delay_s), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _run_proxy(port, upstream, store, public_key, pseudonym_key, commit, switch_interval=None):
    import sys
    import uvicorn
    if switch_interval: sys.setswitchinterval(switch_interval)  # how soon the writer thread gets the GIL back
    from slm_research.capture.keys import Pseudonymizer
    from slm_research.capture.proxy import create_app
    from slm_research.capture.store import SegmentWriter
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


async def _throughput(url, requests, concurrency, pids=()):
    "Requests/s through `url`, and the CPU ms per call that the processes `pids` spent meanwhile."
    import httpx
    import psutil
    procs = [psutil.Process(p) for p in pids]
    it = iter(requests)
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency * 2)) as c:
        async def worker():
            for req in it: await _try(c, url, req)
        cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        rps = len(requests) / (time.perf_counter() - t)
    cpu_ms = [(sum(p.cpu_times()[:2]) - c0) * 1000 / len(requests) for p, c0 in zip(procs, cpu0)]
    return rps, cpu_ms


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


PATHS = {  # the proxy paths measured against calling the upstream directly: (how records are committed, logs at all)
    "proxy": ("loop", True), "thread": ("thread", True), "inline": ("inline", True), "bare": ("loop", False)}
LABELS = {"direct": "direct", "proxy": "via proxy", "thread": "writer thread", "inline": "inline writer",
          "bare": "logging nothing"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="sequential requests per path (latency)")
    ap.add_argument("--throughput-requests", type=int, default=2000, help="requests per path, workload and run (throughput)")
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--stream-share", type=float, default=0.3, help="share of streamed requests in the mixed workload")
    ap.add_argument("--upstream-delay-ms", type=float, default=0.0, help="simulated LLM time in the upstream (0: pure overhead)")
    ap.add_argument("--kill-after", type=int, default=300, help="answered calls before the proxy is killed (crash phase)")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval in the proxies (default Python's 0.005 s); smaller hands the GIL to the writer thread sooner")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import random
    from slm_research.capture.keys import generate_keys, load_private_keys
    from slm_research.capture.store import read_store
    from slm_research.corpus import generate_records

    rng = random.Random(args.seed)
    n_req = max(args.requests, args.throughput_requests, args.kill_after * 2)
    requests = []
    for rec, _, _ in generate_records(n_req, args.seed):
        req = {k: v for k, v in rec["request"].items() if k in ("messages", "tools", "temperature")}
        req["model"] = "demo-llm"
        req["stream"] = rng.random() < args.stream_share
        requests.append(req)
    batch = requests[: args.throughput_requests]
    workloads = {"mixed": batch, "non_streamed": [{**r, "stream": False} for r in batch]}

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        keys = generate_keys(Path(tmp)/"keys")
        keyargs = (str(keys["public"]), str(keys["pseudonym"]))
        store = lambda name: str(Path(tmp)/name)
        ports = {name: _free_port() for name in ("direct", *PATHS, "crash")}
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        proxy = lambda name, commit, logs: ctx.Process(target=_run_proxy, daemon=True, args=(
            ports[name], urls["direct"], store(name) if logs else None, *keyargs, commit, args.switch_interval))
        procs = {"direct": ctx.Process(target=_run_upstream, args=(ports["direct"], args.upstream_delay_ms / 1000), daemon=True)}
        procs |= {name: proxy(name, *how) for name, how in PATHS.items()}
        for p in procs.values(): p.start()
        try:
            for name in procs: _wait(urls[name])
            latency_rows = asyncio.run(_latency([urls[n] for n in procs], requests[: args.requests]))
            runs = {w: {n: [] for n in procs} for w in workloads}   # (requests/s, [upstream, proxy] CPU ms per call)
            for w, reqs in workloads.items():
                for _ in range(2):
                    for n in procs:
                        pids = [procs["direct"].pid] + ([procs[n].pid] if n != "direct" else [])
                        runs[w][n].append(asyncio.run(_throughput(urls[n], reqs, args.concurrency, pids)))
            victim = proxy("crash", "loop", True)
            victim.start(); _wait(urls["crash"])
            sent, answered = asyncio.run(_crash(urls["crash"], requests[: args.kill_after * 2], args.concurrency, args.kill_after, victim.pid))
            victim.join(10)
        finally:
            for p in procs.values(): p.terminate()  # SIGTERM: uvicorn shuts down gracefully, the proxies seal their segments
            for p in procs.values(): p.join(15)
        priv = load_private_keys(keys["private"])
        n_logged = {n: sum(1 for _ in read_store(store(n), priv)) for n, (_, logs) in PATHS.items() if logs}
        report = []
        logged_crash = {r["request"]["messages"][0]["content"] for r in read_store(store("crash"), priv, report)}

    direct_ms = [row[0] for row in latency_rows]
    added = {n: [row[i] - row[0] for row in latency_rows] for i, n in enumerate(procs) if n != "direct"}
    throughput = {}
    for w, by_path in runs.items():
        best_direct = max(r for r, _ in by_path["direct"])
        throughput[w] = {n: dict(rps_runs=[r for r, _ in rs], rps=max(r for r, _ in rs), ratio=max(r for r, _ in rs) / best_direct,
                                 cpu_ms_per_call=dict(zip(("upstream", "proxy"), map(statistics.fmean, zip(*(c for _, c in rs))))))
                         for n, rs in by_path.items()}
    expected = 20 + args.requests + 2 * len(workloads) * args.throughput_requests
    result = dict(
        baseline="direct calls to the same upstream with the same httpx client, measured in the same run",
        caveat="2 CPU cores shared by client, upstream and proxy: throughput ratios say whether the proxy fits beside them",
        requests=args.requests, throughput_requests=args.throughput_requests, concurrency=args.concurrency,
        stream_share=args.stream_share, upstream_delay_ms=args.upstream_delay_ms, switch_interval=args.switch_interval,
        direct_ms_p50=_pct(direct_ms, 50), added_ms_p50=_pct(added["proxy"], 50), added_ms_p99=_pct(added["proxy"], 99),
        added_ms_p50_by_path={n: _pct(a, 50) for n, a in added.items()}, added_ms_p99_by_path={n: _pct(a, 99) for n, a in added.items()},
        rps_ratio=throughput["mixed"]["proxy"]["ratio"], rps_ratio_non_streamed=throughput["non_streamed"]["proxy"]["ratio"],
        throughput=throughput, logged=n_logged, expected_logged=expected, client_errors={u: len(v) for u, v in ERRORS.items()},
        crash=dict(sent=len(sent), answered=len(answered), in_flight_at_kill=len(sent - answered), logged=len(logged_crash),
                   answered_not_logged=len(answered - logged_crash), in_flight_logged=len(logged_crash - answered),
                   segments=[{k: v for k, v in r.__dict__.items() if k != "key_id"} for r in report]),
        machine=dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count(),
                     load_avg=os.getloadavg()),
    )
    out = Path(__file__).parent/"results"/f"proxy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    p50, p99 = result["added_ms_p50_by_path"], result["added_ms_p99_by_path"]
    print(f"latency (concurrency 1): direct p50 {result['direct_ms_p50']:.2f} ms; added p50 / p99: " +
          "; ".join(f"{LABELS[n]} {p50[n]:.2f} / {p99[n]:.2f} ms{' (goal: p50 <= 2 ms)' if n == 'proxy' else ''}" for n in PATHS))
    for w, t in throughput.items():
        kind = f"{args.stream_share:.0%} streamed" if w == "mixed" else "none streamed"
        print(f"requests/s at concurrency {args.concurrency}, {kind}: direct {t['direct']['rps']:.0f}; " +
              "; ".join(f"{LABELS[n]} {t[n]['rps']:.0f} ({t[n]['ratio']:.2f}{', goal >= 0.9' if n == 'proxy' else ''})" for n in PATHS))
        print(f"  CPU ms per call: upstream {t['direct']['cpu_ms_per_call']['upstream']:.2f}; " +
              "; ".join(f"{LABELS[n]} {t[n]['cpu_ms_per_call']['proxy']:.2f}" for n in PATHS))
    c = result["crash"]
    print(f"kill -9 under load: {c['answered']} answered, {c['in_flight_at_kill']} in flight, {c['logged']} logged; "
          f"answered but not logged: {c['answered_not_logged']} (goal 0)")
    print(f"logged {min(n_logged.values())} of {expected} proxied calls per logging path; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; results: {out}")
    n_err = sum(len(ERRORS.get(urls[n], [])) for n in n_logged)
    if n_err: print(f"client errors (not counted as answered): {result['client_errors']}")
    if min(n_logged.values()) < expected - n_err: raise SystemExit("some proxied calls were not logged")
    if c["answered_not_logged"]: raise SystemExit("the crash lost calls whose answer a client had seen")
    return result


if __name__ == "__main__":
    main()
