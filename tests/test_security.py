"""sd3mini never runs code from a weights or tokenizer folder (issue: remote code in tokenizer folders)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import save_hub_layout

from sd3mini.text import clip_tokenizer

EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("code from the folder ran")   # transformers runs a copy elsewhere
from transformers import CLIPTokenizer


class EvilTokenizer(CLIPTokenizer):
    pass
'''


def evil_folder(path):
    """A working tokenizer folder whose tokenizer_config.json maps AutoTokenizer to its own evil.py."""
    clip_tokenizer().save_pretrained(path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    config_path.write_text(json.dumps(config))
    (path / "evil.py").write_text(EVIL.format(marker=str(path / "MARKER")))
    return path


def run_with_yes(code: str, tmp_path):
    """Run ``code`` in a fresh interpreter with 'y' answered to any prompt on stdin (transformers' copies
    of remote code go to a temporary folder)."""
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    return subprocess.run([sys.executable, "-c", code], input="y\ny\n", capture_output=True, text=True,
                          timeout=120, env=env)


def test_the_folder_really_runs_code_when_trusted(tmp_path):
    """The control: transformers does run this folder's code when told to trust it, so the tests below
    would see the marker if sd3mini let transformers near it."""
    folder = evil_folder(tmp_path / "tok")
    done = run_with_yes(f"from transformers import AutoTokenizer\n"
                        f"AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (folder / "MARKER").exists()


@pytest.mark.parametrize("layout", ["t5 folder", "diffusers tokenizer_3", "diffusers tokenizer"])
def test_a_tokenizer_folder_with_code_is_refused(tmp_path, layout):
    if layout == "t5 folder":
        root = folder = evil_folder(tmp_path / "tok")
    else:
        root = tmp_path / "diffusers"
        clip_tokenizer().save_pretrained(root / "tokenizer")
        clip_tokenizer().save_pretrained(root / "tokenizer_3")
        folder = evil_folder(root / layout.split()[1])
    done = run_with_yes(f"from sd3mini.sources import tokenizer_for\ntokenizer_for({str(root)!r}, need_t5=True)", tmp_path)
    assert not (folder / "MARKER").exists()
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "asks to run Python code from its folder (auto_map)" in last
    assert str(folder / "tokenizer_config.json") in last


def test_the_cli_refuses_a_tokenizer_folder_with_code(tmp_path):
    folder = evil_folder(tmp_path / "tok")
    model = save_hub_layout(tmp_path / "hub")
    done = subprocess.run([sys.executable, "-m", "sd3mini", "generate", "a fox", "--ckpt", str(model),
                           "--tokenizer", str(folder), "-o", str(tmp_path / "x.png"), "--steps", "1"],
                          input="y\ny\n", capture_output=True, text=True, timeout=300,
                          env=os.environ | {"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert not (folder / "MARKER").exists()
    assert done.returncode == 1, done.stderr[-2000:]           # a file that fails, not a bad option
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "auto_map" in done.stderr
    assert not (tmp_path / "x.png").exists()
