"""Argument checks at the package's boundary (the CLI, ``SD3Pipeline.__call__``, ``sample``, the loaders).

Each helper checks one kind of value and raises an ``ArgumentError`` whose message names the argument,
the value it got and what is allowed, before any model is built or any step runs. ``ArgumentError`` is a
``ValueError``: code that catches ValueError keeps working; the CLI exits 2 on it (a usage error).
"""

import argparse
import math
from numbers import Integral, Real

import torch

# What torch.Generator.manual_seed accepts, less the negatives: it takes -s as 2**64 - s, so seed -1 and
# 2**64 - 1 would be the same image. Image i of a batch uses seed + i, so the last must fit too.
SEED_MIN, SEED_MAX = 0, 2**64 - 1
# Guidance and shift far past any use (SD3 samples at cfg 1-7 and shift 1-6): the guided x0 grows with cfg
# until the picture is saturated colour, and at 1e30 it overflows float32; shift s moves the middle of the
# schedule to sigma s / (1 + s), which 0.01 and 100 already put within 1 % of the data or of the noise (and
# 1e-300 gives 0 / 0 in float32).
CFG_MAX = 100.0
SHIFT_MIN, SHIFT_MAX = 0.01, 100.0


class ArgumentError(ValueError):
    """An argument outside what is allowed; the message says which, what it was and what is allowed."""


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (not a bool, not a float such as 2.5 or 32.0) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ArgumentError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ArgumentError(f"{name} must be at most {maximum}, got {value}")
    return int(value)


