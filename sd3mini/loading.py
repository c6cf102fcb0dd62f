"""Loading the official weights: single files, standalone text encoders, diffusers folders, the Hub.

Every loader follows the same three steps:
  1. read the header and select the model's keys (strip a prefix, or convert diffusers names),
  2. infer the configuration from the shapes and build the model on the meta device (no memory),
  3. read each tensor, cast it to the target dtype and device, and ``load_state_dict(assign=True)``.
So a 2B-parameter model loaded in bf16 never exists in float32 or twice on the host.
"""

import contextlib
import ctypes
import gc
import os
import re
import warnings
from collections import Counter
from functools import lru_cache

import torch

from .checkpoint import CheckpointError, LazyTensor, describe_checkpoint, materialize, save_state_dict, state_dict_of
from .convert import is_diffusers_mmdit, is_diffusers_vae, mmdit_from_diffusers, vae_from_diffusers
from .keys import select
from .mmdit import MMDiT, MMDiTConfig
from .text import CLIP_SHAPES, CLIPTextEncoder, T5TextEncoder, clip_shape
from .vae import SDVAE, VAEConfig

MMDIT_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "text_encoders.{}.transformer."
TEXT_ENCODERS = ("clip_l", "clip_g", "t5xxl")
# Keys some files carry that no sd3mini module needs; dropped without a warning.
_HARMLESS = re.compile(r"(.*position_ids|.*\.logit_scale|model_sampling\..*|loss\..*)$")


def _most_common_float_dtype(sd: dict):
    counts = Counter(v.dtype for v in sd.values() if isinstance(v.dtype, torch.dtype) and v.dtype.is_floating_point)
    return counts.most_common(1)[0][0] if counts else torch.float32


def build(make, sd: dict, *, what: str, device=None, dtype=None, all_keys=None,
          meta: bool = True) -> torch.nn.Module:
    """Build ``make()`` on the meta device and fill it from ``sd`` one tensor at a time, so the host
    never holds the model twice.

    ``dtype=None`` keeps the checkpoint's dtype. Missing keys and shape mismatches raise
    a CheckpointError that says what the file looks like; unknown keys get one warning.
    ``meta=False`` builds on the CPU instead, which starts faster for models of a few MB (the meta
    device's initializers import ``torch._dynamo``; timings in benchmarks/RESULTS.md).
    """
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = make()
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        looks = describe_checkpoint(all_keys if all_keys is not None else sd)
        hint = " If the file is complete, it may be a different model." if len(missing) < len(expected) else ""
        raise CheckpointError(f"this is not a complete {what}: missing {shown}. The file looks like {looks}.{hint}")
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"shape mismatch loading {what}: " + "; ".join(wrong[:5]))
    unknown = sorted(k for k in sd if k not in expected and not _HARMLESS.match(k))
    if unknown:
        warnings.warn(f"{what}: ignored {len(unknown)} unknown keys, e.g. {', '.join(unknown[:3])}", stacklevel=3)

    dtype = dtype or _most_common_float_dtype({k: sd[k] for k in expected})
    tensors = {}
    for key in expected:
        t = materialize(sd[key])
        if t.is_floating_point():
            t = t.to(device=device or "cpu", dtype=dtype)
        t = t.to(device or "cpu")
        if (expected[key].dtype, expected[key].device) == (t.dtype, t.device):
            expected[key].copy_(t)      # built on the CPU: into the module's own tensor, never a second copy
            continue
        if t.device.type == "cpu" and t.data_ptr() % 64:
            # A view into a memory map at the file's byte offset (a state dict the
            # caller read with safetensors; sd3mini's own reads are aligned). CPU
            # kernels take other SIMD paths on unaligned data and round differently
            # (~1e-6), so the same weights would give slightly different outputs
            # depending on the file's layout: copy to aligned memory.
            t = t.clone()
        tensors[key] = t
    model.load_state_dict(tensors, assign=True, strict=False)   # the keys were checked above
    if hasattr(model, "init_non_persistent"):
        model.init_non_persistent()
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# The three model types
# --------------------------------------------------------------------------------------------------
def mmdit_state_dict(sd: dict) -> dict:
    """The MM-DiT part of any supported layout, under official names without prefix."""
    if any(k.startswith(MMDIT_PREFIX + "joint_blocks.") for k in sd):
        return select(sd, MMDIT_PREFIX)
    if any(k.startswith("joint_blocks.") for k in sd):
        return {k: v for k, v in sd.items() if not k.startswith(("first_stage_model.", "text_encoders."))}
    if is_diffusers_mmdit(sd):
        return mmdit_from_diffusers(sd)
    raise CheckpointError(f"no SD3 MMDiT in this file; it looks like {describe_checkpoint(sd)}.")


