"""The analyst's JupyterLab (`make lab-check`): a real `jupyter lab` server on localhost, notebooks 01 and 13 opened,
run ("Run All Cells") and saved through the Lab UI in headless Chromium.

The notebooks run in a temporary copy of the workspace (settings.ini, nbs/ with copies of the two notebooks, a run
profile of its own), so nothing is written to nbs/ or data/processed/. S4 reads the clusters that S3 leaves in the
workspace, as under nbdev-test (which runs notebooks 11 and 12 before 13): the fixture runs S2 and S3 with those
notebooks' defaults (the embedded corpus, 300 calls, seed 0) before Lab opens 13. Screenshots go to `_build/lab/`
(or `$SLM_LAB_SHOTS`) for review. `make test` runs this after its papermill ci run and points `$SLM_LAB_S3_FROM` at that
run's processed folder: the fixture then copies S2's and S3's hand-offs from there instead of making them again."""
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("01_market", "13_select")
NEEDS_S3 = ("13_select",)     # S4 ranks models for the clusters S3 left in the workspace
SHOTS = Path(os.environ.get("SLM_LAB_SHOTS") or ROOT/"_build"/"lab")
RUN_TIMEOUT_MS = 300_000      # Run All Cells of one notebook, kernel start included
MAX_SAVED_BYTES = 1_000_000   # a saved notebook with all of plotly.js inline is about 4.8 MB bigger
S3_TIMEOUT_S = 600
# S3's clusters for S4, made like notebooks 11 and 12 make them under nbdev-test (their parameter defaults)
S3_SCRIPT = """
import json
from slm_research import capture
from slm_research.clean import CleanConfig, clean_to_files
from slm_research.cluster import ClusterConfig, fit_clusters, write_outputs
from slm_research.core import paths
from slm_research.workspace import Workspace
from slm_research.corpus import generate_corpus
import polars as pl
folder = generate_corpus(300, 0, progress=False)
frame = capture.to_frame(json.loads(l) for l in (folder/"calls.jsonl").read_text().splitlines())
clean_to_files(Workspace(paths().processed), CleanConfig(), frame, progress=False)
calls = pl.read_parquet(paths().processed/"calls_clean.parquet")
write_outputs(calls, fit_clusters(calls, ClusterConfig(seed=0)), paths().processed)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(path: Path) -> str: return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory):
    "A temporary workspace with the two notebooks and S3's clusters, and the environment Lab and its kernels run in."
    ws = tmp_path_factory.mktemp("lab-workspace")
    (ws/"nbs").mkdir()
    shutil.copy(ROOT/"settings.ini", ws/"settings.ini")
    for nb in NOTEBOOKS: shutil.copy(ROOT/"nbs"/f"{nb}.ipynb", ws/"nbs"/f"{nb}.ipynb")
    jup = ws/".jupyter"  # Jupyter's config, data, runtime and Lab settings of this run only
    # the kernels import slm_research from this checkout (the venv's editable install may point at another one)
    pythonpath = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(pythonpath)),
           "SLM_ROOT": str(ws), "SLM_PROFILE": "lab", "SLM_RUN_DIR": "runs/lab",
           "JUPYTER_CONFIG_DIR": str(jup/"config"), "JUPYTER_DATA_DIR": str(jup/"data"),
           "JUPYTER_RUNTIME_DIR": str(jup/"runtime"), "JUPYTERLAB_SETTINGS_DIR": str(jup/"lab-settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(jup/"lab-workspaces"), "IPYTHONDIR": str(jup/"ipython"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYDEVD_DISABLE_FILE_VALIDATION": "1", "SLM_PROGRESS": "off"}
    env.pop("SLM_NOTEBOOK", None)
    # Lab stays offline: no news feed, no update check (both would request another host)
    notif = jup/"lab-settings"/"@jupyterlab"/"apputils-extension"/"notification.jupyterlab-settings"
    notif.parent.mkdir(parents=True)
    notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    before = {nb: _digest(ROOT/"nbs"/f"{nb}.ipynb") for nb in NOTEBOOKS}
    # S2 + S3 run beside Lab (01 does not need them); `opened` waits for them before it opens a notebook in NEEDS_S3.
    # With $SLM_LAB_S3_FROM (a processed folder that a run filled), their hand-off files are copied from there instead.
    s3_log = (ws/"s3.log").open("w")
    script = S3_SCRIPT
    if src := os.environ.get("SLM_LAB_S3_FROM"):
        script = (f"import shutil\nfrom slm_research.core import paths\nfrom slm_research.workspace import Workspace\n"
                  f"src, dst = Workspace({str(Path(src).resolve())!r}), Workspace(paths().processed)\n"
                  f"for f in ('calls', 'clusters', 'clusters_summary'): shutil.copy(src.require(f), dst.path(f))\n")
    s3 = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ws, stdout=s3_log, stderr=subprocess.STDOUT)
    yield SimpleNamespace(ws=ws, env=env, s3=s3, s3_log=ws/"s3.log", sources=before)
    if s3.poll() is None:
        s3.terminate()
        s3.wait(timeout=30)
    s3_log.close()


@pytest.fixture(scope="module")
def lab(lab_env):
    "A `jupyter lab` server on a free localhost port with a random token, serving the workspace's nbs/."
    ws, env = lab_env.ws, lab_env.env
    port, token = _free_port(), secrets.token_hex(24)
    log = (ws/"jupyter-lab.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                             "--port-retries=0", f"--IdentityProvider.token={token}",
                             f"--ServerApp.root_dir={ws/'nbs'}", "--LabApp.news_url=None",
                             *(["--allow-root"] if os.geteuid() == 0 else [])],
                            env=env, cwd=ws/"nbs", stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2): break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"jupyter lab did not start:\n{(ws/'jupyter-lab.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield dict(url=url, token=token, root=ws/"nbs", log=ws/"jupyter-lab.log")
    try:  # shuts the kernels down too
        urllib.request.urlopen(urllib.request.Request(f"{url}/api/shutdown?token={token}", method="POST"), timeout=10)
        proc.wait(timeout=30)
    except Exception:
        proc.terminate()
        try: proc.wait(timeout=15)
        except subprocess.TimeoutExpired: proc.kill()
    log.close()


# --- driving Lab -------------------------------------------------------------------------------------------------

# Run All is over when the kernel is idle and no cell waits or runs ("[*]"), and either every code cell has an
# execution count or one failed (Lab then drops the cells queued after it).
KERNEL_IDLE_JS = """() => [...document.querySelectorAll('#jp-main-statusbar .jp-StatusBar-Item')]
  .some(i => /\\| Idle$/.test(i.textContent.trim()))"""
DONE_JS = """() => {
  const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  if (!nb) return false;
  const status = nb.querySelector('.jp-Notebook-ExecutionIndicator');
  if (!status || status.getAttribute('data-status') !== 'idle') return false;
  if (!(KERNEL_IDLE_JS)()) return false;
  const prompts = [...nb.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent.trim());
  if (prompts.some(p => p.includes('*'))) return false;
  const failed = nb.querySelector('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]');
  return prompts.every(p => /\\[\\d+\\]/.test(p)) || (failed && /Traceback|Error/.test(failed.textContent));
}""".replace("KERNEL_IDLE_JS", KERNEL_IDLE_JS)


STARTED_JS = """() => [...document.querySelectorAll(
    '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt')]
  .some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))"""


def _menu(page, top: str, item: str):
    "Click `item` of the menu-bar menu `top`, as an analyst does."
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{top}$")).click()
    page.locator(".lm-Menu-item:not(.lm-mod-disabled) .lm-Menu-itemLabel", has_text=re.compile(f"^{item}$")).click()


class Opened:
    "One notebook opened in Lab, run and (later) saved."
    def __init__(self, name, page, panel, problems, seconds, path):
        self.name, self.page, self.panel, self.problems = name, page, panel, problems
        self.seconds, self.path = seconds, path
        self.saved = None

    def save(self) -> dict:
        "Save through the File menu; returns the notebook file as Lab wrote it."
        if self.saved is None:
            mtime = self.path.stat().st_mtime_ns
            self.panel.click(position={"x": 5, "y": 5})  # focus the notebook, not an output
            _menu(self.page, "File", "Save Notebook")
            # the tab's dirty mark goes once the contents API has written the file
            self.page.wait_for_function("() => !document.querySelector('.lm-TabBar-tab.jp-mod-current.jp-mod-dirty')",
                                        timeout=30_000)
            deadline = time.time() + 30
            while self.path.stat().st_mtime_ns == mtime and time.time() < deadline: time.sleep(0.2)
            assert self.path.stat().st_mtime_ns != mtime, f"{self.name}: Lab did not write the notebook"
            while True:  # the server may still be writing the file it has just truncated
                try: self.saved = json.loads(self.path.read_text()); break
                except json.JSONDecodeError:
                    if time.time() > deadline + 30: raise
                    time.sleep(0.2)
        return self.saved

    def cell_with(self, selector: str):
        "The code cell whose output holds `selector`, scrolled into view."
        cell = self.panel.locator(".jp-CodeCell", has=self.page.locator(selector)).first
        cell.scroll_into_view_if_needed()
        cell.locator(selector).first.scroll_into_view_if_needed()
        return cell


@pytest.fixture(scope="module")
def opened(lab, lab_env, browser):
    "`opened(name)`: the notebook `name` opened in its own Lab tab and run with Run > Run All Cells (once per module)."
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    cache = {}

    def get(name: str) -> Opened:
        if name not in cache:
            try: cache[name] = run(name)
            except Exception as e: cache[name] = e  # one attempt per notebook: later tests report the same failure
        if isinstance(cache[name], Exception): raise cache[name]
        return cache[name]

    def run(name: str) -> Opened:
        if name in NEEDS_S3:
            try: rc = lab_env.s3.wait(timeout=S3_TIMEOUT_S)
            except subprocess.TimeoutExpired: rc = "timeout"
            assert rc == 0 and (lab_env.ws/"data"/"processed"/"lab"/"clusters.json").exists(), \
                f"S2/S3 for {name} failed ({rc}):\n{lab_env.s3_log.read_text()[-3000:]}"
        page = context.new_page()
        problems = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("request", lambda r: problems.append(f"off-host request: {r.url}")
                if not r.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:", "about:")) else None)
        # a Lab workspace per notebook: two windows on one workspace make Lab move the second one elsewhere
        page.goto(f"{lab['url']}/lab/workspaces/check-{name}/tree/{name}.ipynb?reset&token={lab['token']}",
                  wait_until="load")
        panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
        # the status bar says "Python 3 (ipykernel) | Idle" once the kernel is connected (the toolbar's execution
        # indicator says idle from the start, and cells run while the kernel initializes are dropped)
        page.wait_for_function(KERNEL_IDLE_JS, timeout=120_000, polling=250)
        panel.locator(".jp-Cell").first.click()
        t0 = time.perf_counter()
        _menu(page, "Run", "Run All Cells")
        try:
            page.wait_for_function(STARTED_JS, timeout=60_000, polling=250)
            page.wait_for_function(DONE_JS, timeout=RUN_TIMEOUT_MS, polling=500)
        except Exception as e:
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS/f"{name}-stuck.png"))
            state = panel.evaluate("""nb => ({url: location.href,
                status: nb.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status'),
                prompts: [...nb.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent),
                dialogs: [...document.querySelectorAll('.jp-Dialog')].map(d => d.textContent.slice(0, 200))})""")
            raise AssertionError(f"{name}: Run All Cells did not finish ({type(e).__name__}); Lab showed {state}; "
                                 f"screenshot {SHOTS/f'{name}-stuck.png'}") from None
        page.wait_for_timeout(1500)  # the last outputs' renderers (plotly, widgets) settle
        nb = Opened(name, page, panel, problems, round(time.perf_counter() - t0, 1), lab["root"]/f"{name}.ipynb")
        print(f"{name}: Run All Cells took {nb.seconds} s")
        return nb

    yield get
    context.close()


def _tables(page, scope) -> list[dict]:
    "Every polars table under `scope`: its shape as printed, its body rows and the cells cut with an ellipsis (…)."
    return scope.evaluate("""root => [...root.querySelectorAll('table.dataframe')].map(t => {
        const shape = t.parentElement.querySelector('small');
        const rows = [...t.tBodies[0].rows].map(r => [...r.cells].map(c => c.textContent));
        return {shape: shape ? shape.textContent : '', rows: rows.length, first: rows.map(r => r[0]),
                // a string cut short, a list cut to its first items, skipped rows
                cut: rows.flat().filter(c => c.includes('…')).slice(0, 3)};
      })""")


def _ranking(table) -> list[tuple]:
    "(model, passed, score) of each row of a ranking table."
    return [tuple(c.strip() for c in r[:3]) for r in table.evaluate(
        "t => [...t.tBodies[0].rows].map(r => [...r.cells].map(c => c.textContent))")]


# --- the checks ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_run_all_cells_without_errors(opened, name):
    nb = opened(name)
    # textContent: off-screen cells are skipped by the browser's rendering (content-visibility), not by the DOM
    prompts = nb.panel.locator(".jp-CodeCell .jp-InputArea-prompt").evaluate_all("ps => ps.map(p => p.textContent)")
    assert prompts and all(re.fullmatch(r"\[\d+\]:", p.strip()) for p in prompts), f"{name}: cells not run: {prompts}"
    stderr = nb.panel.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    errors = [t[:600] for t in stderr.evaluate_all("os => os.map(o => o.textContent)")
        if re.search(r"Traceback|^\w+(Error|Exception)\b", t, re.M)]
    assert errors == [], f"{name}: error outputs: {errors}"
    assert nb.problems == []


def test_plotly_figures_render(opened):
    nb = opened("01_market")
    plots = nb.panel.locator(".js-plotly-plot")
    assert plots.count() == 2  # the trajectory and the infrastructure bars
    for i in range(plots.count()):
        plots.nth(i).scroll_into_view_if_needed()
        assert plots.nth(i).locator("svg.main-svg").count() >= 1
        assert plots.nth(i).locator(".scatterlayer .trace, .barlayer .trace").count() >= 1  # drawn, not an empty frame


def test_point_labels_stay_inside_the_chart(opened):
    "The quoted points' labels (the 2024 one is next to the left edge) are drawn inside the figure."
    nb = opened("01_market")
    plot = nb.panel.locator(".js-plotly-plot").first
    plot.scroll_into_view_if_needed()
    boxes = plot.evaluate("""p => { const svg = p.querySelector('svg.main-svg').getBoundingClientRect();
        return [...p.querySelectorAll('.scatterlayer .textpoint text')].map(t => { const b = t.getBoundingClientRect();
          return {text: t.textContent, left: b.left - svg.left, right: svg.right - b.right, top: b.top - svg.top};
        }); }""")
    assert len(boxes) == 2 and any("5.2" in b["text"] for b in boxes), boxes
    clipped = [b for b in boxes if min(b["left"], b["right"], b["top"]) < 0]
    assert clipped == [], f"labels cut at the figure's edge: {clipped}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_tables_show_every_row_and_whole_strings(opened, name):
    nb = opened(name)
    tables = _tables(nb.page, nb.panel)
    assert tables, f"{name}: no polars tables"
    short = []
    for t in tables:
        n = int(re.search(r"shape: \((\d+),", t["shape"]).group(1))
        if t["rows"] != n or t["cut"]: short.append(t)
    assert short == [], f"{name}: tables cut short (rows shown vs shape, strings cut with …): {short}"
    if name == "13_select":  # the catalog: all 25 models
        assert any(t["shape"].startswith("shape: (25,") and t["rows"] == 25 for t in tables)
    if name == "01_market":  # the yearly path 2024..2034
        assert any(t["first"][:1] == ["2024"] and t["first"][-1:] == ["2034"] and t["rows"] == 11 for t in tables)


def test_explorer_bits_toggle_on_one_row(opened):
    nb = opened("13_select")
    cell = nb.cell_with(".widget-toggle-buttons")
    tops = cell.locator(".widget-toggle-buttons .widget-toggle-button").evaluate_all(
        "bs => bs.map(b => Math.round(b.getBoundingClientRect().top))")
    assert len(tops) == 3 and len(set(tops)) == 1, f"the bits buttons wrap: tops {tops}"


def test_explorer_dropdown_fits_the_longest_cluster_name(opened):
    nb = opened("13_select")
    select = nb.cell_with(".widget-dropdown select").locator(".widget-dropdown select").first
    fit = select.evaluate("""s => {
        const cs = getComputedStyle(s), ctx = document.createElement('canvas').getContext('2d');
        ctx.font = `${cs.fontStyle} ${cs.fontWeight} ${cs.fontSize} ${cs.fontFamily}`;
        const texts = [...s.options].map(o => o.text);
        return {n: texts.length, longest: texts.reduce((a, b) => b.length > a.length ? b : a, ''),
                need: Math.max(...texts.map(t => ctx.measureText(t).width)),
                have: s.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight)}; }""")
    assert fit["n"] >= 2, fit  # S3's clusters from the workspace, not the two-cluster example
    assert fit["need"] <= fit["have"], f"the dropdown cuts the longest cluster name: {fit}"


def test_explorer_applies_the_cells_constraints(opened):
    "With its controls at the parameters' values, the explorer ranks as the static table below it (latency budget too)."
    nb = opened("13_select")
    cell = nb.cell_with(".widget-toggle-buttons")
    param = re.search(r"^latency_budget_ms = ([\d.]+)", "".join(next(
        c["source"] for c in json.loads(nb.path.read_text())["cells"]
        if "parameters" in c["metadata"].get("tags", []))), re.M)
    readout = cell.locator(".widget-slider", has_text="budget ms").locator(".widget-readout").inner_text()
    assert float(readout) == float(param.group(1))  # the explorer starts at the cell's budget
    live = _ranking(cell.locator("table.dataframe").first)
    static = nb.panel.locator(".jp-CodeCell", has_text="The static version").locator("table.dataframe")
    assert live and live == _ranking(static.first)


def test_explorer_reranks_when_a_control_moves(opened):
    nb = opened("13_select")
    cell = nb.cell_with(".widget-toggle-buttons")
    table = cell.locator(".jupyter-widgets-output-area table.dataframe, .widget-output table.dataframe").first

    def moved(action) -> list[tuple]:
        before = table.inner_text()
        action()
        output = cell.locator(".jupyter-widgets-output-area, .widget-output").first.element_handle()
        nb.page.wait_for_function("([el, old]) => el.isConnected && el.innerText !== old", arg=[output, before],
                                  timeout=30_000)
        nb.page.wait_for_timeout(300)
        return _ranking(cell.locator("table.dataframe").first)

    start = _ranking(table)
    at_16 = moved(lambda: cell.locator(".widget-toggle-button", has_text=re.compile(r"^\s*16\s*$")).click())
    passed = lambda r: [m for m, p, _ in r if p == "true"]
    assert at_16 != start and len(passed(at_16)) < len(passed(start)), "16-bit weights should drop models"
    back = moved(lambda: cell.locator(".widget-toggle-button", has_text=re.compile(r"^\s*4\s*$")).click())
    assert back == start
    budget = cell.locator(".widget-slider", has_text="budget ms")
    handle = budget.locator(".noUi-handle").first
    handle.focus()
    tight = moved(lambda: handle.press("Home"))  # the smallest budget, 100 ms a call: slow models drop out
    assert budget.locator(".widget-readout").inner_text().strip() in ("100", "100.00")
    assert len(passed(tight)) < len(passed(start)), "a tighter latency budget should drop models"
    loose = moved(lambda: handle.press("End"))  # 20,000 ms: nothing fails on latency
    assert len(passed(loose)) >= len(passed(start))
    assert "> budget" not in cell.locator("table.dataframe").first.text_content()  # no model fails on latency


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_notebook_is_small(opened, name):
    nb = opened(name)
    saved = nb.save()
    size = nb.path.stat().st_size
    assert size < MAX_SAVED_BYTES, f"{name}: saved notebook is {size:,} bytes"
    text = nb.path.read_text()
    assert "window.PlotlyConfig" not in text and "plotly.js v" not in text, f"{name}: plotly.js inline"
    outputs = [o for c in saved["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert [o for o in outputs if o["output_type"] == "error"] == []
    if name == "01_market":  # figures are kept as plotly JSON; Lab draws them with its extension
        assert sum("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs) == 2


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_screenshots_for_review(opened, name):
    "The view an analyst looks at: the trajectory chart of 01, the explorer of 13 (in _build/lab/ by default)."
    nb = opened(name)
    SHOTS.mkdir(parents=True, exist_ok=True)
    nb.cell_with(".js-plotly-plot" if name == "01_market" else ".widget-toggle-buttons")
    nb.page.wait_for_timeout(500)
    shot = SHOTS/f"{name}.png"
    nb.page.screenshot(path=str(shot))
    assert shot.stat().st_size > 20_000


def test_sources_in_nbs_untouched(lab_env):
    "Lab ran and saved the copies: the notebooks in nbs/ are as they were."
    assert {nb: _digest(ROOT/"nbs"/f"{nb}.ipynb") for nb in NOTEBOOKS} == lab_env.sources
