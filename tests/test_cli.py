"""python -m sd3mini info / generate."""

import json

import pytest
from helpers import GOLDEN, MANIFESTS, sparse_checkpoint, tiny_mmdit, tiny_text_encoders
from PIL import Image

import sd3mini
from sd3mini.cli import main
from sd3mini.loading import save_single_file


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny_incl_clips.safetensors"
    encs = tiny_text_encoders()
    save_single_file(path, mmdit=tiny_mmdit(), vae=sd3mini.load_vae(GOLDEN / "vae.safetensors"),
                     clip_l=encs["clip_l"], clip_g=encs["clip_g"], t5xxl=encs["t5xxl"])
    return path


def test_info(tiny_file, capsys):
    main(["info", str(tiny_file)])
    out = capsys.readouterr().out
    assert "MMDiT: custom" in out and "depth 2, hidden 128, heads 2" in out and "max 128 px" in out
    assert "VAE:" in out and "ch_mult [1, 2, 1, 1]" in out
    for kind in ("clip_l", "clip_g", "t5xxl"):
        assert f"text encoder {kind}" in out


@pytest.mark.parametrize("name,expected", [("sd3_medium", "sd3_medium, 2.028 B"), ("sd3.5_large", "sd3.5_large, 8.057 B"),
                                           ("sd3.5_medium", "sd3.5_medium, 2.243 B")])
def test_info_reads_only_the_header(name, expected, tmp_path, capsys):
    """A full-size official file (4-16 GB, stored sparse) is described from its header in no time."""
    path = tmp_path / f"{name}.safetensors"
    sparse_checkpoint(path, json.loads((MANIFESTS / f"{name}.json").read_text()))
    main(["info", str(path)])
    out = capsys.readouterr().out
    assert f"MMDiT: {expected} parameters" in out and "VAE: 83.8 M parameters" in out and "float16" in out


def test_generate(tiny_file, tmp_path, capsys):
    out = tmp_path / "out.png"
    main(["generate", "a red circle", "--ckpt", str(tiny_file), "--no-t5", "--width", "64", "--height", "48",
          "--steps", "2", "--seed", "7", "--device", "cpu", "-o", str(out)])
    assert "seed 7" in capsys.readouterr().out
    image = Image.open(out)
    assert image.size == (64, 48)
    assert "prompt: 'a red circle'" in image.text["parameters"] and "seed: 7" in image.text["parameters"]