def vae_state_dict(sd: dict) -> dict:
    """The VAE part of any supported layout, under official names without prefix."""
    if any(k.startswith(VAE_PREFIX + "encoder.") for k in sd):
        return select(sd, VAE_PREFIX)
    if "encoder.down.0.block.0.conv1.weight" in sd:
        return sd
    if is_diffusers_vae(sd):
        return vae_from_diffusers(sd)
    raise CheckpointError(f"no SD3 VAE in this file; it looks like {describe_checkpoint(sd)}.")


def text_encoder_state_dict(sd: dict, kind: str) -> dict:
    """The ``kind`` text encoder under Hugging Face names (standalone files use them as they are)."""
    if kind not in TEXT_ENCODERS:
        raise ValueError(f"kind must be one of {TEXT_ENCODERS}, got {kind!r}")
    bundled = TEXT_PREFIX.format(kind)
    if any(k.startswith(bundled) for k in sd):
        sd = select(sd, bundled)
    if kind == "t5xxl":
        emb = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
        if emb is None or not any(k.startswith("encoder.block.") for k in sd):
            raise CheckpointError(f"no T5 encoder in this file; it looks like {describe_checkpoint(sd)}.")
        if any(k.endswith(".scale_weight") for k in sd) or "scaled_fp8" in sd:
            raise CheckpointError("scaled-fp8 T5 files are not supported; use t5xxl_fp16.safetensors")
        sd = {**sd, "shared.weight": emb, "encoder.embed_tokens.weight": emb}   # one tensor, two names
    else:
        if "text_model.embeddings.token_embedding.weight" not in sd:
            raise CheckpointError(f"no CLIP text encoder in this file; it looks like {describe_checkpoint(sd)}.")
        if "text_projection.weight" not in sd and kind == "clip_l":
            # Some clip_l files lack the projection; SD3 does not use CLIP-L's, so identity is fine.
            w = sd["text_model.embeddings.token_embedding.weight"].shape[1]
            sd = {**sd, "text_projection.weight": LazyTensor((w, w), torch.float32, lambda: torch.eye(w))}
    return sd


def _clip_words(shape: dict) -> str:
    name = CLIP_SHAPES[shape["kind"]]["name"] if shape["kind"] else "a CLIP text encoder"
    return f"{name} (width {shape['width']}, {shape['layers']} layers)"


def _where(src) -> str:
    return f"{src}: " if isinstance(src, (str, os.PathLike)) else ""


def check_clip_kind(sd: dict, kind: str, src=None) -> dict:
    """Refuse CLIP-G weights passed as clip_l and the other way round, naming what the file holds."""
    shape = clip_shape(sd)
    _refuse_other_clip(shape, kind, src)
    return shape


def _refuse_other_clip(shape: dict, kind: str, src=None):
    if shape["kind"] not in (None, kind):
        raise CheckpointError(f"{_where(src)}this is {_clip_words(shape)}, not {CLIP_SHAPES[kind]['name']} "
                              f"(width {CLIP_SHAPES[kind]['width']}): pass it as {shape['kind']}")


def check_text_encoders(sources: dict, mmdit_config: MMDiTConfig):
    """From the files' headers, before anything is built: each text encoder is the kind it is passed as
    (CLIP-L, CLIP-G, T5), the two CLIPs are not swapped, and their pooled widths fit the MM-DiT."""
    shapes = {}
    for kind, src in sources.items():
        try:
            sd = text_encoder_state_dict(state_dict_of(src), kind)
        except CheckpointError as e:
            raise CheckpointError(f"{src} (passed as {kind}): {e}") from None
        if kind != "t5xxl":
            shapes[kind] = clip_shape(sd)
    l, g = shapes.get("clip_l"), shapes.get("clip_g")
    if l and g and ((l["kind"], g["kind"]) == ("clip_g", "clip_l") or
                    (l["kind"] is None and g["kind"] is None and l["width"] > g["width"])):  # CLIP-L: the narrower
        raise CheckpointError(f"clip_l and clip_g are swapped: {sources['clip_l']} (passed as clip_l) is "
                              f"{_clip_words(l)} and {sources['clip_g']} (passed as clip_g) is {_clip_words(g)}; "
                              "CLIP-L is the narrower one")
    for kind, shape in shapes.items():
        _refuse_other_clip(shape, kind, sources[kind])
    if l and g and l["width"] + g["projection"] != mmdit_config.adm_in_channels:
        raise CheckpointError(f"the text encoders give a pooled vector of {l['width']} (clip_l) + {g['projection']} "
                              f"(clip_g) = {l['width'] + g['projection']} values; this MM-DiT takes "
                              f"{mmdit_config.adm_in_channels}")


