"""The app in a real browser: Debian's chromium, headless, driven by Playwright. The app runs as `make app`
runs it (a subprocess, offline); one generation per tab on its default preset (a trained toy model where
one is shipped, else a tiny random-weight one), the output must appear and say which it is; an invalid
setting must show a message, not a stack trace; "Export workflow" must give a runnable workflow.
Screenshots go to test-artifacts/app/ (or $ATTNPACK_ARTIFACTS)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = (
    Path(os.environ.get("ATTNPACK_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")) / "app"
)
TABS = [  # the tab's name in the app, the element the output shows in
    ("Image", "img"),
    ("Video", "video"),
    ("Long video", "video"),
    ("Several subjects", "img"),
    ("Trajectory", "video"),
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS.parent / "app.log", "w")  # noqa: SIM115 - open for the app's whole life
    process = subprocess.Popen(
        [sys.executable, "-m", "attnpack.app", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the app exited with {process.returncode}; see {ARTIFACTS.parent / 'app.log'}"
                ) from None
            time.sleep(1)
    else:
        process.kill()
        raise RuntimeError("the app did not answer within 180 s")
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.goto(app_url, wait_until="networkidle")
        yield page
        browser.close()


@pytest.mark.parametrize("name, element", TABS)
def test_one_generation_per_tab(page, name, element):
    from attnpack.app import TABS as APP_TABS
    from attnpack.pipelines import PRESETS

    tab = name.lower().replace(" ", "-")  # the app's element ids
    default = PRESETS[APP_TABS[name]["default"]]
    page.click(f"#tab-{tab}-button")
    page.click(f"#{tab}-generate")
    page.wait_for_selector(f"#{tab}-output {element}", timeout=120_000)
    status = page.inner_text(f"#{tab}-status")
    assert " s" in status and ("trained toy model" if default.is_toy else "random-weight") in status
    page.screenshot(path=str(ARTIFACTS / f"{tab}.png"), full_page=True)


def test_compare_with_dense_shows_both_and_the_speedup(page):
    page.click("#tab-image-button")
    page.check("#image-compare input")
    page.click("#image-generate")
    page.wait_for_selector("#image-dense img", timeout=120_000)
    page.wait_for_function("document.querySelector('#image-status').innerText.includes('speedup')")
    page.screenshot(path=str(ARTIFACTS / "image-compare.png"), full_page=True)
    page.uncheck("#image-compare input")


def test_bad_settings_show_a_message(page):
    page.click("#tab-image-button")
    editor = page.locator("#tab-image .cm-content").first
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.type('{"radius": -4}')
    page.click("#image-generate")
    toast = page.get_by_text("Invalid settings", exact=False).first
    toast.wait_for(timeout=60_000)
    assert "radius=-4" in page.content() and "Traceback" not in page.content()
    page.screenshot(path=str(ARTIFACTS / "error.png"), full_page=True)


def test_export_workflow_runs(page, tmp_path):
    from attnpack import workflow

    page.reload(wait_until="networkidle")
    page.click("#tab-video-button")
    page.click("#video-export")
    link = page.locator("#video-workflow a").first
    link.wait_for(timeout=60_000)
    with page.expect_download(timeout=60_000) as download:
        link.click()
    path = tmp_path / "exported.json"
    download.value.save_as(path)
    flow = json.loads(path.read_text())
    assert flow["2"]["class_type"] == "attnpack.ApplyRadial"
    workflow.run(flow, output_dir=tmp_path)
    assert (tmp_path / "radial.mp4").exists()


def test_trajectory_preview_draws_the_boxes(page):
    page.click("#tab-trajectory-button")
    page.click("#trajectory-preview")
    page.wait_for_selector("#trajectory-extra img", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "trajectory-plan.png"), full_page=True)
