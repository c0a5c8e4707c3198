"""The built docs site, served on localhost and loaded in headless Chromium (`make site-check`)."""
import functools
import os
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.site

SITE = Path(os.environ.get("SLM_SITE_DIR", "_docs"))
# tqdm's text ("decode latency:  40%|####  | 2/5 [00:01<00:02, 1.2it/s]") and the start of transformers' loading bars
PROGRESS_TEXT = re.compile(r"\d+%\|[^|\n]*\|\s*\d+/\d+|\d+(\.\d+)?(it|s)/s\]|Loading weights:")
SCREENSHOTS = ("01_market", "00_core")  # two chapter pages, saved in the site folder for review


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope="module")
def site_url():
    assert (SITE / "index.html").exists(), f"no built site at {SITE}: run `make docs` first"
    handler = functools.partial(QuietHandler, directory=str(SITE))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _open(browser, url):
    "Load `url`; return the page and the console errors, page errors and off-host requests it caused."
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: problems.append(f"off-host request: {r.url}")
            if not r.url.startswith(("http://127.0.0.1", "data:", "blob:", "about:")) else None)
    page.goto(url, wait_until="load")
    return page, problems


def _chapters():
    return sorted(p.stem for p in (SITE / "notebooks").glob("[0-9][0-9]_*.html"))


def test_index_renders(browser, site_url):
    page, problems = _open(browser, f"{site_url}/index.html")
    assert "slm-research" in page.title()
    text = page.inner_text("body")
    assert "Small Language Models" in text and "make demo" in text
    assert page.locator("a[href*='01_market']").count() >= 1  # the chapters are linked
    assert problems == []


def test_market_page_draws_its_figure(browser, site_url):
    page, problems = _open(browser, f"{site_url}/notebooks/01_market.html")
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
    assert page.locator(".js-plotly-plot").count() >= 1
    # a drawn plot has traces, not only an empty frame
    assert page.locator(".js-plotly-plot .scatterlayer .trace").count() >= 1
    # plotly.js comes once, from the site itself, and is not inlined in the page
    assert page.locator("script[src$='_static/plotly.min.js']").count() == 1
    assert (SITE / "notebooks" / "01_market.html").stat().st_size < 1_000_000
    assert problems == []


def test_math_renders_offline(browser, site_url):
    page, problems = _open(browser, f"{site_url}/notebooks/01_market.html")
    # MathJax replaces the TeX source by its own element; raw "$(200/5.2)^{1/10} - 1$" would stay text
    page.wait_for_selector("mjx-container", timeout=30_000)
    assert page.locator("mjx-container").count() >= 1
    assert "^{1/10}" not in page.inner_text("article")
    assert page.locator("script[src*='_static/mathjax/']").count() == 1
    assert problems == []


@pytest.mark.parametrize("chapter", _chapters() or ["01_market"])
def test_chapter_reads_as_prose(browser, site_url, chapter):
    """One load of each chapter page: code folded (closed, one fold per run of cells), nothing wider than the window, no
    source text, polars tables without their `shape:` line and dtype row (the runner's TABLE_KERNEL_ENV), no progress
    bars, no console errors."""
    page, problems = _open(browser, f"{site_url}/notebooks/{chapter}.html")
    shown_inputs = page.locator(".cell_input").evaluate_all("els => els.filter(e => e.checkVisibility()).length")
    assert shown_inputs == 0, f"{chapter}: {shown_inputs} code cells shown unfolded"
    # the code is there, folded in <details> closed by default; the page text a reader sees has no source
    assert page.locator("details.hide.above-input").evaluate_all("els => els.filter(e => e.open).length") == 0
    # consecutive code cells share one fold: no fold directly followed by another without an output between them
    stacked = page.evaluate("""() => [...document.querySelectorAll('article div.cell')].filter(c => {
        const next = c.nextElementSibling;
        return next && next.matches('div.cell') && !c.querySelector('.cell_output');
    }).length""")
    assert stacked == 0, f"{chapter}: {stacked} folds directly followed by another fold"
    # nothing wider than the window: wide tables scroll inside their output
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), f"{chapter} overflows"
    shown = page.inner_text("article")
    assert not re.search(r"^\s*(def|class) \w+\(?.*:$", shown, re.M), f"{chapter}: source text in view"
    # a polars dtype row is a second header row made of <td> cells ("i64", "str", ...)
    dtype_rows = page.locator(".cell_output table").evaluate_all("ts => ts.filter(t => t.querySelector('thead td')).length")
    outputs = page.locator(".cell_output").all_inner_texts()
    shapes = [o[:80] for o in outputs if re.search(r"^shape: \(\d", o, re.M)]
    assert (dtype_rows, shapes) == (0, []), f"{chapter}: {dtype_rows} tables with a dtype row, shape lines {shapes}"
    noisy = [o[:120] for o in outputs if PROGRESS_TEXT.search(o)]
    assert noisy == [], f"{chapter}: progress-bar text in cell outputs: {noisy}"
    assert problems == []


def test_api_page_documents_functions_not_directive_text(browser, site_url):
    page, problems = _open(browser, f"{site_url}/api/market.html")
    assert page.locator("[id='slm_research.market.cagr']").count() == 1
    assert ".. py:" not in page.inner_text("article") and problems == []


def test_exported_code_is_a_click_away(browser, site_url):
    page, _ = _open(browser, f"{site_url}/notebooks/01_market.html")
    assert "def cagr(" not in page.inner_text("article")
    page.locator("a[href*='api/market.html#slm_research.market.cagr']").first.wait_for()  # show_doc links to the API
    summaries = page.locator("details.hide.above-input summary")
    for i in range(summaries.count()): summaries.nth(i).click()
    assert "def cagr(" in page.inner_text("article")


def test_screenshots_of_two_chapters_for_review(browser, site_url):
    out = SITE / "_review"
    out.mkdir(exist_ok=True)
    for chapter in SCREENSHOTS:
        page, problems = _open(browser, f"{site_url}/notebooks/{chapter}.html")
        if page.locator(".js-plotly-plot").count(): page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(out / f"{chapter}.png"), full_page=True)
        assert (out / f"{chapter}.png").stat().st_size > 10_000 and problems == []


def test_executed_notebooks_have_no_noise():
    "The run the site was built from: no progress-bar leftovers and no repeated warnings in any output."
    import nbformat
    from slm_research.runner import output_noise
    run = Path(os.environ.get("SLM_AUDIT_RUN", "runs/latest-ci"))
    executed = sorted(run.glob("[0-9][0-9]_*.ipynb"))
    if not executed: pytest.skip(f"no executed notebooks in {run}")
    noise = {nb.stem: n for nb in executed if (n := output_noise(nbformat.read(nb, as_version=4)))}
    assert noise == {}
