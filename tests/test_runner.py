"The runner executes real notebooks with papermill in a throwaway workspace."
import json
import os
import subprocess
import sys
import time

import nbformat
import pytest
from click.testing import CliRunner

from slm_research.cli import main


def _notebook(path, params_src, body_src):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    p = nbformat.v4.new_code_cell(params_src)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(body_src)]
    nbformat.write(nb, path)


@pytest.fixture
def mini_workspace(tmp_path, monkeypatch):
    (tmp_path / "nbs").mkdir()
    (tmp_path / "settings.ini").write_text("[ci]\nseed = 7\nn = 3\n02_fails.n = 5\n")
    _notebook(tmp_path / "nbs" / "01_ok.ipynb", "seed = 0\nn = 1",
              "from slm_research.core import headline\n"
              "import os, pathlib\n"
              "pathlib.Path(os.environ['SLM_RUN_DIR'], 'seen.json').write_text(str([seed, n]))\n"
              "import json; from ipykernel.connect import get_connection_info\n"
              "pathlib.Path(os.environ['SLM_RUN_DIR'], 'transport').write_text(json.loads(get_connection_info())['transport'])\n"
              "headline('n_squared', n * n, 'computed')")
    _notebook(tmp_path / "nbs" / "02_fails.ipynb", "n = 1", "raise ValueError(f'bad n={n}')")
    _notebook(tmp_path / "nbs" / "03_after.ipynb", "n = 1", "pass")
    monkeypatch.setenv("SLM_ROOT", str(tmp_path))
    return tmp_path


def test_profile_parameters_reach_the_notebook(mini_workspace):
    run_dir = mini_workspace / "runs" / "r1"
    res = CliRunner().invoke(main, ["run", "--profile", "ci", "--only", "01", "--run-dir", str(run_dir), "-p", "n=4"])
    assert res.exit_code == 0, res.output
    assert (run_dir / "seen.json").read_text() == "[7, 4]"  # seed from the profile, n from -p
    assert (run_dir / "transport").read_text() == "ipc"      # not plain TCP, which others on the host could read
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] and summary["results"][0]["status"] == "ok"
    assert summary["headlines"]["01_ok"][0]["value"] == 16
    assert (run_dir / "01_ok.ipynb").exists() and not list((mini_workspace / "nbs").glob("*-ci*"))


def test_failure_names_notebook_and_error_and_skips_the_rest(mini_workspace):
    run_dir = mini_workspace / "runs" / "r2"
    res = CliRunner().invoke(main, ["run", "--profile", "ci", "--run-dir", str(run_dir)])
    assert res.exit_code != 0
    assert "02_fails" in res.output and "ValueError: bad n=5" in res.output
    statuses = [r["status"] for r in json.loads((run_dir / "summary.json").read_text())["results"]]
    assert statuses == ["ok", "failed", "skipped"]
    assert "| 02_fails | failed |" in (run_dir / "summary.md").read_text()


def test_unknown_profile_is_a_clear_error(mini_workspace):
    res = CliRunner().invoke(main, ["run", "--profile", "nope", "--run-dir", str(mini_workspace / "runs" / "r3")])
    assert res.exit_code != 0


def test_latest_run_goes_by_the_summary_not_the_folder_name(tmp_path):
    from slm_research.docs import latest_run
    for name, profile, started in [("latest-ci", "ci", "2026-01-02T00:00:00+00:00"),
                                   ("b-demo", "demo", "2026-01-03T00:00:00+00:00"),
                                   ("a-ci", "ci", "2026-01-01T00:00:00+00:00")]:
        (tmp_path/name).mkdir()
        (tmp_path/name/"summary.json").write_text(json.dumps({"profile": profile, "started": started, "results": []}))
    assert latest_run(tmp_path, "ci") == tmp_path/"latest-ci"
    assert latest_run(tmp_path) == tmp_path/"b-demo"
    assert latest_run(tmp_path, "paper") is None


