"""The recipe of a train-toy run: its fields and named presets, the checks, the learning-rate schedule.

A ``Recipe`` is stored in every checkpoint of its run, so a run resumes with what it started with;
``recipe_changes`` says what a resumed run would change.
"""

from dataclasses import dataclass, fields

import torch

from ..checks import ArgumentError, check_cfg, check_choice, check_int, check_number, check_shift
from ..flow import TIMESTEP_SAMPLERS
from ..keys import CheckpointError
from . import data
from .model import TOY_MAX_PARAMS, ToySD3


@dataclass
class Recipe:
    """Everything that defines a run (stored in its checkpoints). The defaults are the one-hour recipe on
    one CPU core; what it and the shipped model's longer schedule learn is measured in benchmarks/RESULTS.md."""
    steps: int = 10000
    batch: int = 48                    # per rank
    lr: float = 1e-3
    warmup: int = 200
    cooldown: int = 4000               # final steps over which the learning rate falls linearly to 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.999
    t_sampler: str = "logit_normal"
    t_shift: float = 3.0               # time_shift applied to the sampled sigma (and the sampling schedule)
    cfg_drop: float = 0.1              # fraction of empty captions (the CFG null condition)
    p_pair: float = 0.5                # fraction of two-object scenes (after singles_first): relations need them
    singles_first: int = 2000          # steps of single objects only, before pairs are mixed in
    cfg_scale: float = 2.0             # the guidance the exported model samples with by default
    width: int = 128
    depth: int = 4
    heads: int = 2
    patch: int = 4
    text_width: int = 128
    text_layers: int = 2
    seed: int = 0


# Named recipes for ``--recipe``: the fields that differ from ``Recipe()``, and the number of ranks each is
# meant for (``batch`` is per rank, so another number of ranks is another recipe). How long each trains and
# what it learns is measured in benchmarks/RESULTS.md.
PRESETS = {
    "one-hour": ({}, 1),                      # the defaults: a budget of one hour on one core
    # The shipped model: mostly pairs after a short single-object start (relations need pairs), and one
    # long cool-down (relations rise mostly while the learning rate falls; chapter 15).
    "shipped": ({"steps": 11500, "cooldown": 6000, "p_pair": 0.9, "singles_first": 1000}, 2),
}


def recipe_from(stored: dict, path=None) -> Recipe:
    """A recipe stored in a checkpoint (``path``, for messages). Shim, dropped in sd3mini 0.2.0: runs
    before 2026-12 also stored ``text_pool``, always "eos", the only pooling left."""
    where = f"{path}: " if path is not None else ""
    if not isinstance(stored, dict):
        raise CheckpointError(f"{where}its recipe is a JSON {type(stored).__name__}, not an object")
    stored = dict(stored)
    if stored.pop("text_pool", "eos") != "eos":
        raise CheckpointError(f"{where}this run pooled its text by the mean, which sd3mini no longer supports")
    unknown = sorted(set(stored) - {f.name for f in fields(Recipe)})
    if unknown:
        raise CheckpointError(f"{where}its recipe has {', '.join(map(repr, unknown))}, which this sd3mini's "
                              "train-toy does not know (a newer sd3mini wrote it?)")
    return Recipe(**stored)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_recipe(r: Recipe):
    """Refuse a recipe that would crash or train nonsense; the message names the option, its value, the rule."""
    for name in ("steps", "batch", "depth", "heads", "patch", "width", "text_width", "text_layers"):
        check_int(_flag(name), getattr(r, name), minimum=1)
    for name in ("warmup", "cooldown", "singles_first", "seed"):
        check_int(_flag(name), getattr(r, name), minimum=0)
    if r.cooldown > r.steps:
        raise ArgumentError(f"the cool-down ({r.cooldown} steps) is longer than the run ({r.steps} steps); "
                            f"pass --cooldown {r.steps // 3} or less (0 keeps the learning rate constant)")
    for name in ("width", "text_width"):
        if getattr(r, name) % r.heads:
            raise ArgumentError(f"{_flag(name)} {getattr(r, name)} must be divisible by --heads {r.heads}")
    if r.width % 4:                                   # the 2-D sin-cos position code: sin and cos of x and y
        raise ArgumentError(f"--width {r.width} must be divisible by 4")
    if data.IMAGE_SIZE % r.patch:
        raise ArgumentError(f"--patch {r.patch} must divide the image size {data.IMAGE_SIZE}")
    check_number("--lr", r.lr, above=0)
    check_number("--grad-clip", r.grad_clip, above=0)
    check_number("--weight-decay", r.weight_decay, minimum=0)
    check_cfg("--cfg-scale", r.cfg_scale)            # exported as the model's default: load_toy checks it so
    for name in ("ema", "cfg_drop", "p_pair"):
        check_number(_flag(name), getattr(r, name), minimum=0, maximum=1)
    check_choice("--t-sampler", r.t_sampler, TIMESTEP_SAMPLERS)
    check_shift("--t-shift", r.t_shift)
    with torch.device("meta"):                        # shapes only: nothing is allocated
        n = sum(p.numel() for p in ToySD3(r).parameters())
    if n > TOY_MAX_PARAMS:
        raise ArgumentError(f"this recipe makes a model of {n / 1e6:,.1f} M parameters; a tiny model has at most "
                            f"{TOY_MAX_PARAMS / 1e6:.0f} M (the shipped one 2.7 M): lower --width or --depth")


# Fields that fix the model's shape: a checkpoint cannot be resumed with others, even with --force.
ARCHITECTURE = ("width", "depth", "heads", "patch", "text_width", "text_layers")


def recipe_changes(saved: Recipe, r: Recipe) -> dict:
    """{field: (saved value, new value)} for every field that differs, except ``steps`` (extending a run
    by resuming it with more steps is the normal use)."""
    return {f.name: (getattr(saved, f.name), getattr(r, f.name)) for f in fields(Recipe)
            if f.name != "steps" and getattr(saved, f.name) != getattr(r, f.name)}


def learning_rate(r: Recipe, step: int) -> float:
    """Warm-up, constant, then a linear cool-down to 0 over the last ``r.cooldown`` steps. The
    schedule up to the cool-down does not depend on ``r.steps``, so a run can be extended by resuming."""
    warm = min(1.0, (step + 1) / r.warmup) if r.warmup else 1.0
    cool = min(1.0, (r.steps - step) / r.cooldown) if r.cooldown else 1.0
    return r.lr * warm * cool


def toy_defaults(r: Recipe) -> dict:
    """How a model of this recipe samples by default (stored in its exported file)."""
    return dict(steps=20, cfg_scale=r.cfg_scale, shift=r.t_shift, sampler="euler")
