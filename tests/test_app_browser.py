"""The app in a real browser: Debian's chromium driven by Playwright (no browser download), headless.

Loads the page, starts an erasure, waits for it, compares original vs the new run, saves a screenshot under
``test-artifacts/app/`` and checks the two images sit side by side and no request left localhost.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib.util  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts" / "app"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install -y chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="the playwright package is not installed"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from erasure.diffusion.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("browser")
    build_tiny_pipeline(root / "tiny")
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    log = open(root / "app.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "erasure_app", "--model", str(root / "tiny"), "--runs-dir", str(root / "runs"), "--device",
         "cpu", "--data-cache-dir", str(root / "cache"), "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            raise RuntimeError((root / "app.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(url, timeout=2):
                break
        except OSError:
            if time.time() - t0 > 120:
                proc.kill()
                raise
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def _fill(page, selector: str, value) -> None:
    from playwright.sync_api import expect

    el = page.locator(selector).first
    el.wait_for(state="visible")
    el.fill(str(value))
    el.blur()
    expect(el).to_have_value(str(value))


def _open_prompts(page) -> None:
    """Open the collapsed prompt lists (their title shows the counts)."""
    if not page.locator("#erase-forget textarea").first.is_visible():
        page.get_by_text(re.compile(r"^Prompts: \d+ forget")).first.click()
        page.locator("#erase-forget textarea").first.wait_for(state="visible")


def _start_erasure(page, steps: int, run_name: str) -> None:
    """Fill the Erase tab with typed prompts and a tiny data config, then click Erase."""
    _fill(page, "#erase-concept textarea, #erase-concept input", "apple")
    _open_prompts(page)
    _fill(page, "#erase-forget textarea", "an apple\na photo of an apple")
    _fill(page, "#erase-anchor textarea", "a pear")
    _fill(page, "#erase-retain textarea", "a car")
    _fill(page, "#erase-steps input", steps)
    page.get_by_text("Advanced", exact=True).click()
    page.wait_for_timeout(500)  # the accordion opens
    _fill(page, "#erase-forget-images-per-prompt input", 2)
    _fill(page, "#erase-retain-images-per-prompt input", 2)
    _fill(page, "#erase-data-steps input", 2)
    _fill(page, "#erase-run-name textarea, #erase-run-name input", run_name)
    page.locator("#erase-button").click()


def test_erase_and_compare_in_the_browser(app_url):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: outside.append(r.url)
                    if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
            page.goto(app_url)
            page.wait_for_selector("#erase-button", timeout=60_000)

            # erase: typed prompts, a tiny config
            _start_erasure(page, steps=3, run_name="browser-apple")
            run_box = page.locator("#erase-run-id textarea, #erase-run-id input").first
            expect(run_box).to_have_value("browser-apple", timeout=180_000)
            expect(page.locator("#erase-summary")).to_contain_text("trained on 4 forget and 2 retain images")
            page.wait_for_timeout(1500)  # let the loss chart and the status line render
            page.screenshot(path=str(ARTIFACTS / "erase.png"), full_page=True)

            # compare: original (left) vs the new run (right, selected after the erasure)
            page.get_by_role("tab", name="Compare").click()
            right = page.locator("#compare-model-b input").first
            expect(right).to_have_value("browser-apple", timeout=30_000)
            _fill(page, "#compare-seeds textarea, #compare-seeds input", "0, 1")
            _fill(page, "#compare-steps input[type=number]", 2)
            page.locator("#compare-button").click()
            imgs = page.locator("#compare-grid img")
            expect(imgs).to_have_count(4, timeout=120_000)
            for i in range(4):
                page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=imgs.nth(i).element_handle())
            expect(page.locator("#compare-grid .cmp-head")).to_contain_text("browser-apple")
            expect(page.locator("#compare-grid .cmp-head")).to_contain_text("original")
            expect(page.locator("#compare-grid figcaption").first).to_contain_text("NudeNet")
            expect(page.locator("#compare-table")).to_contain_text("NudeNet")
            page.screenshot(path=str(ARTIFACTS / "compare-1280.png"), full_page=True)
            boxes = [imgs.nth(i).bounding_box() for i in range(4)]

            # 390 px wide: stacked per seed, nothing wider than the page
            page.set_viewport_size({"width": 390, "height": 844})
            page.wait_for_timeout(500)
            overflow = page.evaluate("document.documentElement.scrollWidth")
            narrow = [imgs.nth(i).bounding_box() for i in range(4)]
            page.screenshot(path=str(ARTIFACTS / "compare-390.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "compare-1280.png").stat().st_size > 10_000
    # one row per seed: the original and the run side by side, each image at least 256 px wide
    a, b = boxes[0], boxes[1]
    assert abs(a["y"] - b["y"]) < 4 and a["x"] + a["width"] <= b["x"], (a, b)
    assert boxes[2]["y"] > a["y"] + a["height"]  # the next seed below
    assert all(bx["width"] >= 256 for bx in boxes), boxes
    assert overflow <= 390, overflow
    assert all(bx["x"] >= 0 and bx["x"] + bx["width"] <= 390 for bx in narrow), narrow
    assert narrow[1]["y"] > narrow[0]["y"] + narrow[0]["height"] - 1  # stacked
    assert not outside, f"requests left the machine: {outside}"


def test_job_banner_in_two_windows_cancel_from_the_second_reload_resume_and_delete(app_url):
    """The running job belongs to the app, not to the window that started it: a second window sees it in the
    banner and cancels it; a reloaded window re-attaches; "cancelling" turns into "cancelled"."""
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            asked: list[str] = []
            page.on("dialog", lambda d: (asked.append(d.message), d.accept()))
            page.goto(app_url)
            page.wait_for_selector("#erase-button", timeout=60_000)
            _start_erasure(page, steps=5000, run_name="browser-cancel")  # long enough to cancel
            banner = page.locator("#job-banner")
            expect(banner).to_contain_text("fine-tuning", timeout=120_000)
            expect(banner).to_contain_text("browser-cancel")
            expect(banner).to_contain_text("% overall")
            expect(banner).to_contain_text(re.compile(r"ETA \d+ (s|min)"), timeout=30_000)
            expect(page.locator("#erase-button")).to_be_disabled(timeout=10_000)
            page.screenshot(path=str(ARTIFACTS / "banner-running-1280.png"))

            # a second window (its own browser session) sees the job; the first, reloaded, re-attaches
            other = browser.new_context(viewport={"width": 390, "height": 844}).new_page()
            dialogs: list[str] = []
            other.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
            other.goto(app_url)
            other_banner = other.locator("#job-banner")
            expect(other_banner).to_contain_text("browser-cancel", timeout=60_000)
            expect(other_banner).to_contain_text("fine-tuning")
            expect(other_banner).to_contain_text("started in another window")
            expect(page.locator("#job-banner")).not_to_contain_text("another window")
            expect(other.locator("#erase-button")).to_be_disabled(timeout=10_000)
            page.reload()
            expect(page.locator("#job-banner")).to_contain_text("fine-tuning", timeout=60_000)
            page.wait_for_timeout(1500)
            expect(page.locator("#job-banner")).not_to_contain_text("another window")  # a reload is the same window
            other.screenshot(path=str(ARTIFACTS / "banner-running-390.png"))

            # cancel from the second window (on another tab): cancelling..., then cancelled
            other.get_by_role("tab", name="Compare").click()
            other.locator("#job-cancel").click()
            # "cancelling..." (shown at once) turns into "cancelled" (a fast step may skip straight to it)
            expect(other_banner).to_contain_text(re.compile(r"ancelling|cancelled at step"), timeout=10_000)
            assert dialogs and "another window" in dialogs[0]  # confirmed: it was started elsewhere
            expect(other_banner).to_contain_text("'browser-cancel' cancelled at step", timeout=120_000)
            expect(page.locator("#job-banner")).to_contain_text("cancelled at step", timeout=30_000)
            expect(page.locator("#erase-button")).to_be_enabled(timeout=10_000)

            # the first window's Runs tab lists it under Interrupted runs (refreshed when the job ended)
            page.get_by_role("tab", name="Runs").click()
            table = page.locator("#interrupted-table")
            expect(table).to_contain_text("browser-cancel", timeout=60_000)
            expect(page.locator("#interrupted-run input").first).to_have_value("browser-cancel")
            first = _interrupted_step(table, "browser-cancel")
            assert first >= 1

            # resume it, cancel again from the second window: listed again with a later step; then delete it
            page.locator("#resume-button").click()
            page.wait_for_timeout(500)
            assert any("Resume the interrupted run 'browser-cancel'" in m for m in asked), asked  # asked first
            expect(other_banner).to_contain_text("Resumed erasure of run 'browser-cancel'", timeout=60_000)
            expect(other_banner).to_contain_text("fine-tuning", timeout=120_000)
            other.wait_for_timeout(2000)
            other.locator("#job-cancel").click()
            expect(other_banner).to_contain_text("cancelled at step", timeout=120_000)
            page.wait_for_function(
                "([sel, n]) => { const m = document.querySelector(sel).innerText.match(/browser-cancel\\s+apple\\s+"
                "salun\\s+(\\d+)/); return m && Number(m[1]) > n; }", arg=["#interrupted-table", first],
                timeout=60_000)
            page.get_by_label("Yes, delete this interrupted run").check()
            page.get_by_role("button", name="Delete interrupted run").click()
            expect(page.locator("#interrupted-message")).to_contain_text("deleted interrupted run 'browser-cancel'",
                                                                          timeout=30_000)
            expect(table).not_to_contain_text("browser-cancel", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "interrupted.png"), full_page=True)
        finally:
            browser.close()


def test_method_controls_follow_the_method(app_url):
    """The chosen method's settings are shown, the others' hidden; screenshots at desktop and phone widths."""
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            for width, height in ((1280, 800), (390, 844)):
                page = browser.new_page(viewport={"width": width, "height": height})
                page.goto(app_url)
                page.wait_for_selector("#erase-button", timeout=60_000)
                # (gradio writes a group's elem_id on two nested divs)
                salun, esd = page.locator("#erase-args-salun").first, page.locator("#erase-args-esd-x").first
                expect(salun).to_be_visible()
                expect(esd).to_be_hidden()
                expect(page.locator("#erase-arg-alpha")).to_contain_text("Retain weight (alpha)")
                expect(page.locator("#erase-arg-retain-loss")).to_contain_text("distill")
                page.screenshot(path=str(ARTIFACTS / f"erase-salun-{width}.png"), full_page=True)

                page.locator("#erase-method").get_by_text("ESD-x (cross-attention)", exact=True).click()
                expect(esd).to_be_visible(timeout=10_000)
                expect(salun).to_be_hidden()
                expect(page.locator("#erase-arg-esd-negative-guidance")).to_contain_text("Negative guidance (eta)")
                expect(page.locator("#erase-arg-esd-sample-steps input").first).to_have_value("50")
                page.screenshot(path=str(ARTIFACTS / f"erase-esd-{width}.png"), full_page=True)

                page.locator("#erase-method").get_by_text("RL (random labelling, no mask)", exact=True).click()
                expect(salun).to_be_visible(timeout=10_000)  # RL shares SalUn's settings
                expect(esd).to_be_hidden()
                page.close()
        finally:
            browser.close()


def _interrupted_step(table, run: str) -> int:
    """The step column of ``run``'s row in the Interrupted runs table."""
    import re

    m = re.search(rf"{re.escape(run)}\s+apple\s+salun\s+(\d+)", table.inner_text())
    assert m, table.inner_text()
    return int(m.group(1))


