"""The built book at a 1280-px window, as a reader sees it: nothing wider than its box.

tests/test_layout.py counts characters in the notebooks; this test asks the browser. Each built page
is opened in headless Chromium at 1280 × 900 with a script that waits for MathJax, then lists every
code block, display equation, table and image that is wider than its box or than the content column
(a line cut off, an equation that scrolls, a figure past the edge). Needs the built book and chromium;
CI builds the book first and sets SD3MINI_BOOK_BUILT=1, so there a missing build fails.
"""
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

BUILT = Path(__file__).resolve().parents[1] / "_build" / "html"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Runs in the page once MathJax has typeset (the virtual-time budget lets the timer fire at once).
PROBE = r"""<script>
window.addEventListener('load', () => setTimeout(() => {
  const main = document.querySelector('main') || document.body;
  const right = main.getBoundingClientRect().right;
  const wide = [];
  document.querySelectorAll('pre, mjx-container[display="true"], table, img').forEach(e => {
    const box = e.getBoundingClientRect();
    if (box.width === 0) return;  // not laid out (display: none)
    if (e.scrollWidth > e.clientWidth + 1 || box.right > right + 2)
      wide.push(e.tagName + ' ' + e.scrollWidth + '>' + e.clientWidth + ': ' +
                (e.textContent || e.getAttribute('src') || '').replace(/\s+/g, ' ').slice(0, 60));
  });
  document.body.setAttribute('data-too-wide', JSON.stringify(wide));
}, 4000));
</script>"""


def pages():
    return sorted([*BUILT.glob("notebooks/*.html"), *BUILT.glob("book/*.html")])


def too_wide(page: Path) -> list[str]:
    probe = page.with_name("_probe_" + page.name)
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    try:
        dom = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
             "--virtual-time-budget=20000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=120).stdout
    finally:
        probe.unlink()
    found = re.search(r'data-too-wide="([^"]*)"', dom)
    assert found, f"{page.name}: the probe did not run"
    return json.loads(html.unescape(found.group(1)))


def test_nothing_on_a_page_is_wider_than_its_box_at_1280_px():
    if not pages():
        assert not os.environ.get("SD3MINI_BOOK_BUILT"), f"no built book in {BUILT}"
        pytest.skip("the book is not built here (jupyter-book build .)")
    if CHROMIUM is None:
        pytest.skip("no chromium to render the pages")
    wide = {page.name: found for page in pages() if (found := too_wide(page))}
    assert not wide, wide


def test_the_probe_sees_a_line_that_is_too_wide():
    """Self-test: a 200-character code line in the book's own page layout is reported."""
    if not pages() or CHROMIUM is None:
        pytest.skip("needs the built book and chromium")
    page = BUILT / "notebooks" / "00_tour.html"
    long_line = "x = " + "1 + " * 49 + "1"
    broken = page.with_name("_selftest_" + page.name)
    broken.write_text(re.sub(r"(<main[^>]*>)", rf'\1<div class="highlight"><pre>{long_line}</pre></div>',
                             page.read_text(), count=1))
    try:
        assert any(entry.startswith("PRE") for entry in too_wide(broken))
    finally:
        broken.unlink()
