"""A train-toy run's files: the training state (``last.safetensors``, to resume), the exported EMA
weights (``toy_sd3.safetensors``, what ``toy_pipeline`` loads) and the log (``train_log.jsonl``).
All are written whole (a temporary file, renamed)."""

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint import file_metadata, open_state_dict, save_state_dict
from ..keys import CheckpointError
from . import data
from .recipe import toy_defaults

RUN_FILES = ("last.safetensors", "toy_sd3.safetensors", "train_log.jsonl")


def save_training_state(path, model, ema, opt, step, meta):
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    sd |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    state = opt.state_dict()
    for i, s in state["state"].items():
        sd |= {f"opt.{i}.{k}": v if torch.is_tensor(v) else torch.tensor(v) for k, v in s.items()}
    meta = meta | {"step": step, "param_groups": state["param_groups"]}
    save_state_dict(sd, path, metadata={"sd3mini_train": json.dumps(meta)})    # atomic: a temporary file, renamed


def training_meta(path) -> dict:
    """What a ``last.safetensors`` stores beside the tensors: step, elapsed, recipe, latent scale/shift, ..."""
    raw = file_metadata(path).get("sd3mini_train")
    if raw is None:
        raise CheckpointError(f"{path} is not a train-toy training state (no sd3mini_train metadata)")
    return json.loads(raw)


def load_training_state(path, model, ema, opt) -> dict:
    sd = {k: v.load() for k, v in open_state_dict(path).items()}
    meta = training_meta(path)
    model.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("ema.")})
    state = {"state": {}, "param_groups": meta["param_groups"]}
    for k, v in sd.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(state)
    return meta


def export(path, ema, r, latent_scale: float, latent_shift: float, extra: dict | None = None):
    """The shipped format: EMA weights in float16 plus what ``load_toy`` needs to rebuild the pipeline."""
    cfg = asdict(ema.mmdit.config)
    meta = {"mmdit": cfg, "text": ema.text.config, "latent_scale": latent_scale,
            "latent_shift": latent_shift, "image_size": data.IMAGE_SIZE, "recipe": asdict(r),
            "defaults": toy_defaults(r)} | (extra or {})
    sd = {f"mmdit.{k}": v.half() for k, v in ema.mmdit.state_dict().items()}
    sd |= {f"text.{k}": v.half() for k, v in ema.text.state_dict().items()}
    save_state_dict(sd, path, metadata={"sd3mini_toy": json.dumps(meta)})      # atomic: a temporary file, renamed


def _log_step(line: str) -> float:
    """The step of a log row; a blank or damaged row (a write cut short) counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def trim_log(path: Path, step: int):
    """Keep the log rows up to ``step`` (the saved one): rows written after the last save are redone."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if _log_step(line) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(row + "\n" for row in rows))
    os.replace(tmp, path)
