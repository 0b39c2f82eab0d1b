"""The page driven in real headless Chromium (Debian's `chromium`, through Playwright): start a tiny run from the
form and watch its loss curve and its row in the comparison table, stop a second run while measuring the API's
latency, an inline error for a bad rank and for each bad input, base against adapter in the try view, and a narrow
window. With LORAKIT_UI_SCREENSHOTS=DIR each view's screenshot (ui-*.png) and the latency figures (ui-latency.json)
are written to DIR (docs/figures for docs/ui.md); otherwise to a temporary directory."""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest
import yaml
from ui_helpers import UPLOAD_CAP, make_lm_adapter, make_workdir, page_settings, tiny_recipe

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="the browser tests need Chromium: apt-get install chromium "
                                "(Debian's package; Playwright is pointed at it, nothing is downloaded)")
pytest.importorskip("playwright.sync_api")
pytest.importorskip("uvicorn")

LATENCY_LIMIT_MS = 200.0
SHOTS = os.environ.get("LORAKIT_UI_SCREENSHOTS")
SHOTS_DIR = Path(SHOTS).resolve() if SHOTS else None  # before the server changes the working directory


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    path = SHOTS_DIR or tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_classifier_dir):
    """`lorakit ui`'s app on a free port of 127.0.0.1, serving a working directory with the tiny model, data and
    recipe; yields (url, working directory, settings)."""
    import uvicorn

    from lorakit.ui import create_app

    root = make_workdir(tmp_path_factory.mktemp("ui") / "work", tiny_classifier_dir)
    before = os.getcwd()
    os.chdir(root)
    settings = page_settings(root)
    app = create_app(settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", root, settings
    finally:
        for name in app.state.launcher.running():
            app.state.launcher.stop(name)
        uv.should_exit = True
        thread.join(10)
        os.chdir(before)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # as root (CI containers) Chromium runs only without its sandbox; a small /dev/shm must not crash it
        chromium = p.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(server[0] + "/")
    page.wait_for_selector("body[data-ready='1']")
    yield page
    context.close()


def start_form(page, name: str, **fields: str) -> None:
    page.select_option("#recipe", "tiny.yaml")
    page.wait_for_function("document.querySelector(\"input[data-key='lora.rank']\").value === '4'")
    page.fill("#run-name", name)
    for key, value in fields.items():
        page.fill(f"input[data-key='{key}']", value)


def errors(page) -> list[str]:
    page.wait_for_selector("#errors li")
    return page.locator("#errors li").all_inner_texts()


def test_a_run_started_from_the_form_draws_its_loss_curve_and_appears_in_the_table_with_its_metric(page, shots):
    start_form(page, "first", **{"optim.max_steps": "12"})
    page.screenshot(path=shots / "ui-start.png", full_page=True)
    page.click("#launch")
    page.wait_for_selector("#view-watch:not(.hidden)")
    page.wait_for_function("Number(document.querySelector('#loss-plot').dataset.points || 0) > 0")
    page.wait_for_selector("#watch-status.finished")
    assert int(page.get_attribute("#loss-plot", "data-points")) == 12
    assert "eval_accuracy" in page.inner_text("#evals")
    page.screenshot(path=shots / "ui-watch.png", full_page=True)
    page.click("nav button[data-view='compare']")
    row = page.locator("#runs-table tr", has_text="first")
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    assert cells[1:4] == ["first", "finished", "classification"] and "accuracy" in cells
    assert cells[cells.index("accuracy") + 1] != "—"
    row.locator("input[type=checkbox]").check()
    page.wait_for_function("Number(document.querySelector('#overlay-plot').dataset.points || 0) > 0")


def test_a_bad_rank_shows_the_clis_message_inline_before_anything_starts(page, server, shots):
    start_form(page, "badrank", **{"lora.rank": "0"})
    page.click("#launch")
    shown = errors(page)
    assert any("flag --lora.rank=0" in e for e in shown), shown
    assert not (server[1] / "runs" / "badrank").exists()
    page.screenshot(path=shots / "ui-error.png", full_page=True)


def test_a_second_run_stops_from_the_page_and_the_api_answers_within_200ms_while_it_trains(page, shots):
    start_form(page, "long", **{"optim.max_steps": "100000"})
    page.click("#launch")
    page.wait_for_selector("#watch-status.running")
    page.wait_for_function("Number(document.querySelector('#loss-plot').dataset.points || 0) > 3")
    timings = page.evaluate("""async () => {
        const out = [];
        for (let i = 0; i < 20; i++) {
            const path = i % 2 ? '/api/runs' : '/api/runs/long';
            const t0 = performance.now(); const r = await fetch(path); await r.json();
            out.push(performance.now() - t0);
        }
        return out;
    }""")
    steps = page.evaluate("fetch('/api/runs/long').then(r => r.json()).then(r => r.step)")
    ordered = sorted(timings)
    figures = {"requests": len(timings), "median_ms": statistics.median(timings), "p90_ms": ordered[17],
               "max_ms": ordered[-1], "steps_trained_at_measurement": steps}
    (shots / "ui-latency.json").write_text(json.dumps(figures, indent=2) + "\n")
    assert figures["p90_ms"] < LATENCY_LIMIT_MS, figures
    page.click("#stop")
    page.wait_for_selector("#watch-status.stopped")
    page.wait_for_selector("#resume:not(.hidden)")
    page.click("nav button[data-view='compare']")
    for name in ("first", "long"):
        page.locator("#runs-table tr", has_text=name).locator("input[type=checkbox]").check()
    names = "Array.from(document.querySelectorAll('#runs-table tr td:nth-child(2)')).map(td => td.textContent)"
    page.click("#runs-table th[data-key='step']")
    page.wait_for_selector("#runs-table th.sorted.asc")
    ascending = page.evaluate(names)
    page.click("#runs-table th[data-key='step']")
    page.wait_for_selector("#runs-table th.sorted:not(.asc)")
    assert page.evaluate(names) == ascending[::-1] and sorted(ascending) == ["first", "long"]
    page.wait_for_function("document.querySelector('#overlay-plot').dataset.series === '2'")
    page.screenshot(path=shots / "ui-compare.png", full_page=True)


def test_base_and_adapter_give_different_answers_in_the_try_view(page, server, shots):
    make_lm_adapter(server[1], server[2].runs_dir)
    page.click("nav button[data-view='try']")
    page.wait_for_selector("#try-a option[value='lm']", state="attached")
    page.select_option("#try-a", "lm")
    page.fill("#prompt", "hello there")
    page.fill("#try-max", "12")
    page.click("#ask")
    page.wait_for_function("document.querySelectorAll('#answers .answer').length === 2")
    base, adapted = page.locator("#answers .answer pre").all_inner_texts()
    assert base and adapted and base != adapted
    page.screenshot(path=shots / "ui-try.png", full_page=True)


def test_bad_input_through_the_page_shows_inline_messages_and_the_server_carries_on(page, server, tmp_path):
    root = server[1]
    (root / "runs" / "taken").mkdir(parents=True)
    (root / "runs" / "taken" / "metrics.jsonl").write_text("")
    cases = [("../escape", {}, "must be one directory name"), ("taken", {}, "already holds a run"),
             ("outside", {"data.train": str(tmp_path / "x.tsv")}, "outside the directories")]
    for name, fields, expected in cases:
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        start_form(page, name, **fields)
        page.click("#launch")
        assert any(expected in e for e in errors(page)), (name, errors(page))
    tabs = tmp_path / "tabs.yaml"
    tabs.write_text(yaml.safe_dump(tiny_recipe()).replace("  rank: 4", "\trank: 4"))
    page.set_input_files("#upload", str(tabs))
    page.fill("#run-name", "tabs")
    page.click("#launch")
    assert any("tabs.yaml is not valid YAML at line" in e for e in errors(page))
    big = tmp_path / "big.yaml"
    big.write_text("#" * (UPLOAD_CAP * 4))
    page.set_input_files("#upload", str(big))
    assert any(f"at most {UPLOAD_CAP:,} bytes" in e for e in errors(page))
    assert page.evaluate("fetch('/api/info').then(r => r.status)") == 200


def test_the_page_fits_a_narrow_window(browser, server, shots):
    context = browser.new_context(viewport={"width": 375, "height": 800})
    page = context.new_page()
    page.goto(server[0] + "/")
    page.wait_for_selector("body[data-ready='1']")
    for view in ("start", "compare"):
        page.click(f"nav button[data-view='{view}']")
        page.wait_for_timeout(300)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), view
    page.screenshot(path=shots / "ui-narrow.png", full_page=True)
    context.close()
