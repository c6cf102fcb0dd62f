"""The diffusers layout <-> the official layout, for the MM-DiT and the VAE, so diffusers folders load.

One rule per official key gives its diffusers name(s) and how the tensor changes:
    "copy"     the same tensor under another name
    "qkv"      one fused [q; k; v] tensor <-> three tensors (diffusers' to_q, to_k, to_v)
    "swap"     (shift | scale) <-> (scale | shift): diffusers stores the final adaLN halves swapped
    "conv1x1"  a (C, C, 1, 1) convolution <-> a (C, C) linear layer (VAE attention)
The same rules serve both directions, so reading and writing diffusers folders cannot disagree.

Loading uses only the diffusers -> official direction. The writers (``*_to_diffusers``,
``*_diffusers_config``, ``save_diffusers``) are round-trip utilities for the tests, which check
that sd3mini reads what it writes and what diffusers itself reads.
"""

import json
import re
from pathlib import Path

import torch

from .checkpoint import LazyTensor, materialize, save_state_dict
from .flow import LATENT_SCALE, LATENT_SHIFT
from .mmdit import MMDiT, MMDiTConfig
from .vae import SDVAE, VAEConfig

# --------------------------------------------------------------------------------------------------
# MM-DiT
# --------------------------------------------------------------------------------------------------
_MMDIT_STATIC = {
    "pos_embed": "pos_embed.pos_embed",
    "x_embedder.proj.": "pos_embed.proj.",
    "t_embedder.mlp.0.": "time_text_embed.timestep_embedder.linear_1.",
    "t_embedder.mlp.2.": "time_text_embed.timestep_embedder.linear_2.",
    "y_embedder.mlp.0.": "time_text_embed.text_embedder.linear_1.",
    "y_embedder.mlp.2.": "time_text_embed.text_embedder.linear_2.",
    "context_embedder.": "context_embedder.",
    "final_layer.linear.": "proj_out.",
    "final_layer.adaLN_modulation.1.": "norm_out.linear.",
}
# (official suffix, diffusers name in the image stream, in the context stream)
_MMDIT_BLOCK = [
    ("attn.qkv.", ("attn.to_q.", "attn.to_k.", "attn.to_v."), ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj.")),
    ("attn2.qkv.", ("attn2.to_q.", "attn2.to_k.", "attn2.to_v."), None),
    ("attn.proj.", "attn.to_out.0.", "attn.to_add_out."),
    ("attn2.proj.", "attn2.to_out.0.", None),
    ("attn.ln_q.", "attn.norm_q.", "attn.norm_added_q."),
    ("attn.ln_k.", "attn.norm_k.", "attn.norm_added_k."),
    ("attn2.ln_q.", "attn2.norm_q.", None),
    ("attn2.ln_k.", "attn2.norm_k.", None),
    ("adaLN_modulation.1.", "norm1.linear.", "norm1_context.linear."),
    ("mlp.fc1.", "ff.net.0.proj.", "ff_context.net.0.proj."),
    ("mlp.fc2.", "ff.net.2.", "ff_context.net.2."),
]


def mmdit_diffusers_names(key: str, depth: int) -> tuple[list[str], str]:
    """Official MM-DiT key -> (diffusers keys, how)."""
    for old, new in _MMDIT_STATIC.items():
        if key.startswith(old):
            how = "swap" if old == "final_layer.adaLN_modulation.1." else "copy"
            return [new + key[len(old):]], how
    i, stream, rest = re.match(r"joint_blocks\.(\d+)\.(context_block|x_block)\.(.*)", key).groups()
    context = stream == "context_block"
    for old, x_name, ctx_name in _MMDIT_BLOCK:
        if rest.startswith(old):
            new, leaf = (ctx_name if context else x_name), rest[len(old):]
            names = [f"transformer_blocks.{i}.{n}{leaf}" for n in (new if isinstance(new, tuple) else (new,))]
            if len(names) == 3:
                return names, "qkv"
            last_context = context and int(i) == depth - 1 and old == "adaLN_modulation.1."
            return names, "swap" if last_context else "copy"
    raise KeyError(key)


# The tensors MMDiTConfig.from_state_dict reads, by their diffusers names (see mmdit.CONFIG_KEYS).
_MMDIT_CONFIG_KEYS = {
    "patch": "pos_embed.proj.weight",
    "pos_embed": "pos_embed.pos_embed",
    "y": "time_text_embed.text_embedder.linear_1.weight",
    "context": "context_embedder.weight",
    "blocks": "transformer_blocks.",
    "fc1": "transformer_blocks.0.ff.net.0.proj.weight",
    "ln_q": "transformer_blocks.0.attn.norm_q.weight",
    "attn2": "transformer_blocks.{}.attn2.to_q.weight",
}


def _official_shapes(model_cls, config) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in model_cls(config).state_dict().items()}


