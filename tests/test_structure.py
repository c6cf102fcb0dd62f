"""The package's shape, as the house rules state it: which module may import which, and where."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sd3mini"
# Modules that hold model code: they infer configurations from key names, never read files.
MODEL_MODULES = ("mmdit.py", "vae.py", "text.py")
FILE_FREE = {"keys", "checks", "mmdit"}       # the sd3mini modules a model module may import


def top_level(tree) -> set:
    """The ids of a module's top-level statements; a module-level ``try:`` (Ctrl-C while torch loads, an
    optional fcntl) counts as top level."""
    top = set()
    for node in tree.body:
        top |= {id(n) for n in ast.walk(node)} if isinstance(node, ast.Try) else {id(node)}
    return top


def own_imports(path: Path):
    """(module name, line, at top level) for every import of an sd3mini module in ``path``."""
    tree = ast.parse(path.read_text())
    top = top_level(tree)
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


def test_the_cli_has_no_toy_special_case():
    """The pipeline says how it is shown (``upscale``, ``quiet_evaluations``); the CLI asks no model name."""
    source = (PACKAGE / "cli.py").read_text()
    assert '== "toy"' not in source and '!= "toy"' not in source


def test_a_single_file_load_reads_each_header_once(monkeypatch, tmp_path):
    """SD3Pipeline.from_single_file on a file with bundled text encoders: its header is read once (it
    was read 11 times: the MM-DiT check, each component's configuration, check and load)."""
    from helpers import tiny_pipeline, tiny_t5_tokenizer, tiny_text_encoders

    import sd3mini
    from sd3mini import checkpoint
    from sd3mini.loading import save_single_file

    pipe, encoders = tiny_pipeline(), tiny_text_encoders()
    path = tmp_path / "bundled.safetensors"
    save_single_file(path, mmdit=pipe.mmdit, vae=pipe.vae, **{k: encoders[k] for k in ("clip_l", "clip_g", "t5xxl")})
    reads = []
    real = checkpoint.read_header
    monkeypatch.setattr(checkpoint, "read_header", lambda p: reads.append(str(p)) or real(p))
    sd3mini.SD3Pipeline.from_single_file(path, tokenizer=sd3mini.SD3Tokenizer(t5=tiny_t5_tokenizer()),
                                         device="cpu")
    assert reads == [str(path)]


def lazy_imports(path: Path):
    """(line, source line, the line above) for every import that is not at the top of a module."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    top = top_level(tree)
    return [(n.lineno, lines[n.lineno - 1], lines[n.lineno - 2]) for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_imports_own_modules_and_lazy_ones_say_why(path):
    """``import sd3mini`` loads the package's modules: none is imported inside a function. A heavy optional
    dependency imported where it is used (transformers, huggingface_hub) says why, on its line or above (a
    group of imports: above the first)."""
    own = [line for line, _, top in own_imports(path) if not top]
    assert not own, f"{path.name} imports sd3mini modules inside functions, lines {own}"
    said = ("#", "from ", "import ")
    silent = [line for line, text, above in lazy_imports(path) if "#" not in text and not above.strip().startswith(said)]
    assert not silent, f"{path.name}: lazy imports without a reason, lines {silent}"


def test_each_file_is_a_few_screens():
    """No module over 450 lines; the pipeline, which only assembles and runs, at most 350."""
    lengths = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert lengths["pipeline.py"] <= 350
    assert not {name: n for name, n in lengths.items() if n > 450}