def test_executed_notebook_is_quiet_and_every_parameter_is_read(tmp_path, monkeypatch, caplog):
    "No progress-bar leftovers, each warning once, and a parameter whose comment has '=' is still set by the profile."
    import logging

    from slm_research.runner import output_noise
    (tmp_path / "nbs").mkdir()
    (tmp_path / "settings.ini").write_text("[ci]\nseed = 3\n01_noisy.rank = 8\n")
    body = ("import warnings, time\n"
            "from tqdm.auto import tqdm\n"
            "from slm_research.core import progress\n"
            "for _ in tqdm(range(3), desc='library bar'): time.sleep(0.01)\n"
            "for _ in progress(range(3), desc='our bar'): pass\n"
            "def lib_a(): warnings.warn('the same deprecation', FutureWarning)\n"
            "def lib_b(): warnings.warn('the same deprecation', FutureWarning)\n"
            "lib_a(); lib_b()\n"
            "print('rank', rank)")
    _notebook(tmp_path / "nbs" / "01_noisy.ipynb", "seed = 0\nrank = 16   # LoRA rank (alpha = 2 x rank)", body)
    monkeypatch.setenv("SLM_ROOT", str(tmp_path))
    run_dir = tmp_path / "runs" / "r"
    with caplog.at_level(logging.WARNING):
        res = CliRunner().invoke(main, ["run", "--profile", "ci", "--run-dir", str(run_dir)])
    assert res.exit_code == 0, res.output
    papermill_noise = ("Unable to parse", "unknown parameter")
    assert not [r for r in caplog.records if any(n in r.getMessage() for n in papermill_noise)]
    executed = nbformat.read(run_dir / "01_noisy.ipynb", as_version=4)
    outputs = [o for c in executed.cells for o in c.get("outputs", [])]
    texts = [o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs]
    assert any("rank 8" in t for t in texts)                     # the profile's value reached the notebook
    assert sum(t.count("FutureWarning: the same deprecation") for t in texts) == 1  # once, not once per call site
    assert output_noise(executed) == [] and not any("%|" in t for t in texts)
    assert json.loads((run_dir / "summary.json").read_text())["results"][0]["noise"] == []


def _sigints_at_shutdown(manager_class, tmp_path, attempt: int = 0) -> bool:
    "Start a kernel, make its idle SIGINT handler write a file, shut it down: did the shutdown send it SIGINT?"
    import asyncio

    from slm_research.runner import kernel_config
    mark = tmp_path / f"sigint-{manager_class.__name__}-{attempt}"

    async def run():
        km = manager_class(kernel_name="python3", config=kernel_config())
        await km.start_kernel()
        kc = km.client(); kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=120)
            # ipykernel restores this handler after every request: it is what the idle kernel does on SIGINT
            code = (f"import pathlib\nget_ipython().kernel.saved_sigint_handler = "
                    f"lambda *a: pathlib.Path({str(mark)!r}).write_text('SIGINT')")
            msg_id = kc.execute(code)
            while (reply := await kc.get_shell_msg(timeout=120))["parent_header"].get("msg_id") != msg_id: pass
            assert reply["content"]["status"] == "ok"
        finally:
            kc.stop_channels()
            await km.shutdown_kernel()
    asyncio.run(run())
    return mark.exists()


@pytest.mark.slow
def test_the_runner_shuts_kernels_down_without_interrupting_them(tmp_path):
    "jupyter_client interrupts (SIGINT) every kernel it shuts down; a kernel still in a request logs a KeyboardInterrupt."
    from jupyter_client.manager import AsyncKernelManager

    from slm_research.runner import quiet_kernel_manager
    # the default does interrupt (a loaded machine may kill the kernel before its handler runs: up to three tries)...
    assert any(_sigints_at_shutdown(AsyncKernelManager, tmp_path, attempt) for attempt in range(3))
    assert not any(_sigints_at_shutdown(quiet_kernel_manager(), tmp_path, attempt) for attempt in range(2))  # ...ours not