def _swap_halves(t):
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _to_official(sd, shapes: dict, names_of) -> dict:
    """Diffusers state dict -> official keys, lazily (each tensor is read when loaded)."""
    out = {}
    for key, shape in shapes.items():
        names, how = names_of(key)
        missing = [n for n in names if n not in sd]
        if missing:
            continue  # reported as a missing official key by the loader
        parts = [sd[n] for n in names]
        if how == "qkv":
            load = lambda p=parts: torch.cat([materialize(t) for t in p], dim=0)  # noqa: E731
        elif how == "swap":
            load = lambda p=parts: _swap_halves(materialize(p[0]))  # noqa: E731
        elif how == "conv1x1":
            load = lambda p=parts, s=shape: materialize(p[0]).reshape(s)  # noqa: E731
        else:
            out[key] = parts[0]
            continue
        out[key] = LazyTensor(shape, parts[0].dtype, load)
    return out


def _to_diffusers(sd: dict, names_of) -> dict[str, torch.Tensor]:
    """Official state dict (tensors) -> diffusers state dict."""
    out = {}
    for key, t in sd.items():
        names, how = names_of(key)
        if how == "qkv":
            out.update(zip(names, t.chunk(3, dim=0)))
        elif how == "swap":
            out[names[0]] = _swap_halves(t)
        elif how == "conv1x1":
            out[names[0]] = t[:, :, 0, 0]
        else:
            out[names[0]] = t
    return out


def mmdit_from_diffusers(sd) -> dict:
    """Diffusers SD3Transformer2DModel state dict -> official MM-DiT keys (lazy tensors)."""
    config = MMDiTConfig.from_state_dict(sd, _MMDIT_CONFIG_KEYS)
    return _to_official(sd, _official_shapes(MMDiT, config), lambda k: mmdit_diffusers_names(k, config.depth))


def mmdit_to_diffusers(sd: dict, config: MMDiTConfig) -> dict:
    return _to_diffusers(sd, lambda k: mmdit_diffusers_names(k, config.depth))


def mmdit_diffusers_config(config: MMDiTConfig) -> dict:
    return {
        "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": config.patch_size,
        "in_channels": config.in_channels, "out_channels": config.in_channels, "num_layers": config.depth,
        "attention_head_dim": config.head_dim, "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_in_dim, "caption_projection_dim": config.hidden_size,
        "pooled_projection_dim": config.adm_in_channels, "pos_embed_max_size": config.pos_embed_max_size,
        "dual_attention_layers": list(config.x_block_self_attn_layers),
        "qk_norm": "rms_norm" if config.qk_norm else None,
    }


# --------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------
_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_diffusers_names(key: str, levels: int) -> tuple[list[str], str]:
    """Official (LDM) VAE key -> (diffusers AutoencoderKL keys, how)."""
    part, rest = key.split(".", 1)                                   # encoder / decoder
    if rest.startswith("norm_out."):
        rest = "conv_" + rest
    if m := re.match(r"(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(.*)", rest):
        kind, i, j, layer, leaf = m.groups()
        i = int(i) if kind == "down" else levels - 1 - int(i)       # diffusers counts up_blocks from the coarsest
        return [f"{part}.{kind}_blocks.{i}.resnets.{j}.{_VAE_RESNET.get(layer, layer)}.{leaf}"], "copy"
    if m := re.match(r"(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(.*)", rest):
        kind, i, sampler, leaf = m.groups()
        i = int(i) if kind == "down" else levels - 1 - int(i)
        return [f"{part}.{kind}_blocks.{i}.{sampler}rs.0.conv.{leaf}"], "copy"
    if m := re.match(r"mid\.block_(\d)\.(.*)", rest):
        return [f"{part}.mid_block.resnets.{int(m.group(1)) - 1}.{m.group(2)}"], "copy"
    if m := re.match(r"mid\.attn_1\.(\w+)\.(.*)", rest):
        layer, leaf = m.groups()
        how = "conv1x1" if layer != "norm" and leaf == "weight" else "copy"
        return [f"{part}.mid_block.attentions.0.{_VAE_ATTN[layer]}.{leaf}"], how
    return [f"{part}.{rest}"], "copy"                                # conv_in, conv_out, conv_norm_out


