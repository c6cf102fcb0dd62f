"""The package as Colab gets it: a wheel installed into a venv outside the checkout, run from another folder.

Chapter 0 runs whole and chapter 15's cells that read the measured results run, with nothing from the
checkout on the path: the tiny model and the results must come from the installed package.
"""

import ast
import importlib.util
import json
import os
import re
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from helpers import definitions

ROOT = Path(__file__).resolve().parents[1]


def code_cells(notebook: str, keep=lambda index, sources: True) -> str:
    """The notebook's code cells (those ``keep`` accepts) as one script, and of the others their
    definitions (imports, functions, classes, constants: a later cell may call them); IPython magics
    become no-ops."""
    cells = json.loads((ROOT / "notebooks" / notebook).read_text())["cells"]
    every = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    sources = [source if keep(i, every) else ast.unparse(definitions(source)) for i, source in enumerate(every)]
    def no_magic(line):
        stripped = line.lstrip()
        magic = re.match(r"%{1,2}[A-Za-z]", stripped)          # %pip, %%time; not "% (a, b)"
        return line[: len(line) - len(stripped)] + "pass  # " + stripped if magic else line

    lines = [no_magic(line) for source in sources for line in source.splitlines()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv with the wheel of this checkout installed; its dependencies come from the test's own env."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the sources, so no build/ left in the checkout can slip stale files into it.
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "sd3mini", src / "sd3mini", ignore=shutil.ignore_patterns("__pycache__"))
    # Python 3.12+ venvs have no setuptools: then pip builds in its own isolated environment.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
                    "-w", str(tmp / "dist"), str(src)], check=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("sd3mini-*.whl"))
    venv.create(tmp / "venv", with_pip=True)
    python = tmp / "venv" / "bin" / "python"
    # torch, transformers, matplotlib… come from this test's environment, listed in a .pth file: its folders
    # join sys.path after the venv's own, and the .pth files inside them (the editable install of this
    # checkout) are not run, so `import sd3mini` can only find the wheel.
    new_site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    Path(new_site, "outer_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, cwd=tmp)
    workdir = tmp / "content"                           # Colab's /content: no notebooks/, no data/
    workdir.mkdir()
    return python, workdir


def run_script(installed, script: str):
    python, workdir = installed
    # As on a Colab CPU runtime: no GPU, no token, no local weights (chapter 0 then prints its skip line).
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "SD3MINI_WEIGHTS")}
    env |= {"MPLBACKEND": "Agg", "PYTHONPATH": "", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "HF_HOME": str(workdir / "hf-home")}
    return subprocess.run([str(python), "-c", script], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_installed_package_is_the_wheel(installed):
    out = run_script(installed, "import sd3mini; print(sd3mini.__file__)")
    assert out.returncode == 0, out.stderr
    assert str(ROOT) not in out.stdout and "/venv/" in out.stdout, out.stdout


def test_chapter_0_runs_from_the_wheel(installed):
    out = run_script(installed, code_cells("00_tour.ipynb"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Skipped (needs the official sd3_medium weights on a GPU)" in out.stdout


def reads_results(source: str) -> bool:
    return "load_json(" in source or "data_path(" in source


@pytest.mark.parametrize("notebook", ["15_training.ipynb", "16_paper_at_toy_scale.ipynb",
                                      "17_training_experiments.ipynb"])
def test_chapters_read_their_results_from_the_wheel(installed, notebook):
    """The setup cell, then every cell from the first that reads a results file to the end (chapter 15's
    live training loop before it is left out: it reads nothing)."""
    def keep(i, sources):
        first = next(j for j, source in enumerate(sources) if reads_results(source))
        return i == 0 or i >= first

    script = code_cells(notebook, keep)
    assert script.count("load_json(") >= 1, f"{notebook} no longer reads its results through sd3mini.book"
    out = run_script(installed, script + "print('all cells ran')\n")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "all cells ran" in out.stdout
