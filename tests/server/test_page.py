"""The chat page at `/`, driven in headless Chromium (Debian's /usr/bin/chromium through Playwright) against
a real server running SmolLM2: it shows the model and template, streams a reply, stops it (which aborts the
request on the server), carries on the conversation, and clears it. Saves artifacts/serve-chat.png."""

import os
import time
from pathlib import Path

import pytest

from lowbit.api import load
from lowbit.engine.engine import EngineConfig
from tests.server.conftest import live_server, make_app

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must have /usr/bin/chromium (scripts/setup.sh installs it)")
        pytest.skip("needs Debian's chromium at /usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def smol_server(smollm2_dir):
    smol = load(str(smollm2_dir), device="cpu", dtype="float32")
    with live_server(make_app(smol, EngineConfig(max_batch=2, max_seq_len=1024), model_name="smollm2")) as live:
        yield live


def reply_text(page) -> str:
    return page.locator(".message.assistant").last.inner_text()


def wait_until(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_chat_page_streams_stops_continues_and_clears(browser, smol_server):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.goto(smol_server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('smollm2')")
    assert page.inner_text("#template-name") == "the model's own"  # SmolLM2's Jinja template
    page.fill("#system", "You are a storyteller.")
    page.fill("#max_tokens", "600")
    page.fill("#input", "Tell me a long story about a dragon who learns to bake bread.")
    page.click("#send")

    wait_until(lambda: len(reply_text(page)) > 40, what="the first words of the reply")
    first = len(reply_text(page))
    wait_until(lambda: len(reply_text(page)) > first + 20, what="the reply to keep streaming")
    assert page.is_enabled("#stop") and smol_server.runner.num_active == 1
    page.click("#stop")
    page.wait_for_selector(".message.assistant .stopped")
    stopped = reply_text(page)
    wait_until(lambda: smol_server.runner.num_active == 0, timeout=5, what="the server to abort the request")
    time.sleep(0.5)
    assert reply_text(page) == stopped and page.is_enabled("#send") and not page.is_enabled("#stop")
    assert len(stopped.split()) >= 8  # words streamed in before the stop (their content is the sampler's)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-chat.png"), full_page=True)

    page.fill("#max_tokens", "24")
    page.fill("#input", "Thank you!")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.message').length == 4 && "
                           "!document.querySelector('.message.streaming') && !document.getElementById('send').disabled",
                           timeout=60_000)
    assert len(reply_text(page)) > 0 and page.locator(".message.error").count() == 0
    assert "tokens" in page.inner_text("#status")  # the usage chunk arrived

    page.click("#clear")
    assert page.locator(".message").count() == 0 and page.evaluate("state.history.length") == 0
    wait_until(lambda: smol_server.runner.num_active == 0, timeout=5, what="an idle engine")
    page.close()