# The tensors VAEConfig.from_state_dict reads, by their diffusers names (see vae.CONFIG_KEYS).
_VAE_CONFIG_KEYS = {
    "conv_in": "encoder.conv_in.weight",
    "levels": "encoder.down_blocks.",
    "blocks": "encoder.down_blocks.0.resnets.",
    "conv1": "encoder.down_blocks.{}.resnets.0.conv1.weight",
    "z": "decoder.conv_in.weight",
}


def vae_from_diffusers(sd) -> dict:
    """Diffusers AutoencoderKL state dict -> official (LDM) VAE keys (lazy tensors)."""
    config = VAEConfig.from_state_dict(sd, _VAE_CONFIG_KEYS)
    return _to_official(sd, _official_shapes(SDVAE, config), lambda k: vae_diffusers_names(k, len(config.ch_mult)))


def vae_to_diffusers(sd: dict, config: VAEConfig) -> dict:
    return _to_diffusers(sd, lambda k: vae_diffusers_names(k, len(config.ch_mult)))


def vae_diffusers_config(config: VAEConfig) -> dict:
    levels = len(config.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "in_channels": config.in_channels, "out_channels": config.in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config.ch * m for m in config.ch_mult], "layers_per_block": config.num_res_blocks,
        "act_fn": "silu", "latent_channels": config.z_channels, "norm_num_groups": 32, "sample_size": 1024,
        "scaling_factor": LATENT_SCALE, "shift_factor": LATENT_SHIFT, "latents_mean": None, "latents_std": None,
        "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


def is_diffusers_mmdit(sd) -> bool:
    return "pos_embed.proj.weight" in sd and "transformer_blocks.0.attn.to_q.weight" in sd


def is_diffusers_vae(sd) -> bool:
    return "encoder.down_blocks.0.resnets.0.conv1.weight" in sd


# --------------------------------------------------------------------------------------------------
# Writing a diffusers folder (a test utility: loading never writes)
# --------------------------------------------------------------------------------------------------
def save_diffusers(path, mmdit=None, vae=None, clip_l=None, clip_g=None, t5=None, tokenizer=None, dtype=None):
    """Write models in the diffusers folder layout (``transformer/``, ``vae/``, ``text_encoder*/``, ...),
    so tests can load them back with sd3mini and with diffusers."""
    path = Path(path)
    cast = (lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t)  # noqa: E731

    def write(folder, sd, config, weights="diffusion_pytorch_model.safetensors"):
        (path / folder).mkdir(parents=True, exist_ok=True)
        save_state_dict({k: cast(v) for k, v in sd.items()}, path / folder / weights)
        (path / folder / "config.json").write_text(json.dumps(config, indent=2))

    index = {"_class_name": "StableDiffusion3Pipeline"}
    if mmdit is not None:
        write("transformer", mmdit_to_diffusers(mmdit.state_dict(), mmdit.config), mmdit_diffusers_config(mmdit.config))
        index["transformer"] = ["diffusers", "SD3Transformer2DModel"]
    if vae is not None:
        write("vae", vae_to_diffusers(vae.state_dict(), vae.config), vae_diffusers_config(vae.config))
        index["vae"] = ["diffusers", "AutoencoderKL"]
    for folder, enc in (("text_encoder", clip_l), ("text_encoder_2", clip_g), ("text_encoder_3", t5)):
        if enc is not None:
            sd = enc.transformer.state_dict()
            sd.pop("encoder.embed_tokens.weight", None)              # tied to shared.weight
            config = enc.transformer.config.to_dict()
            write(folder, sd, config, "model.safetensors")
            index[folder] = ["transformers", type(enc.transformer).__name__]
    if tokenizer is not None:
        tokenizer.clip.save_pretrained(path / "tokenizer")
        tokenizer.clip.save_pretrained(path / "tokenizer_2")
        if tokenizer.t5 is not None:
            tokenizer.t5.save_pretrained(path / "tokenizer_3")
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
