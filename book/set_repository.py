"""Point the book at another repository (a fork): ``python book/set_repository.py https://github.com/you/sd3mini``.

The repository URL lives in ``_config.yml`` (``repository.url``), which the book's Colab and GitHub buttons
use. Each chapter's first cells repeat it — the Colab badge and the ``%pip install`` line must work inside a
notebook on its own — so this script rewrites all of them; ``tests/test_book.py`` checks they agree.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def current_url() -> str:
    return re.search(r"^\s+url:\s*(\S+)", (ROOT / "_config.yml").read_text(), re.M).group(1).rstrip("/")


def main(new_url: str):
    new_url = new_url.rstrip("/")
    old_url = current_url()
    old_slug, new_slug = old_url.split("github.com/")[1], new_url.split("github.com/")[1]
    config = ROOT / "_config.yml"
    config.write_text(config.read_text().replace(old_url, new_url))
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        text = nb.read_text()
        updated = text.replace(old_url, new_url).replace(f"github/{old_slug}/", f"github/{new_slug}/")
        if updated != text:
            json.loads(updated)                       # still valid JSON
            nb.write_text(updated)
            print(f"updated {nb.relative_to(ROOT)}")
    print(f"repository: {old_url} -> {new_url}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or "github.com/" not in sys.argv[1]:
        sys.exit("usage: python book/set_repository.py https://github.com/<owner>/<repo>")
    main(sys.argv[1])
