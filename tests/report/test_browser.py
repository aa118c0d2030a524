"""report.html in a real browser: headless Chromium opens the page from disk, with no console errors, the
plots drawn and the findings table present; a screenshot is kept for a person to look at.

Skipped only when no Chromium is installed and ``CI`` is unset; in CI it runs (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = next(
    (
        p
        for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
        if p and Path(p).is_file()
    ),
    None,
)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None and not os.environ.get("CI"):
        pytest.skip("no Chromium installed (apt-get install chromium); runs in CI")
    assert CHROMIUM is not None, "CI must have Chromium: .ci/run installs the Debian package"
    if not os.environ.get("CI"):
        pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _open(browser, path: Path, screenshot: Path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    messages, failed = [], []
    page.on("console", lambda m: messages.append((m.type, m.text)))
    page.on("pageerror", lambda e: messages.append(("error", str(e))))
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(path.resolve().as_uri(), wait_until="load")
    page.screenshot(path=str(screenshot), full_page=True)
    return page, messages, failed


def test_report_renders_in_chromium(browser, gpt2_run, tmp_path):
    shot = tmp_path / "report.png"
    page, messages, failed = _open(browser, gpt2_run / "report.html", shot)
    assert not [m for m in messages if m[0] == "error"], messages
    assert not failed
    # every plot decoded and drawn at a real size
    sizes = page.eval_on_selector_all(
        "img[data-plot]", "els => els.map(e => [e.dataset.plot, e.complete, e.naturalWidth, e.clientWidth])"
    )
    assert {s[0] for s in sizes} >= {"training", "grad-norm", "grad-zero", "activations", "update-ratio"}
    assert all(complete and natural > 200 and shown > 200 for _, complete, natural, shown in sizes), sizes
    # the findings table: most severe first, with the synthetic critical and warning
    rows = page.locator("#findings-table tbody tr")
    assert rows.count() >= 2
    assert rows.nth(0).locator("td").nth(0).inner_text() == "1"  # incident 1, its root first
    assert rows.nth(0).locator("td").nth(1).inner_text() == "critical"
    text = page.locator("#findings-table").inner_text()
    assert "numerics.nonfinite" in text and "grad.zero_fraction" in text
    assert page.locator(".verdict .badge").inner_text().lower() == "critical"
    assert shot.stat().st_size > 50_000
    page.close()


def test_synthetic_sections_render_in_chromium(browser, tmp_path):
    from .test_sections import test_each_kind_of_data_lights_up_its_section

    test_each_kind_of_data_lights_up_its_section(tmp_path)
    page, messages, failed = _open(
        browser, tmp_path / "synthetic" / "report.html", tmp_path / "synthetic.png"
    )
    assert not [m for m in messages if m[0] == "error"], messages
    assert not failed
    for section in ("dumps", "attention", "memory", "timing"):
        assert page.locator(f"section#{section} h2").is_visible()
    assert page.eval_on_selector_all(
        "img[data-plot]", "els => els.every(e => e.complete && e.naturalWidth > 0)"
    )
    page.close()
