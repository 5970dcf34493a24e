"""The README's screenshot of the search page: `threetowers serve runs/demo/index` in headless
Chromium, a typed query, alpha at 0.5. Run from the repository root after `make demo`:

    PYTHONPATH=. .venv/bin/python docs/search/screenshot.py [INDEX] [OUT.png]
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from tests.search.test_page import CHROMIUM, FLAGS, LOADED

QUERY = "a big red star in the upper left on sand"


def main() -> None:
    index = sys.argv[1] if len(sys.argv) > 1 else "runs/demo/index"
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/search/search_page.png")
    threetowers = Path(sys.executable).parent / "threetowers"
    server = subprocess.Popen([str(threetowers), "serve", index, "--port", "8765"])
    try:
        url = "http://127.0.0.1:8765"
        for _ in range(300):
            try:
                if httpx.get(url + "/api/info").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(url)
            page.fill("#query", QUERY)
            page.press("#query", "Enter")
            page.wait_for_function(LOADED, arg=24)
            page.eval_on_selector(
                "#alpha",
                "el => { el.value = '0.5'; el.dispatchEvent(new Event('input')); }",
            )
            page.wait_for_function(
                "() => document.getElementById('status').textContent.includes('α = 0.50')"
            )
            page.wait_for_function(LOADED, arg=24)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        server.terminate()
        server.wait()
    print(f"-> {out}")


if __name__ == "__main__":
    main()
