"""The search page in a real headless Chromium (the system's: nothing downloads a browser):
it loads, a typed query shows result images, the alpha slider re-ranks them as the engine
does, and an uploaded image finds itself."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root and on a closed network: no sandbox, and none of Chromium's own connections.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOADED = """n => {
  const cards = [...document.querySelectorAll('#results .card')];
  return cards.length === n && cards.slice(0, 6).every(
    c => c.querySelector('img').complete && c.querySelector('img').naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def page(live):
    if CHROMIUM is None:
        pytest.skip("no system Chromium (Debian: apt-get install chromium); nothing downloads one")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(live.url + "/")
        yield page
        browser.close()
        assert errors == []


def wait_for_text(page, element: str, text: str) -> None:
    script = "([id, text]) => document.getElementById(id).textContent.includes(text)"
    page.wait_for_function(script, arg=[element, text])


def result_ids(page) -> list[str]:
    return page.eval_on_selector_all("#results .card", "cards => cards.map(c => c.dataset.id)")


def engine_ids(live, text: str, alpha: float, k: int = 24) -> list[str]:
    query = live.encoder.text(text)
    return [hit.id for hit in live.index.search(query, live.encoder.weights(alpha), k)]


def test_typed_query_shows_result_images_and_the_slider_reranks(page, live, tmp_path):
    page.wait_for_function(
        "() => document.getElementById('about').textContent.includes('40 images')"
    )
    assert page.is_visible("#alpha-control")  # a 3T index: the slider is there
    text = "a small blue circle"
    page.fill("#query", text)
    page.press("#query", "Enter")
    page.wait_for_function(LOADED, arg=24)
    before = result_ids(page)
    assert before == engine_ids(live, text, 1.0)
    page.focus("#alpha")
    page.keyboard.press("Home")  # the slider to 0: the frozen tower's pair alone
    page.wait_for_function(
        "() => document.getElementById('status').textContent.includes('α = 0.00')"
    )
    page.wait_for_function(LOADED, arg=24)
    after = result_ids(page)
    assert after == engine_ids(live, text, 0.0)
    assert after != before
    captions = page.eval_on_selector_all("#results .caption", "c => c.map(x => x.textContent)")
    assert all(captions)
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_an_uploaded_image_finds_itself(page, indexed):
    page.set_input_files("#upload", str(indexed.retrieval.parent / "images" / "r000011.png"))
    page.wait_for_function("() => !document.getElementById('query-image').hidden")
    page.wait_for_function(
        "() => document.querySelector('#results .card')?.dataset.id === 'images/r000011.png'"
    )
    page.wait_for_function(LOADED, arg=24)
