"""Point the book at another repository (a fork): ``python book/set_repository.py https://github.com/you/sd3mini``.

The repository lives in ``_config.yml``: ``repository.url`` and ``repository.branch``, which the book's
Colab and GitHub buttons use. Each chapter's setup cell repeats both in its ``%pip install`` line (a
notebook opened on its own, as Colab does, must install from the right place), and a chapter may also
show a Colab badge with them; this script rewrites all of these, with or without a badge, and
``tests/test_book.py`` checks they agree. ``--branch NAME`` also sets ``repository.branch``; without it
the branch already in ``_config.yml`` is written everywhere.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BRANCH = r"[\w.-]+(?:/[\w.-]+)*"        # a git branch name (the characters this script accepts)


def _config_value(key: str) -> str:
    """A value of the ``repository:`` section of ``_config.yml`` (``url`` or ``branch``)."""
    section = re.search(r"^repository:\s*\n((?:[ \t]+.*\n?)+)", (ROOT / "_config.yml").read_text(), re.M)
    found = section and re.search(rf"^\s+{key}:\s*(\S+)", section.group(1), re.M)
    if not found:
        raise SystemExit(f"_config.yml has no repository.{key}")
    return found.group(1)


def current_url() -> str:
    return _config_value("url").rstrip("/")


def current_branch() -> str:
    return _config_value("branch")


def install_line(url: str, branch: str) -> str:
    """What each chapter's setup cell installs on Colab (inside the quotes of its %pip line)."""
    return f"sd3mini @ git+{url}@{branch}"


def badge_url(slug: str, branch: str) -> str:
    """The start of a chapter's Colab link (the notebook's path follows)."""
    return f"colab.research.google.com/github/{slug}/blob/{branch}/"


def main(new_url: str, branch: str | None = None):
    new_url = new_url.rstrip("/")
    old_url = current_url()
    old_slug, new_slug = old_url.split("github.com/")[1], new_url.split("github.com/")[1]
    # old_url itself, not a longer URL that starts with it (".../sd3mini" inside ".../sd3mini-fork")
    same_url = re.compile(re.escape(old_url) + r"(?![\w.-])")
    config = ROOT / "_config.yml"
    text = same_url.sub(lambda m: new_url, config.read_text())
    if branch is not None:
        text = re.sub(r"^(repository:\s*\n(?:[ \t]+.*\n)*?[ \t]+branch:[ \t]*)\S+",
                      lambda m: m.group(1) + branch, text, flags=re.M)
    config.write_text(text)
    branch = current_branch()
    # The install line and the badge, whatever branch they named before; any other link to the repository.
    install = re.compile(re.escape(f"sd3mini @ git+{old_url}@") + BRANCH)
    badge = re.compile(re.escape(f"colab.research.google.com/github/{old_slug}/blob/") + r"[\w./-]+?/(?=notebooks/)")
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        text = nb.read_text()
        updated = install.sub(lambda m: install_line(new_url, branch), text)
        updated = badge.sub(lambda m: badge_url(new_slug, branch), updated)
        updated = same_url.sub(lambda m: new_url, updated)
        if updated != text:
            json.loads(updated)                       # still valid JSON
            nb.write_text(updated)
            print(f"updated {nb.relative_to(ROOT)}")
    print(f"repository: {old_url} -> {new_url}, branch {branch}")


if __name__ == "__main__":
    args = sys.argv[1:]
    branch = None
    if "--branch" in args:
        at = args.index("--branch")
        branch = args[at + 1] if at + 1 < len(args) else ""
        del args[at:at + 2]
    if len(args) != 1 or "github.com/" not in args[0] or branch == "" or (branch and not re.fullmatch(BRANCH, branch)):
        sys.exit("usage: python book/set_repository.py https://github.com/<owner>/<repo> [--branch NAME]")
    main(args[0], branch)
