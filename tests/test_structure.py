"""The package's shape, as the house rules state it: which module may import which, and where."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sd3mini"
# Modules that hold model code: they infer configurations from key names, never read files.
MODEL_MODULES = ("mmdit.py", "vae.py", "text.py")
FILE_FREE = {"keys", "checks", "mmdit"}       # the sd3mini modules a model module may import


def own_imports(path: Path):
    """(module name, line, at top level) for every import of an sd3mini module in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("sd3mini")):
            name = (node.module or "").removeprefix("sd3mini.").split(".")[-1] or "__init__"
            found.append((name, node.lineno, id(node) in top))
    return found


@pytest.mark.parametrize("name", MODEL_MODULES)
def test_model_modules_import_no_file_reader(name):
    imported = {module for module, _, _ in own_imports(PACKAGE / name)}
    assert imported <= FILE_FREE, f"{name} imports {sorted(imported - FILE_FREE)}"


def test_own_imports_sees_nested_and_relative_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from .keys import a\n\ndef f():\n    from ..checkpoint import b\n")
    assert own_imports(path) == [("keys", 1, True), ("checkpoint", 4, False)]
