"""The official checkpoints' keys and shapes, built on the meta device from inferred configurations."""

import json

import pytest
import torch
from helpers import MANIFESTS

import sd3mini
from sd3mini.loading import mmdit_state_dict, text_encoder_state_dict, vae_state_dict
from sd3mini.text import CLIPTextEncoder, T5TextEncoder


def manifest(name):
    """The manifest as a state dict of meta tensors (shapes only, nothing allocated)."""
    return {k: torch.empty(v, device="meta") for k, v in json.loads((MANIFESTS / f"{name}.json").read_text()).items()}


def shapes(module, prefix=""):
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


PRESETS = {"sd3_medium": sd3mini.MMDiTConfig.sd3_medium(), "sd3.5_large": sd3mini.MMDiTConfig.sd3_5_large(),
           "sd3.5_medium": sd3mini.MMDiTConfig.sd3_5_medium()}
PARAMS = {"sd3_medium": 2_028_328_000, "sd3.5_large": 8_056_627_520, "sd3.5_medium": 2_243_171_520}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_mmdit_manifest(name):
    for file in (f"{name}_mmdit", name):                 # MM-DiT alone, and the single file with the VAE
        sd = manifest(file)
        cfg = sd3mini.MMDiTConfig.from_state_dict(sd)
        assert cfg == PRESETS[name]
        with torch.device("meta"):
            model = sd3mini.MMDiT(cfg)
        expected = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("model.diffusion_model.")}
        assert shapes(model, "model.diffusion_model.") == expected
        assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
        assert len(mmdit_state_dict(sd)) == len(expected)


@pytest.mark.parametrize("name", ["sd3_medium", "sd3.5_large", "sd3.5_medium", "vae"])
def test_vae_manifest(name):
    sd = manifest(name)
    cfg = sd3mini.VAEConfig.from_state_dict(vae_state_dict(sd))
    assert cfg == sd3mini.VAEConfig()
    with torch.device("meta"):
        vae = sd3mini.SDVAE()
    expected = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("first_stage_model.")}
    assert shapes(vae, "first_stage_model.") == expected
    assert sum(p.numel() for p in vae.parameters()) == 83_819_683


@pytest.mark.parametrize("kind,params", [("clip_l", 123_650_304), ("clip_g", 694_659_840)])
def test_clip_manifest(kind, params):
    sd = manifest(f"text_encoder_{kind}")
    cfg = CLIPTextEncoder.config_from_state_dict(text_encoder_state_dict(sd, kind), kind)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == \
        {"clip_l": (12, 768, 12, 3072), "clip_g": (32, 1280, 20, 5120)}[kind]
    assert cfg.hidden_act == {"clip_l": "quick_gelu", "clip_g": "gelu"}[kind]
    with torch.device("meta"):
        enc = CLIPTextEncoder(cfg, projected=kind == "clip_g")
    assert shapes(enc.transformer) == {k: tuple(v.shape) for k, v in sd.items()}
    assert sum(p.numel() for p in enc.parameters()) == params


def test_t5_manifest():
    sd = manifest("text_encoder_t5xxl")
    tsd = text_encoder_state_dict(sd, "t5xxl")
    cfg = T5TextEncoder.config_from_state_dict(tsd)
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.vocab_size) == \
        (24, 4096, 64, 64, 10240, 32128)
    with torch.device("meta"):
        enc = T5TextEncoder(cfg)
    ours = shapes(enc.transformer)
    ours.pop("shared.weight")                           # the same tensor as encoder.embed_tokens.weight
    assert ours == {k: tuple(v.shape) for k, v in sd.items()}
    assert sum(p.numel() for p in enc.parameters()) == 4_762_310_656   # the tied embedding counted once
