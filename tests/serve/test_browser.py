"""A real headless Chromium (Debian's, driven by Playwright) uses the page
against the live waitress server, and takes the README screenshot."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from dpolab.serve.chat import ASSISTANT

from .conftest import Gate

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "web-app.png"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} missing: apt-get install chromium (.ci/run installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)  # in CI a missing browser is a broken setup, not a reason to skip
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def open_page(browser, url: str, **context):
    page = browser.new_context(**context).new_page()
    # Nothing here waits on a clock (the Stop test holds its answer open); this is only how long a
    # CPU shared with other work may take to answer before a wait counts as a failure.
    page.set_default_timeout(120_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    return page, errors


def test_chat_stream_stop_compare_and_prefer(browser, live_server, make_app, tmp_path):
    app = make_app(MAX_NEW_TOKENS=512, DEFAULT_MAX_NEW_TOKENS=12, MAX_QUEUE=4)
    # The first answer is held open after its first tokens until the Stop click's cancel arrives:
    # a fast model can no longer finish before the click lands.
    gate = Gate(app)
    url = live_server(app=app)
    app_prefs = Path(tmp_path / "preferences.jsonl")  # make_app's PREFERENCES_PATH
    page, errors = open_page(browser, url, viewport={"width": 1280, "height": 860})
    page.fill("#max_new_tokens", "512")

    # Send with Enter; text streams into the answer while it is still generating, then Stop.
    page.fill("#prompt", "Can you tell me a long story?")
    page.press("#prompt", "Enter")
    page.wait_for_function(
        "() => { const a = document.querySelector('.answer.streaming .answer-text');"
        "        return a && a.textContent.trim().length > 0; }")
    assert page.is_enabled("#stop") and page.is_disabled("#send")
    page.click("#stop")
    stopped = page.locator(".answer[data-finish]").first
    stopped.wait_for()
    assert stopped.get_attribute("data-finish") == "cancelled"  # the server's finish reason
    assert stopped.locator(".answer-text").text_content() == gate.text.strip()
    assert page.locator(".finish").first.text_content() == "stopped"
    page.wait_for_selector("#stop:disabled")
    assert page.is_enabled("#send")
    gate.open()  # from here on the real model answers

    # Compare mode: two answers, each with its implicit reward; mark one better.
    page.fill("#max_new_tokens", "12")
    page.check("#compare")
    page.fill("#prompt", "What is a good way to learn to cook?")
    page.click("#send")
    turn = page.locator(".turn").nth(1)
    turn.locator(".answer[data-finish]").nth(1).wait_for()
    page.wait_for_function("() => document.querySelectorAll('.turn:nth-child(2) .prefer:not([hidden])').length == 2")
    cards = turn.locator(".answer")
    assert cards.count() == 2
    assert [cards.nth(i).get_attribute("data-role") for i in range(2)] == ["policy", "reference"]
    for i in range(2):
        assert re.fullmatch(r"reward [+-]\d+\.\d{3}", cards.nth(i).locator(".reward").text_content())
    reference_text = cards.nth(1).locator(".answer-text").text_content()
    cards.nth(1).locator(".prefer").click()
    page.wait_for_selector("#status[data-kind=ok]")
    assert "Saved to preferences.jsonl (1 pair)" in page.text_content("#status")

    rows = [json.loads(line) for line in app_prefs.read_text().splitlines()]
    assert len(rows) == 1 and set(rows[0]) == {"chosen", "rejected"}
    prompt_c, answer_c = rows[0]["chosen"].rsplit(ASSISTANT, 1)
    prompt_r, _ = rows[0]["rejected"].rsplit(ASSISTANT, 1)
    assert prompt_c == prompt_r and prompt_c.startswith("\n\nHuman: Can you tell me a long story?")
    assert prompt_c.endswith("\n\nHuman: What is a good way to learn to cook?")
    assert answer_c == " " + reference_text.strip()
    from dpolab.data import to_pair

    assert to_pair(rows[0])[1] is None  # a valid training pair for the next `dpolab train --dataset`

    page.locator(".turn").first.scroll_into_view_if_needed()
    shot = SCREENSHOT if os.environ.get("DPOLAB_SCREENSHOT") == "1" else tmp_path / "web-app.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert errors == []
    page.context.close()


def test_model_output_is_text_not_html(browser, live_server, make_app):
    """XSS: the random tiny model will not write HTML on demand, so this test swaps the engine's
    generate step (its one seam) for one that feeds a hostile answer's real token ids through the
    real streaming path (AnswerSink, SSE, page). The page must show it as literal text and run nothing."""
    hostile = ' <script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'

    def fake_generate(loaded, prompt_ids, params, sink, stop):
        for token in loaded.tokenizer(hostile).input_ids:
            sink.put_ids([token])

    app = make_app()
    app.extensions["dpolab.engine"].generate = fake_generate
    url = live_server(app=app)

    page, errors = open_page(browser, url, viewport={"width": 390, "height": 844})  # phone width
    page.fill("#prompt", "Say something nasty")
    page.press("#prompt", "Enter")
    answer = page.locator(".answer[data-finish] .answer-text")
    answer.wait_for()
    # A card shows its finish as soon as its answer is complete, but its buttons are wired only
    # when the whole turn's result (rewards) has arrived: wait for that, not for the card.
    page.wait_for_selector("#send:enabled")
    assert answer.text_content() == hostile.strip()
    assert page.locator(".answer-text script, .answer-text img").count() == 0
    assert page.evaluate("window.__xss") is None
    # Copy puts the answer text on the clipboard; Regenerate replaces the last turn's answer;
    # Clear chat empties the conversation.
    # Headless Chromium's system clipboard sometimes never settles its promise; record what the
    # page hands to the Clipboard API instead (the browser's own clipboard is not under test).
    page.evaluate("navigator.clipboard.writeText = async (text) => { window.__copied = text; }")
    # "Copied" shows for 1.5 s only: record every label the button takes instead of racing to see it.
    page.evaluate("""() => { const button = document.querySelector('.answer .copy'); window.__labels = [];
        new MutationObserver(() => window.__labels.push(button.textContent))
            .observe(button, {childList: true, characterData: true, subtree: true}); }""")
    page.click(".answer .copy")
    page.wait_for_function("() => window.__labels.includes('Copied')")
    assert page.evaluate("window.__copied") == hostile.strip()
    page.click(".answer .regen")
    page.wait_for_selector(".answer[data-finish]")
    page.wait_for_selector("#send:enabled")
    assert page.locator(".turn").count() == 1
    page.click("#clear")
    assert page.locator(".turn").count() == 0 and page.is_visible("#empty")
    # Readable at phone width: nothing overflows sideways.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    # The theme toggle switches light <-> dark.
    before = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.click("#theme-toggle")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") != before
    assert errors == []
    page.context.close()


def test_unknown_beta_is_said_on_the_page(browser, live_server, make_app, run_dir, tmp_path):
    """A model folder that records nothing about its training (no run, no card)
    gets rewards scaled by the default beta, and the page says so next to them."""
    import shutil

    from dpolab.serve.models import load_served_models

    bare = tmp_path / "bare-model"
    shutil.copytree(run_dir / "model", bare)
    url = live_server(app=make_app(MODELS=load_served_models(str(bare), reference="tiny-gpt2")))
    page, errors = open_page(browser, url)
    panel = page.text_content("#model-info")
    assert "betaunknown" in panel and "beta unknown: this model's records do not say" in panel
    page.check("#compare")
    page.fill("#max_new_tokens", "3")
    page.fill("#prompt", "Hello?")
    page.click("#send")
    page.wait_for_selector("#send:enabled")
    rewards = page.locator(".answer .reward")
    assert rewards.count() == 2
    for i in range(2):
        assert re.fullmatch(r"reward [+-]\d+\.\d{3} \(beta unknown\)", rewards.nth(i).text_content())
    assert errors == []
    page.context.close()
