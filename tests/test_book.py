"""The book's structure: every chapter is listed, executed, shows a picture, and points at one repository."""

import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
sys.path.insert(0, str(ROOT / "book"))
from set_repository import current_branch, current_url  # noqa: E402


def load(path):
    return json.loads(path.read_text())


def test_toc_lists_every_chapter():
    toc = (ROOT / "_toc.yml").read_text()
    listed = re.findall(r"file:\s*notebooks/(\S+)", toc)
    assert sorted(listed) == [p.stem for p in NOTEBOOKS]
    assert len(NOTEBOOKS) == 18                 # chapters 0-17, with 13 (SD3 by hand)
    for page in re.findall(r"(?:root|file):\s*(book/\S+)", toc):
        assert (ROOT / f"{page}.md").exists(), page


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_is_executed_and_shows_a_picture(path):
    """nbval compares text, not images: here every chapter must keep at least one image, no errors,
    every code cell executed, and the notebook metadata nbval and Colab expect."""
    nb = load(path)
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert all(c.get("execution_count") is not None for c in code), "unexecuted cells"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no image output"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert not any("execution" in c.get("metadata", {}) for c in code), "record_timing=False was not used"


COLAB_LINK = re.compile(r"colab\.research\.google\.com/github/([^/\s]+/[^/\s]+)/blob/(\S+?)/notebooks/([^)\s]+)")


def repository_links(text: str):
    """(install lines, Colab links) of a notebook's text: [(url, branch)], [(slug, branch, notebook)]."""
    installs = re.findall(r'sd3mini @ git\+(https://github\.com/[^@\s]+)@([\w./-]+)', text)
    return installs, COLAB_LINK.findall(text)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_points_at_the_configured_repository(path):
    """The setup cell installs from _config.yml's repository and branch; a Colab badge is optional (the
    book's header has the launch button), but where a chapter has one it opens this chapter there."""
    url, branch = current_url(), current_branch()
    slug = url.split("github.com/")[1]
    first_cells = "".join("".join(c["source"]) for c in load(path)["cells"][:2])
    installs, links = repository_links(first_cells)
    assert installs == [(url, branch)]
    assert f'"sd3mini @ git+{url}@{branch}"' in first_cells
    assert 'if "google.colab" in sys.modules:' in first_cells
    assert all(link == (slug, branch, path.name) for link in links), links


def test_set_repository_rewrites_everything(tmp_path, monkeypatch):
    import shutil

    import set_repository

    for item in ("_config.yml", "notebooks"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / item)
    monkeypatch.setattr(set_repository, "ROOT", tmp_path)
    badges = {nb.name for nb in (tmp_path / "notebooks").glob("*.ipynb") if COLAB_LINK.search(nb.read_text())}
    # a fork whose URL starts with the old one, and a branch with a slash
    for url, branch, expected_branch in (("https://github.com/sd3mini/sd3mini-fork", "feature/book", "feature/book"),
                                         ("https://github.com/someone/fork", None, "feature/book")):
        set_repository.main(url, branch)
        assert (set_repository.current_url(), set_repository.current_branch()) == (url, expected_branch)
        slug = url.split("github.com/")[1]
        for nb in (tmp_path / "notebooks").glob("*.ipynb"):
            text = nb.read_text()
            json.loads(text)
            installs, links = repository_links(text)
            assert installs == [(url, expected_branch)], nb.name
            assert links == ([(slug, expected_branch, nb.name)] if nb.name in badges else []), nb.name
            assert "github.com/sd3mini/sd3mini/" not in text and "sd3mini/sd3mini@" not in text
    config = (tmp_path / "_config.yml").read_text()
    assert "  url: https://github.com/someone/fork\n  branch: feature/book\n" in config


BUILT = ROOT / "_build" / "html"
# A script loaded from another host (<script src="https://…"> or an ES-module import from a URL).
REMOTE_SCRIPT = re.compile(r'<script[^>]*\bsrc="(?:https?:)?//[^"]*"|import [^;]*from\s*"(?:https?:)?//[^"]*"')


def test_book_config_needs_no_cdn():
    config = (ROOT / "_config.yml").read_text()
    assert re.search(r"^\s+mathjax_path:\s*mathjax/tex-chtml-full.js", config, re.M)
    assert (ROOT / "book" / "vendor" / "mathjax" / "tex-chtml-full.js").is_file()
    assert "mermaid" not in config and "mermaid" not in (ROOT / "book" / "intro.md").read_text()


def test_built_book_loads_no_script_from_a_cdn():
    """The built HTML renders offline: MathJax from _static, diagrams as committed images. `.ci/run` builds
    the book before the tests and sets SD3MINI_BOOK_BUILT=1, so there this test cannot skip."""
    pages = sorted(BUILT.rglob("*.html"))
    if not pages:
        assert not os.environ.get("SD3MINI_BOOK_BUILT"), f"no built book in {BUILT}"
        pytest.skip("the book is not built here (jupyter-book build .)")
    remote = {str(p.relative_to(BUILT)): REMOTE_SCRIPT.findall(p.read_text()) for p in pages}
    assert not {page: found for page, found in remote.items() if found}
    chapter = (BUILT / "notebooks" / "01_rectified_flow.html").read_text()
    assert 'src="../_static/mathjax/tex-chtml-full.js' in chapter and 'class="math' in chapter
    assert (BUILT / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_code_fits_the_rendered_column(path):
    """The book's code column shows 88 characters; longer lines are cut off there (shape comments first)."""
    long = [(i, line) for i, c in enumerate(load(path)["cells"]) if c["cell_type"] == "code"
            for line in "".join(c["source"]).splitlines() if len(line) > 88]
    assert not long, long[:5]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_ends_with_summary_exercises_and_references(path):
    markdown = "\n".join("".join(c["source"]) for c in load(path)["cells"] if c["cell_type"] == "markdown")
    headings = re.findall(r"^## (Summary|Exercises|References)\s*$", markdown, re.M)
    assert headings == ["Summary", "Exercises", "References"], headings
    exercises = markdown.split("## Exercises", 1)[1].split("## References", 1)[0]
    assert 2 <= len(re.findall(r"^\d+\. ", exercises, re.M)) <= 4
    references = markdown.split("## References", 1)[1]
    cited = re.findall(r"\{cite\}`([^`]+)`", references)
    bib = (ROOT / "references.bib").read_text()
    assert cited and all(f"{{{key}," in bib for key in cited), cited