def test_two_lanes_run_side_by_side_and_the_chain_keeps_its_order(tmp_path, monkeypatch):
    "With --jobs 2 the workspace chain runs in order in one lane, the other notebooks beside it; one torch thread each."
    (tmp_path / "nbs").mkdir()
    (tmp_path / "settings.ini").write_text("[ci]\nseed = 1\n")
    # 01_side and 05_corpus each wait (up to a minute) for the other to have started: only side by side do both meet
    log = ("import os, time, json, pathlib\n"
           "t0, run, me = time.time(), pathlib.Path(os.environ['SLM_RUN_DIR']), os.environ['SLM_NOTEBOOK']\n"
           "(run / f'{me}.started').touch()\n"
           "partner = {'01_side': '05_corpus', '05_corpus': '01_side'}.get(me)\n"
           "while partner and not (run / f'{partner}.started').exists() and time.time() - t0 < 60: time.sleep(0.05)\n"
           "met = partner is None or (run / f'{partner}.started').exists()\n"
           "rec = {'nb': me, 'start': t0, 'end': time.time(), 'met': met,\n"
           "       'threads': os.environ.get('SLM_THREADS'), 'cwd': os.getcwd(), 'cores': sorted(os.sched_getaffinity(0))}\n"
           "with open(pathlib.Path(os.environ['SLM_RUN_DIR'], 'log.jsonl'), 'a') as f: f.write(json.dumps(rec) + '\\n')")
    for name in ("01_side", "05_corpus", "10_capture", "99_side"): _notebook(tmp_path / "nbs" / f"{name}.ipynb", "seed = 0", log)
    monkeypatch.setenv("SLM_ROOT", str(tmp_path))
    monkeypatch.delenv("SLM_THREADS", raising=False)
    run_dir = tmp_path / "runs" / "r"
    pinned, cores = os.sched_getaffinity(0), set(range(os.cpu_count()))   # `make pytest` pins each worker to a core
    os.sched_setaffinity(0, cores)
    try: res = CliRunner().invoke(main, ["run", "--profile", "ci", "--run-dir", str(run_dir), "--jobs", "2"])
    finally: os.sched_setaffinity(0, pinned)
    assert res.exit_code == 0, res.output
    recs = {r["nb"]: r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())}
    if len(cores) >= 2:   # each lane on a core of its own: the chain on the first, the others on the second
        assert {tuple(recs[n]["cores"]) for n in ("05_corpus", "10_capture")} == {(min(cores),)}
        assert {tuple(recs[n]["cores"]) for n in ("01_side", "99_side")} == {(sorted(cores)[1],)}
    assert recs["05_corpus"]["end"] <= recs["10_capture"]["start"]                        # the chain, in order
    assert recs["01_side"]["start"] < recs["05_corpus"]["end"] and recs["05_corpus"]["start"] < recs["01_side"]["end"]
    assert recs["01_side"]["met"] and recs["05_corpus"]["met"]                             # they ran at the same time
    assert {r["threads"] for r in recs.values()} == {"1"}                                  # one torch thread each
    assert {r["cwd"] for r in recs.values()} == {str(tmp_path / "nbs")}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["notebook"] for r in summary["results"]] == ["01_side", "05_corpus", "10_capture", "99_side"] and summary["ok"]


_START_AT_ONCE = """
import sys, time
from jupyter_client.manager import KernelManager
from slm_research.runner import kernel_config
km = KernelManager(kernel_name="python3", config=kernel_config(0))
while time.time() < float(sys.argv[1]): time.sleep(0.001)
km.start_kernel()
kc = km.client(); kc.start_channels()
try:
    kc.wait_for_ready(timeout=30)
    shown = []
    kc.execute_interactive("40 + 2", timeout=30,
                           output_hook=lambda m: shown.append(m["content"].get("data", {}).get("text/plain")))
    print(*filter(None, shown))
finally:
    kc.stop_channels(); km.shutdown_kernel(now=True)
"""


def test_kernels_of_two_processes_started_at_once_keep_their_own_sockets():
    """Two runners (a test worker beside another, a notebook that runs notebooks) start a kernel in the same instant:
    each kernel answers its own runner. Under one socket name for both, one of them waited for replies that never came."""
    start_at = str(time.time() + 4)
    procs = [subprocess.Popen([sys.executable, "-c", _START_AT_ONCE, start_at], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-800:] for _, err in outs]
    assert [out.split() for out, _ in outs] == [["42"], ["42"]]


def test_a_hung_cell_fails_its_notebook_within_the_timeout_and_says_where(tmp_path, monkeypatch):
    (tmp_path / "nbs").mkdir()
    (tmp_path / "settings.ini").write_text("[ci]\nseed = 1\n")
    _notebook(tmp_path / "nbs" / "01_hangs.ipynb", "seed = 0",
              "import time\ndef wait_for_a_reply_that_never_comes():\n    time.sleep(600)\n"
              "wait_for_a_reply_that_never_comes()")
    _notebook(tmp_path / "nbs" / "02_after.ipynb", "seed = 0", "pass")
    monkeypatch.setenv("SLM_ROOT", str(tmp_path))
    run_dir = tmp_path / "runs" / "r"
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["run", "--profile", "ci", "--run-dir", str(run_dir), "--cell-timeout", "8"])
    assert time.perf_counter() - t0 < 60
    assert res.exit_code != 0 and "01_hangs" in res.output and "CellTimeoutError" in res.output
    assert "wait_for_a_reply_that_never_comes" in res.output                 # the kernel's stack, from faulthandler
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["status"] for r in summary["results"]] == ["failed", "skipped"]
    assert not list(run_dir.glob(".*.stacks"))