def _read(src, select, config_cls, model_cls):
    """What ``build`` needs: (make, the model's state dict selected by ``select``, all the file's keys)."""
    full = state_dict_of(src)
    sd = select(full)
    config = config_cls.from_state_dict(sd)
    return (lambda: model_cls(config)), sd, full


def load_mmdit(src, *, device=None, dtype=None) -> MMDiT:
    """An MM-DiT from a path (single file, MMDiT-only file, diffusers ``transformer/`` folder or file)
    or a state dict (official keys with or without ``model.diffusion_model.``, or diffusers keys)."""
    make, sd, full = _read(src, mmdit_state_dict, MMDiTConfig, MMDiT)
    return build(make, sd, what="SD3 MMDiT", device=device, dtype=dtype, all_keys=full)


def load_vae(src, *, device=None, dtype=None) -> SDVAE:
    """The 16-channel VAE from a path or a state dict (with or without ``first_stage_model.``, or diffusers)."""
    make, sd, full = _read(src, vae_state_dict, VAEConfig, SDVAE)
    return build(make, sd, what="SD3 VAE", device=device, dtype=dtype, all_keys=full)


def load_text_encoder(src, kind: str, *, num_heads: int | None = None, device=None, dtype=None):
    """CLIP-L, CLIP-G or T5-XXL (``kind`` in clip_l, clip_g, t5xxl) from a standalone file, a bundled
    single file, a diffusers ``text_encoder*/`` folder or a state dict. ``enc(tokens) -> (hidden, pooled)``.

    ``num_heads`` defaults to width / 64 for CLIP (12 for L, 20 for G) and to the size of T5's relative
    position-bias table (64). In float16, T5's feed-forward output layers compute in
    float32 (they overflow float16) from float16 weights.
    """
    full = state_dict_of(src)
    sd = {"transformer." + k: v for k, v in text_encoder_state_dict(full, kind).items()}
    inner = {k[len("transformer."):]: v for k, v in sd.items()}
    if kind == "t5xxl":
        config = T5TextEncoder.config_from_state_dict(inner, num_heads)
        # In float16 the feed-forward outputs (wo) overflow: they compute in float32
        # from float16 weights (Float32Linear; float32 ones would add 2.0 GB to 9.5).
        fp32_wo = dtype == torch.float16
        make = lambda: T5TextEncoder(config, float32_wo=fp32_wo)  # noqa: E731
    else:
        check_clip_kind(inner, kind, src)
        config = CLIPTextEncoder.config_from_state_dict(inner, kind, num_heads)
        make = lambda: CLIPTextEncoder(config, projected=kind == "clip_g")  # noqa: E731
    return build(make, sd, what=f"{kind} text encoder", device=device, dtype=dtype,
                 all_keys=full)


def save_single_file(path, *, mmdit=None, vae=None, clip_l=None, clip_g=None, t5xxl=None, prefix: bool = True,
                     dtype=None, metadata: dict | None = None):
    """Write models in the official single-file layout (``model.diffusion_model.*``, ``first_stage_model.*``,
    ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*``). ``prefix=False`` writes a bare MM-DiT."""
    if not prefix and any(m is not None for m in (vae, clip_l, clip_g, t5xxl)):
        raise ValueError("prefix=False writes an MM-DiT alone")
    parts = [(mmdit, MMDIT_PREFIX if prefix else ""), (vae, VAE_PREFIX)]
    parts += [(enc, TEXT_PREFIX.format(kind)) for enc, kind in ((clip_l, "clip_l"), (clip_g, "clip_g"), (t5xxl, "t5xxl"))]
    sd = {}
    for module, pre in parts:
        if module is None:
            continue
        inner = module.transformer if hasattr(module, "transformer") else module
        for k, v in inner.state_dict().items():
            if k == "encoder.embed_tokens.weight":       # T5: tied to shared.weight, stored once
                continue
            sd[pre + k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    save_state_dict(sd, path, metadata=metadata)


def free_memory(device):
    """After a component is dropped: free it, and give its host memory back. glibc keeps freed
    small blocks (CLIP's tensors of a few MB) that the next component's large tensors do not
    reuse, so they stayed resident through T5's stage (benchmarks/RESULTS.md)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    if (trim := _malloc_trim()) is not None:
        trim(0)


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
