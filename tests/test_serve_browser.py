"""The `grape serve` page in a real headless Chromium (driven by Playwright's Python
package; the browser is the system's, never downloaded): queries in English and Chinese,
thumbnails, the rewrite, search by clicking an image, a reference image plus an edit,
and "this is the one" growing the pairs file. Skipped only when Chromium is missing.

Set GRAPE_TEST_SCREENSHOTS=DIR to keep the screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grape_cli.feedback import pairs_file
from grape_cli.index import index_folders
from grape_cli.serve import GrapeServer, Service

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


def test_page_in_headless_chromium(photos, tmp_path, tiny_clip, tiny_lm):
    from playwright.sync_api import expect, sync_playwright

    shutil.copy(photos / "img_001.jpg", photos / "夕阳下的猫.jpg")  # a Chinese file name
    index_folders([photos], tmp_path / "idx", str(tiny_clip), workers=0)
    service = Service(tmp_path / "idx", [str(tiny_lm)])
    server = GrapeServer(service, "127.0.0.1", 0).start()
    problems: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            # bypass_csp: Playwright's own polling evaluates strings, which the page's
            # Content-Security-Policy (no eval) refuses; the page itself needs no exception.
            context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
            page = context.new_page()
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on(
                "console",
                lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None,
            )
            page.goto(server.url + "/")
            expect(page.locator("#meta")).to_contain_text("17 images")
            options = page.locator("#rewriter option")
            expect(options).to_have_count(2)
            assert options.all_text_contents() == ["none", Path(tiny_lm).name]

            # an English query, no rewriter: eight thumbnails with scores
            page.select_option("#rewriter", "none")
            page.fill("#k", "8")
            page.fill("#q", "a red circle on the left")
            page.click("#go")
            cards = page.locator(".card")
            expect(cards).to_have_count(8)
            page.wait_for_function(
                "[...document.querySelectorAll('.card img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
            expect(cards.first.locator(".score")).to_contain_text("#1 · ")
            expect(page.locator("#rewrite")).to_be_hidden()

            # a Chinese query through the rewriter: the rewrite is shown above the results
            page.select_option("#rewriter", str(tiny_lm))
            page.fill("#q", "夕阳下的猫")
            page.press("#q", "Enter")
            expect(page.locator("#summary")).to_contain_text("“夕阳下的猫”")
            expect(page.locator("#rewrite")).to_be_visible()
            assert page.locator("#rewrite-text").inner_text().strip()
            expect(cards).to_have_count(8)

            # "this is the one": one more line in the index's pairs file
            pf = pairs_file(service.root)
            assert not pf.exists()
            target = cards.nth(2).locator(".name").get_attribute("title")
            cards.nth(2).locator("button.one").click()
            expect(cards.nth(2).locator("button.one")).to_have_text("✓ saved")
            expect(page.locator("#pairs-count")).to_contain_text("1 pair")
            assert [json.loads(x) for x in pf.read_text("utf-8").splitlines()] == [
                {"query": "夕阳下的猫", "target": target}
            ]

            # click a thumbnail: a search by that image (it comes first, as itself)
            clicked = cards.nth(4).get_attribute("data-id")
            reference = cards.nth(4).locator(".name").get_attribute("title")
            cards.nth(4).locator("button.thumb").click()
            expect(page.locator("#summary")).to_contain_text("results for the reference image")
            expect(page.locator("#reference")).to_be_visible()
            expect(cards.first).to_have_attribute("data-id", clicked)
            expect(cards.first.locator("button.one")).to_be_disabled()  # no text, no pair

            # the reference image plus an edit, in Chinese: a composed query
            page.fill("#q", "换成夜景")
            page.click("#go")
            expect(page.locator("#summary")).to_contain_text("“换成夜景” with the reference")
            expect(cards).to_have_count(8)
            page.wait_for_function(
                "[...document.querySelectorAll('.card img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
            chosen = cards.nth(1).locator(".name").get_attribute("title")
            cards.nth(1).locator("button.one").click()
            expect(page.locator("#pairs-count")).to_contain_text("2 pairs")
            lines = pf.read_text("utf-8").splitlines()
            assert json.loads(lines[1]) == {
                "query": "换成夜景",
                "target": chosen,
                "image": reference,
            }

            shot = tmp_path / "serve-page.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        server.stop()
    assert problems == []
    if os.environ.get("GRAPE_TEST_SCREENSHOTS"):
        keep = Path(os.environ["GRAPE_TEST_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep / shot.name)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    assert (saturation > 30).mean() > 0.05  # the thumbnails are there, not an empty page