def test_rename_keeps_selection_custom_clears_preset_and_numbers_are_not_clamped(app_url):
    from gradio_client import Client
    from playwright.sync_api import expect, sync_playwright

    c = Client(app_url, verbose=False)
    tiny = dict(preset="custom", concept="apple", forget="an apple", anchor="a pear", retain="a car", method="salun",
                mask_ratio=0.5, steps=1, lr=1e-5, alpha=0.5, forget_images_per_prompt=1, retain_images_per_prompt=1,
                data_steps=1, batch_size=1, seed=0)
    for name in ("rename-a", "rename-b"):
        c.predict(**tiny, run_name=name, api_name="/erase")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(app_url)
            page.wait_for_selector("#erase-button", timeout=60_000)
            # Erase and the job banner above the fold at 1280x800
            for sel in ("#erase-button", "#job-banner"):
                box = page.locator(sel).first.bounding_box()
                assert box and box["y"] + box["height"] <= 800, (sel, box)
            page.screenshot(path=str(ARTIFACTS / "erase-1280.png"))

            # custom starts from the defaults, not from the preset's prompts and settings
            _open_prompts(page)
            expect(page.locator("#erase-retain textarea").first).not_to_have_value("")  # the preset's
            page.locator("#erase-preset input").first.click()
            page.get_by_role("option", name="custom (type your prompts)").click()
            expect(page.locator("#erase-preset input").first).to_have_value("custom (type your prompts)")
            expect(page.locator("#erase-retain textarea").first).to_have_value("", timeout=15_000)
            expect(page.get_by_text(re.compile(r"^Prompts: 0 forget · 0 anchor · 0 retain"))).to_be_visible(
                timeout=15_000)
            expect(page.locator("#erase-concept input, #erase-concept textarea").first).to_have_value("")
            expect(page.locator("#erase-steps input").first).to_have_value("100")

            # a mask ratio of 0 or 1.5 is an error naming the field, never clamped
            _fill(page, "#erase-concept textarea, #erase-concept input", "apple")
            _fill(page, "#erase-forget textarea", "an apple")
            _fill(page, "#erase-anchor textarea", "a pear")
            _fill(page, "#erase-retain textarea", "a car")
            for bad in ("0", "1.5"):
                _fill(page, "#erase-mask-ratio input", bad)
                page.locator("#erase-button").click()
                expect(page.get_by_text(f"mask ratio must be > 0.0 and <= 1.0, got {bad}").first).to_be_visible(
                    timeout=15_000)
                expect(page.locator("#erase-mask-ratio input").first).to_have_value(bad)
                for close in page.locator(".toast-close").all():
                    try:  # a toast may close by itself meanwhile
                        close.click(timeout=1000)
                    except Exception:  # noqa: BLE001
                        pass

            # rename keeps the selection on the renamed run and confirms next to the button
            page.get_by_role("tab", name="Runs").click()
            run = page.locator("#runs-run input").first
            run.click()
            page.get_by_role("option", name="rename-a", exact=True).click()
            expect(run).to_have_value("rename-a")
            _fill(page, "#runs-new-name textarea, #runs-new-name input", "rename-a2")
            page.locator("#runs-rename").click()
            msg = page.locator("#runs-rename-message")
            expect(msg).to_contain_text("renamed 'rename-a' to 'rename-a2'", timeout=30_000)
            expect(run).to_have_value("rename-a2", timeout=10_000)
            page.wait_for_timeout(2500)  # a later refresh (the banner's poll) must not move it
            expect(run).to_have_value("rename-a2")
            btn, m = page.locator("#runs-rename").bounding_box(), msg.bounding_box()
            assert abs(btn["y"] - m["y"]) < 80, (btn, m)  # next to the button, not at the bottom
            # a name ending in .partial is refused
            _fill(page, "#runs-new-name textarea, #runs-new-name input", "rename-b.partial")
            page.locator("#runs-rename").click()
            expect(page.get_by_text("may not end in .partial").first).to_be_visible(timeout=15_000)
            expect(run).to_have_value("rename-a2")
            page.screenshot(path=str(ARTIFACTS / "runs-1280.png"), full_page=True)
            page.set_viewport_size({"width": 390, "height": 844})
            page.wait_for_timeout(500)
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            page.screenshot(path=str(ARTIFACTS / "runs-390.png"), full_page=True)
        finally:
            browser.close()
