"""An independent client: diffusers reads what sd3mini writes (and the other way round), same outputs."""

import json

import pytest
import torch
from helpers import GOLDEN, Golden

import sd3mini
from sd3mini.convert import mmdit_diffusers_config, save_diffusers, vae_diffusers_config
from sd3mini.loading import save_single_file

diffusers = pytest.importorskip("diffusers")


def diffusers_forward(model, g, case="forward"):
    with torch.no_grad():
        return model(hidden_states=g.input(case, "x"), encoder_hidden_states=g.input(case, "context"),
                     pooled_projections=g.input(case, "y"), timestep=g.input(case, "t")).sample


def ours_forward(model, g, case="forward"):
    with torch.no_grad():
        return model(g.input(case, "x"), g.input(case, "t"), y=g.input(case, "y"), context=g.input(case, "context"))


@pytest.mark.parametrize("name", ["mmdit_sd3", "mmdit_sd35m"])
def test_diffusers_reads_our_single_file(name, tmp_path):
    g = Golden(name)
    ours = sd3mini.load_mmdit(g.state_dict)
    save_single_file(tmp_path / "model.safetensors", mmdit=ours, vae=sd3mini.load_vae(GOLDEN / "vae.safetensors"))
    config_dir = tmp_path / "config"
    (config_dir / "transformer").mkdir(parents=True)
    (config_dir / "transformer" / "config.json").write_text(json.dumps(mmdit_diffusers_config(ours.config)))
    theirs = diffusers.SD3Transformer2DModel.from_single_file(
        str(tmp_path / "model.safetensors"), config=str(config_dir), subfolder="transformer", local_files_only=True)
    torch.testing.assert_close(diffusers_forward(theirs, g), g.output("forward", "out"), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(diffusers_forward(theirs, g), ours_forward(ours, g), atol=1e-5, rtol=1e-5)


def test_diffusers_reads_our_vae(tmp_path):
    g = Golden("vae")
    ours = sd3mini.load_vae(g.state_dict)
    save_single_file(tmp_path / "model.safetensors", vae=ours, mmdit=sd3mini.load_mmdit(GOLDEN / "mmdit_sd3.safetensors"))
    (tmp_path / "config" / "vae").mkdir(parents=True)
    (tmp_path / "config" / "vae" / "config.json").write_text(json.dumps(vae_diffusers_config(ours.config)))
    theirs = diffusers.AutoencoderKL.from_single_file(
        str(tmp_path / "model.safetensors"), config=str(tmp_path / "config"), subfolder="vae", local_files_only=True)
    with torch.no_grad():
        decoded = theirs.decode(g.input("decode", "z")).sample
        moments = theirs.encoder(g.input("encode", "image"))
    torch.testing.assert_close(decoded, g.output("decode", "image"), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(moments, g.output("encode", "moments"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mmdit_sd3", "mmdit_sd35m"])
def test_diffusers_folder_both_ways(name, tmp_path):
    """Our diffusers folder loads in diffusers; a folder diffusers writes loads in sd3mini."""
    g = Golden(name)
    ours = sd3mini.load_mmdit(g.state_dict)
    vae = sd3mini.load_vae(GOLDEN / "vae.safetensors")
    save_diffusers(tmp_path / "ours", mmdit=ours, vae=vae)
    theirs = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "ours" / "transformer")
    torch.testing.assert_close(diffusers_forward(theirs, g), g.output("forward", "out"), atol=1e-4, rtol=1e-4)
    their_vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours" / "vae")
    z = Golden("vae").input("decode", "z")
    with torch.no_grad():
        torch.testing.assert_close(their_vae.decode(z).sample, vae.decode(z), atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs" / "transformer")
    back = sd3mini.load_mmdit(tmp_path / "theirs" / "transformer")
    assert back.config == ours.config
    torch.testing.assert_close(ours_forward(back, g), g.output("forward", "out"), atol=1e-4, rtol=1e-4)
