"""The built docs site, served on localhost and loaded in headless Chromium (`make site-check`)."""
import functools
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.site

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope="module")
def site_url():
    site = Path(os.environ.get("SLM_SITE_DIR", "_docs"))
    assert (site / "index.html").exists(), f"no built site at {site}: run `make docs` first"
    handler = functools.partial(QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        # launch() gives every run a fresh, temporary user-data-dir
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def _open(browser, url):
    "Load `url`; return the page and the console errors, page errors and off-host requests it caused."
    page = browser.new_page()
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: problems.append(f"off-host request: {r.url}")
            if not r.url.startswith(("http://127.0.0.1", "data:", "blob:", "about:")) else None)
    page.goto(url, wait_until="load")
    return page, problems


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
    assert problems == []