def check_number(name: str, value, *, minimum: float | None = None, above: float | None = None,
                 maximum: float | None = None) -> float:
    """A finite real number, >= ``minimum`` / > ``above`` / <= ``maximum`` where given."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ArgumentError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value}")
    if above is not None and value <= above:
        raise ArgumentError(f"{name} must be > {above}, got {value}")
    if maximum is not None and value > maximum:
        raise ArgumentError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ArgumentError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def check_seed(seed, batch: int = 1, name: str = "seed") -> int:
    """An integer that ``torch.Generator().manual_seed`` takes, for every image: seed ... seed + batch - 1."""
    check_int(name, seed)
    if not SEED_MIN <= seed <= SEED_MAX - (batch - 1):
        raise ArgumentError(f"{name} must be in [0, 2**64 - {batch}] (what torch.Generator takes, for "
                            f"{batch} image{'s' * (batch > 1)}), got {seed}")
    return int(seed)


def check_cfg(name: str, value) -> float:
    check_number(name, value, minimum=0)
    if value > CFG_MAX:
        raise ArgumentError(f"{name} must be at most {CFG_MAX:g} (images saturate long before), got {value}")
    return value


def check_shift(name: str, value) -> float:
    check_number(name, value, above=0)
    if not SHIFT_MIN <= value <= SHIFT_MAX:
        raise ArgumentError(f"{name} must be in [{SHIFT_MIN:g}, {SHIFT_MAX:g}] (beyond, the schedule's middle is "
                            f"within 1 % of the data or of the noise), got {value}")
    return value


def check_size(width: int, height: int, multiple: int, max_size: int):
    """Width and height: integers, multiples of ``multiple``, in [multiple, max_size]; a refusal names the
    nearest valid sizes."""
    for name, v in (("width", width), ("height", height)):
        _check_side(name, v, multiple, max_size)


def _check_side(name: str, v, multiple: int, max_size: int, image: str = ""):
    """One side; ``image`` describes the init image when the side is its size (no width or height given)."""
    check_int(name, v)
    if v < multiple:
        raise ArgumentError(f"{name} must be at least {multiple}, got {v}")
    if v > max_size:
        raise ArgumentError(f"{image or f'{name} {v}'} is larger than this model supports: the maximum is "
                            f"{max_size} pixels" + ("; pass width and height, or a smaller image" if image else ""))
    if v % multiple:                                  # both neighbours are valid: max_size is a multiple too
        lo = v // multiple * multiple
        raise ArgumentError(f"{name} {v} is not a multiple of {multiple}; the nearest valid sizes are {lo} and "
                            f"{lo + multiple}")


def output_size(width, height, init_size, *, multiple: int, max_size: int, default: int) -> tuple[int, int]:
    """The image size (w, h): as given; a side not given is the init image's (``init_size``, rounded down
    to ``multiple``), else ``default`` (height: the width). Checked against the model's rules."""
    if init_size is None:
        width = width if width is not None else default
        check_size(width, height if height is not None else width, multiple, max_size)
        return width, height if height is not None else width
    w, h = init_size
    sides = []
    for name, given, side in (("width", width, w), ("height", height, h)):
        if given is None and side < multiple:
            raise ArgumentError(f"init_image is {w}x{h} pixels; without width and height its size, rounded down to "
                                f"a multiple of {multiple}, is the output size, so it must be at least "
                                f"{multiple}x{multiple} (or pass width and height)")
        sides.append(given if given is not None else side // multiple * multiple)
        _check_side(name, sides[-1], multiple, max_size, f"the init image ({w}x{h} pixels)" if given is None else "")
    return tuple(sides)


TORCH_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(name: str, dtype):
    """None (the device's default) or one of the float dtypes the models run in."""
    if dtype is not None and dtype not in TORCH_FLOATS:
        raise ArgumentError(f"{name} must be None, torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    return dtype


def check_finite_tensor(name: str, t: torch.Tensor):
    """Refuse NaN / inf in an input (they would silently give an all-NaN result)."""
    if not torch.is_tensor(t):
        raise ArgumentError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ArgumentError(f"{name} contains {bad} NaN or inf value{'s' * (bad > 1)} (of {t.numel()}); "
                            "inputs must be finite")


def check_prompts(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    """A prompt or a non-empty list of them, and a negative prompt or a list of the same length."""
    prompts = [prompt] if isinstance(prompt, str) else _strings("prompt", prompt)
    if not prompts:
        raise ArgumentError("prompt is an empty list; pass a string or a list of at least one")
    if isinstance(negative_prompt, str):
        return prompts, [negative_prompt] * len(prompts)
    negatives = _strings("negative_prompt", negative_prompt)
    if len(negatives) != len(prompts):
        raise ArgumentError(f"negative_prompt has {len(negatives)} items but prompt has {len(prompts)}; "
                            "pass one negative per prompt, or a single string for all")
    return prompts, negatives


def _strings(name: str, value) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ArgumentError(f"{name} must be a string or a list of strings, got {value!r:.80}")
    return list(value)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option on one line (no usage block) and exits 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


# --- sampling (``sample`` and the pipeline, before any step runs) ---------------------------------------
def check_sampling(*, steps, shift, cfg_scale, sampler, samplers):
    """The scalar arguments of a sampling run; ``samplers``: the names there are (``sampling.SAMPLERS``)."""
    check_int("steps", steps, minimum=1)
    check_shift("shift", shift)
    check_cfg("cfg_scale", cfg_scale)
    if sampler not in samplers:
        raise ArgumentError(f"unknown sampler {sampler!r}; choose one of {samplers}")


def check_denoise(denoise, has_init: bool, *, name: str = "denoise", init: str = "init_image",
                  default: float = 1.0) -> float:
    """Image-to-image strength in (0, 1] (None: ``default``); below 1 it needs the init image that
    ``init`` names (1 is text-to-image: the init image is weighted 0)."""
    if denoise is None:
        return default
    check_number(name, denoise)                       # a finite real number (numpy's included)
    if not 0 < denoise <= 1:
        raise ArgumentError(f"{name} must be in (0, 1], got {denoise!r}")
    if not has_init and denoise != 1:
        raise ArgumentError(f"{name}={denoise!r} applies to image-to-image only: pass {init} too")
    return denoise


def needs_uncond(cfg_scale) -> bool:
    """Whether a run guides: at cfg_scale 1 the unconditional pass cancels out, so none is needed."""
    return cfg_scale != 1.0


def check_guidance(cfg_scale, uncond):
    """Guidance (cfg_scale other than 1) needs an unconditional input; without one it would silently not guide."""
    if needs_uncond(cfg_scale) and uncond is None:
        raise ArgumentError(f"cfg_scale={cfg_scale!r} asks for guidance, which needs uncond (context, pooled): "
                            "pass it, or cfg_scale=1.0 to sample without guidance")


SLG_KEYS = ("scale", "start", "end", "layers")


def check_slg(slg, depth: int | None):
    """None, or dict(scale >= 0, 0 <= start <= end <= 1, layers: indices of this model's joint blocks)."""
    if slg is None:
        return None
    if not isinstance(slg, dict) or set(slg) != set(SLG_KEYS):
        raise ArgumentError(f"slg must be a dict with the keys {', '.join(SLG_KEYS)} (or True in the pipeline), got {slg!r}")
    check_number("slg scale", slg["scale"], minimum=0)
    check_number("slg start", slg["start"], minimum=0, maximum=1)
    check_number("slg end", slg["end"], minimum=slg["start"], maximum=1)
    layers = slg["layers"]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ArgumentError(f"slg layers must be a non-empty list of joint-block indices, got {layers!r}")
    for layer in layers:
        check_int("slg layer", layer)
        if depth is not None and not 0 <= layer < depth:
            raise ArgumentError(f"slg layer {layer} is out of range: this model has {depth} joint blocks "
                                f"(0-{depth - 1})")
    return slg


def check_inputs(config, noise, cond, uncond, init_latent=None):
    """Shapes that fit the model and each other, and no NaN or inf in any input."""
    check_finite_tensor("noise", noise)
    if noise.ndim != 4:
        raise ArgumentError(f"noise must be (batch, channels, height, width), got shape {tuple(noise.shape)}")
    batch = noise.shape[0]
    for name, pair in (("cond", cond), ("uncond", uncond)):
        if pair is None and name == "uncond":
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ArgumentError(f"{name} must be (context, pooled), got {type(pair).__name__}")
        context, pooled = pair
        check_finite_tensor(f"{name} context", context)
        check_finite_tensor(f"{name} pooled", pooled)
        if context.ndim != 3 or pooled.ndim != 2 or context.shape[0] != batch or pooled.shape[0] != batch:
            raise ArgumentError(f"{name} has context {tuple(context.shape)} and pooled {tuple(pooled.shape)}; "
                                f"for noise of batch {batch} they must be ({batch}, L, C) and ({batch}, C)")
    if uncond is not None and uncond[0].shape != cond[0].shape:
        raise ArgumentError(f"uncond context {tuple(uncond[0].shape)} and cond context {tuple(cond[0].shape)} "
                            "must have the same shape")
    if init_latent is not None:
        check_finite_tensor("init_latent", init_latent)
        if init_latent.shape != noise.shape:
            raise ArgumentError(f"init_latent has shape {tuple(init_latent.shape)}; it must match noise "
                                f"{tuple(noise.shape)}")
    if config is not None:
        _check_fits_model(config, noise, cond)


def _check_fits_model(config, noise, cond):
    channels, h, w = noise.shape[1:]
    largest = config.pos_embed_max_size * config.patch_size
    if channels != config.in_channels:
        raise ArgumentError(f"noise has {channels} channels; this model takes {config.in_channels}")
    if h % config.patch_size or w % config.patch_size:
        raise ArgumentError(f"noise is {h}x{w}; this model needs sizes divisible by its patch size "
                            f"{config.patch_size}")
    if h > largest or w > largest:
        raise ArgumentError(f"noise is {h}x{w}, larger than this model takes: at most {largest}x{largest} "
                            f"(its {config.pos_embed_max_size}x{config.pos_embed_max_size} position grid of "
                            f"{config.patch_size}x{config.patch_size} patches)")
    context, pooled = cond
    if context.shape[-1] != config.context_in_dim or pooled.shape[-1] != config.adm_in_channels:
        raise ArgumentError(f"cond has context width {context.shape[-1]} and pooled width {pooled.shape[-1]}; "
                            f"this model takes {config.context_in_dim} and {config.adm_in_channels}")
