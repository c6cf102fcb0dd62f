"""The book's page layout: what a chapter prints fits the rendered column.

At a 1280-px browser window the content column (widened by book/static/sd3mini.css) holds about 90
characters of the theme's 14-px monospace. Code lines are kept within 88 characters by
tests/test_book.py; this file holds the stored outputs to the same 88, since the book shows them as
they are stored (`execute_notebooks: off`) and a longer line is cut off at the column's edge.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COLUMN = 88

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# A text/plain result is what the page shows only when nothing richer comes with it.
RICHER = ("image/", "text/html", "text/latex", "text/markdown", "image/svg+xml")


def shown_text(output):
    """The text the book shows for one stored output: a stream, or a plain-text result."""
    if output["output_type"] == "stream":
        return "".join(output["text"])
    data = output.get("data", {})
    if "text/plain" in data and not any(m.startswith(RICHER) for m in data):
        return "".join(data["text/plain"])
    return ""


def long_output_lines(path):
    """(cell index, length, line) for every shown output line over COLUMN characters."""
    cells = json.loads(path.read_text())["cells"]
    found = []
    for i, cell in enumerate(cells):
        for output in cell.get("outputs", []):
            for line in ANSI.sub("", shown_text(output)).expandtabs().splitlines():
                if len(line) > COLUMN:
                    found.append((i, len(line), line))
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_outputs_fit_the_rendered_column(path):
    """Every stored stream output and plain-text result line is at most 88 characters."""
    long = long_output_lines(path)
    assert not long, long[:5]


def test_the_output_check_sees_long_lines(tmp_path):
    """The check reads streams and plain-text results, and ignores the text that comes with a
    figure (the page shows the figure)."""
    wide = "x" * (COLUMN + 1)
    cells = [
        {"cell_type": "code", "outputs": [{"output_type": "stream", "name": "stdout",
                                            "text": ["short\n", wide + "\n"]}]},
        {"cell_type": "code", "outputs": [{"output_type": "execute_result",
                                            "data": {"text/plain": [wide]}}]},
        {"cell_type": "code", "outputs": [{"output_type": "display_data",
                                            "data": {"text/plain": [wide], "image/png": "iVBO"}}]},
        {"cell_type": "markdown", "source": [wide]},
    ]
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps({"cells": cells}))
    assert [(i, n) for i, n, _ in long_output_lines(path)] == [(0, COLUMN + 1), (1, COLUMN + 1)]
