"""GET / on the server: a status and chat page behind the API key, with no external assets,
loaded and used in a real headless Chromium."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import httpx
import pytest
from support.bundles import serve_bundle
from support.programs import require_program

from edgepack.manifest import load_manifest

pytestmark = pytest.mark.slow
KEY = "page-key-123"
QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def keyed_server(chat_bundle):
    server = serve_bundle(chat_bundle, "--api-key", KEY)
    yield server
    server.stop()


def _basic(password: str, user: str = "me") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_page_is_behind_the_key_and_asks_a_browser_for_it(keyed_server):
    url = keyed_server.base_url
    r = httpx.get(url + "/")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Basic realm=")
    assert r.json()["error"]["code"] == "invalid_api_key"  # OpenAI's shape, like /v1
    assert httpx.get(url + "/", headers={"Authorization": _basic("wrong")}).status_code == 401
    assert httpx.get(url + "/", headers={"Authorization": "Basic !!"}).status_code == 401
    # /v1 never asks a browser: API clients get a plain 401.
    assert "www-authenticate" not in httpx.get(url + "/v1/models").headers
    for auth in (f"Bearer {KEY}", _basic(KEY)):
        ok = httpx.get(url + "/", headers={"Authorization": auth})
        assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/html")
    assert httpx.get(url + "/v1/models",
                     headers={"Authorization": _basic(KEY)}).status_code == 200


def test_page_shows_the_bundle_and_loads_nothing_from_outside(keyed_server, chat_bundle):
    page = httpx.get(keyed_server.base_url + "/",
                     headers={"Authorization": f"Bearer {KEY}"}).text
    m = load_manifest(chat_bundle)
    assert m["model"]["name"] in page and m["bundle"]["name"] in page
    assert m["model"]["quant"] in page
    # No external assets: no src/href at all, and no URL to another host.
    assert not re.search(r"""\b(src|href)\s*=""", page)
    assert not re.search(r"https?://(?!127\.0\.0\.1)", page)


def test_chromium_loads_the_page_sends_a_message_and_the_answer_appears(
        keyed_server, tmp_path):
    from support.browser import Chromium

    exe = require_program("chromium")
    browser = Chromium(exe, tmp_path / "profile", credentials=("me", KEY))
    try:
        browser.open(keyed_server.base_url + "/")
        assert browser.auth_challenges >= 1  # the browser was asked for the key
        browser.wait_for("document.getElementById('state').textContent === 'ready'")
        browser.evaluate("document.getElementById('prompt').focus()")
        browser.type_text(QUESTION)
        answer = browser.wait_for(
            "(() => { const a = document.querySelector('.assistant');"
            " return a && a.dataset.done === '1' ? a.textContent : ''; })()")
        # The server samples with its default temperature: any real answer will do, and an
        # error would have set the 'error' class instead of data-done.
        assert answer.strip()
        assert browser.evaluate("document.querySelector('.user').textContent") == QUESTION
        # Live metrics were read from /metrics and show the tokens just generated.
        browser.wait_for("parseFloat((document.querySelector("
                         "'[data-metric=\"tokens generated\"]') || {}).textContent) > 0")
        shot = browser.screenshot(tmp_path / "status-page.png")
    finally:
        browser.close()
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    keep = Path("/tmp") / "edgepack-status-page.png"
    shutil.copyfile(shot, keep)  # outside pytest's rotation, to look at after the run
    # Every request the page made went to this server.
    assert browser.requests and all(u.startswith(keyed_server.base_url)
                                    for u in browser.requests), browser.requests
