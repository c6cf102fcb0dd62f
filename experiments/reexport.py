"""Re-export a run's EMA weights in the shipped format with a different sampling default (no training).

    python experiments/reexport.py runs/toy/last.safetensors sd3mini/assets/toy_sd3.safetensors --cfg-scale 2

The guidance scale is chosen after training, by measurement (``toy_report.py eval --cfg ...``); this
writes the same weights with that default stored beside them.
"""

import argparse
from dataclasses import asdict

import torch

from sd3mini.toy.checkpoints import export, load_training_state, training_meta
from sd3mini.toy.data import data_stats
from sd3mini.toy.model import ToySD3
from sd3mini.toy.recipe import Recipe, recipe_from


def reexport(state, out, cfg_scale: float) -> Recipe:
    meta = training_meta(state)
    r = recipe_from(meta["recipe"] | {"cfg_scale": cfg_scale})
    model, ema = ToySD3(r), ToySD3(r)
    opt = torch.optim.AdamW(model.parameters())
    load_training_state(state, model, ema, opt)
    assert (meta["latent_scale"], meta["latent_shift"]) == data_stats()
    export(out, ema, r, meta["latent_scale"], meta["latent_shift"],
           {"steps_trained": meta["step"], "world": meta["world"], "minutes": round(meta["elapsed"] / 60, 2)})
    print(f"{out}: step {meta['step']}, defaults cfg_scale {cfg_scale}; recipe {asdict(r)}")
    return r


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("state", help="a run's last.safetensors")
    p.add_argument("out")
    p.add_argument("--cfg-scale", type=float, required=True)
    args = p.parse_args()
    reexport(args.state, args.out, args.cfg_scale)
