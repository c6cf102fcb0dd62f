"""Train the tiny SD3 from scratch with the paper's recipe: ``python -m sd3mini train-toy``.

    rectified flow: z_t = (1 - t) x0 + t noise, predict v = noise - x0, MSE       (sd3mini.flow)
    t ~ logit-normal(0, 1) (or uniform / mode / cosmap), 10% empty captions for CFG, AdamW, EMA

Runs unchanged under ``torchrun --nproc_per_node=N`` (DDP; gloo on CPU, NCCL on GPU): each rank draws
its own batches, gradients are averaged, and at the end the ranks check that their weights agree.
Checkpoints are safetensors: ``last.safetensors`` (everything needed to resume) and ``toy_sd3.safetensors``
(the EMA weights, what ``sd3mini.toy.toy_pipeline`` loads).
"""

import argparse
import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..checkpoint import file_metadata, open_state_dict, save_state_dict
from ..flow import TIMESTEP_SAMPLERS, flow_matching_loss, interpolate, process_in, sample_t, time_shift
from ..mmdit import MMDiT
from . import data
from .model import ToyTextEncoder, toy_mmdit_config


@dataclass
class Recipe:
    """Everything that defines a run (stored in its checkpoints). The defaults are the one-hour recipe:
    56-57 minutes on one core of a 2-core CPU, enough for single objects with each seed tried (0-3;
    benchmarks/RESULTS.md). Half the scenes stay single objects: with 90% pairs, whose captions name no
    grid cell, seed 1 lost the grid position it had begun to learn. Two-object relations need longer: the
    shipped model trained 25 000 steps, in three resumed stages."""
    steps: int = 10000
    batch: int = 48                    # per rank
    lr: float = 1e-3
    warmup: int = 200
    cooldown: int = 4000               # final steps over which the learning rate falls linearly to 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.999
    t_sampler: str = "logit_normal"
    t_shift: float = 3.0               # time_shift applied to the sampled t (and the sampling schedule)
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
    text_pool: str = "eos"
    seed: int = 0


class ToySD3(nn.Module):
    """The trainable pair: text encoder + MM-DiT. forward -> the predicted velocity."""

    def __init__(self, r: Recipe):
        super().__init__()
        self.text = ToyTextEncoder(width=r.text_width, layers=r.text_layers, heads=r.heads, pool=r.text_pool)
        self.mmdit = MMDiT(toy_mmdit_config(r.width, r.depth, r.patch, r.text_width, heads=r.heads)).initialize_weights()

    def forward(self, zt, t, tokens):
        context, pooled = self.text(tokens)
        return self.mmdit(zt, t * 1000, y=pooled, context=context)


def learning_rate(r: Recipe, step: int) -> float:
    """Warm-up, constant, then a linear cool-down to 0 over the last ``r.cooldown`` steps. The
    schedule up to the cool-down does not depend on ``r.steps``, so a run can be extended by resuming."""
    warm = min(1.0, (step + 1) / r.warmup)
    cool = min(1.0, (r.steps - step) / r.cooldown) if r.cooldown else 1.0
    return r.lr * warm * cool


def data_stats(n: int = 2048, seed: int = 999) -> tuple[float, float]:
    """SD3 normalizes its latents to unit variance (scale 1/std, shift mean); the same, measured on pixels."""
    images, _, _ = data.batch(seed, n)
    return 1.0 / images.std().item(), images.mean().item()


def training_batch(r: Recipe, step: int, rank: int, scale: float, shift: float):
    """The batch of ``step`` on ``rank``: a function of (seed, rank, step) only, so resuming is exact."""
    seed = (r.seed * 1_000_003 + rank) * 10_000_019 + step
    # A curriculum: measured here, a model fed 60% pairs from step 0 never learned grid position
    # in 1.5k steps (cell 0.1), while single objects alone taught it in 500 (cell 0.97).
    p_pair = 0.0 if step < r.singles_first else r.p_pair
    images, captions, _ = data.batch(seed, r.batch, p_pair=p_pair)
    rng = random.Random(seed)
    captions = ["" if rng.random() < r.cfg_drop else c for c in captions]
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=gen)
    t = time_shift(sample_t(r.batch, r.t_sampler, generator=gen), r.t_shift)
    return process_in(images, scale, shift), captions, noise, t


# --- checkpoints ----------------------------------------------------------------------------------
def save_training_state(path, model, ema, opt, step, meta):
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    sd |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    state = opt.state_dict()
    for i, s in state["state"].items():
        sd |= {f"opt.{i}.{k}": v if torch.is_tensor(v) else torch.tensor(v) for k, v in s.items()}
    meta = meta | {"step": step, "param_groups": state["param_groups"]}
    save_state_dict(sd, Path(path).with_suffix(".tmp"), metadata={"sd3mini_train": json.dumps(meta)})
    os.replace(Path(path).with_suffix(".tmp"), path)        # never leave a half-written checkpoint


def training_meta(path) -> dict:
    """What a ``last.safetensors`` stores beside the tensors: step, elapsed, recipe, latent scale/shift, ..."""
    return json.loads(file_metadata(path)["sd3mini_train"])


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


def export(path, ema: ToySD3, r: Recipe, scale: float, shift: float, extra: dict | None = None):
    """The shipped format: EMA weights in float16 plus what ``load_toy`` needs to rebuild the pipeline."""
    cfg = asdict(ema.mmdit.config)
    meta = {"mmdit": cfg, "text": ema.text.config, "latent_scale": scale, "latent_shift": shift,
            "image_size": data.IMAGE_SIZE, "recipe": asdict(r),
            "defaults": dict(steps=20, cfg_scale=r.cfg_scale, shift=r.t_shift, sampler="euler")} | (extra or {})
    sd = {f"mmdit.{k}": v.half() for k, v in ema.mmdit.state_dict().items()}
    sd |= {f"text.{k}": v.half() for k, v in ema.text.state_dict().items()}
    save_state_dict(sd, path, metadata={"sd3mini_toy": json.dumps(meta)})


# --- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: ToySD3, captions, *, scale, shift, steps=20, cfg_scale=4.0, sample_shift=1.0, seed=0, batch=100):
    """Images (B, 3, 32, 32) in [-1, 1] for ``captions``, image i from noise seed ``seed + i``."""
    from ..flow import process_out
    from ..sampling import make_noise, sample

    out = []
    for i in range(0, len(captions), batch):
        chunk = captions[i: i + batch]
        cond = model.text(model.text.tokenize(chunk))
        uncond = model.text(model.text.tokenize([""] * len(chunk))) if cfg_scale != 1.0 else None
        noise = make_noise(seed + i, (3, data.IMAGE_SIZE, data.IMAGE_SIZE), batch=len(chunk))
        z = sample(model.mmdit, noise, cond, uncond, steps=steps, shift=sample_shift, cfg_scale=cfg_scale, progress=False)
        out.append(process_out(z, scale, shift).clamp(-1, 1))
    return torch.cat(out)


def evaluate(model, captions, **kw) -> dict:
    from .judge import score

    return score(generate(model, captions, **kw), captions)


# --- the loop -------------------------------------------------------------------------------------
def _setup_distributed():
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def train(r: Recipe, out: str | Path, *, minutes: float | None = None, resume: bool = False, eval_every: int = 0,
          eval_size: int = 60, save_every: int = 1000, progress: bool = True) -> dict:
    if r.cooldown > r.steps:
        raise ValueError(f"the cool-down ({r.cooldown} steps) is longer than the run ({r.steps} steps); "
                         f"pass --cooldown {r.steps // 3} or less (0 keeps the learning rate constant)")
    rank, world, device = _setup_distributed()
    out = Path(out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(r.seed)                               # the same initial weights on every rank
    model = ToySD3(r).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, betas=(0.9, 0.99), weight_decay=r.weight_decay)
    scale, shift = data_stats()
    step, elapsed = 0, 0.0
    if resume and (out / "last.safetensors").exists():
        meta = load_training_state(out / "last.safetensors", model, ema, opt)
        step, elapsed = meta["step"], meta["elapsed"]
    trainer = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    n_params = sum(p.numel() for p in model.parameters())
    log = open(out / "train_log.jsonl", "a") if rank == 0 else None
    evals = eval_captions_subset(eval_size) if eval_every else []
    bar = tqdm(total=r.steps, initial=step, disable=not progress or rank != 0, desc="train-toy")
    start = time.time() - elapsed
    meta = {"recipe": asdict(r), "world": world, "params": n_params, "latent_scale": scale, "latent_shift": shift}
    while step < r.steps and not (minutes and (time.time() - start) / 60 >= minutes):
        x0, captions, noise, t = training_batch(r, step, rank, scale, shift)
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        tokens = model.text.tokenize(captions)
        v = trainer(interpolate(x0, noise, t), t, tokens)
        loss = flow_matching_loss(v, x0, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        for group in opt.param_groups:
            group["lr"] = learning_rate(r, step)
        opt.step()
        decay = min(r.ema, (1 + step) / (10 + step))       # EMA warm-up: early weights fade fast
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if log is not None:
            record = {"step": step, "loss": round(loss.item(), 5), "minutes": round((time.time() - start) / 60, 3)}
            if eval_every and step % eval_every == 0:
                record["eval"] = evaluate(ema, evals, scale=scale, shift=shift, sample_shift=r.t_shift,
                                          cfg_scale=r.cfg_scale)
                tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in record["eval"].items()))
            log.write(json.dumps(record) + "\n")
            log.flush()
        if rank == 0 and (step % save_every == 0 or step == r.steps):
            meta["elapsed"] = time.time() - start
            save_training_state(out / "last.safetensors", model, ema, opt, step, meta)
            export(out / "toy_sd3.safetensors", ema, r, scale, shift, {"steps_trained": step, "world": world})
    bar.close()
    meta["elapsed"] = time.time() - start
    if rank == 0:
        save_training_state(out / "last.safetensors", model, ema, opt, step, meta)
        export(out / "toy_sd3.safetensors", ema, r, scale, shift, {"steps_trained": step, "world": world,
                                                                    "minutes": round(meta["elapsed"] / 60, 2)})
    if world > 1:
        flat = torch.cat([p.detach().flatten() for p in list(model.parameters()) + list(ema.parameters())])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        if rank == 0:
            print(f"ranks agree: weights {'identical' if same else 'DIFFERENT'} across {world} ranks")
        dist.destroy_process_group()
        if not same:
            raise RuntimeError("DDP ranks ended with different weights")
    return {"steps": step, "minutes": meta["elapsed"] / 60, "params": n_params}


def eval_captions_subset(n: int) -> list[str]:
    """An even mix of single-object and two-object captions from the fixed evaluation set."""
    full = data.eval_captions()
    half = n // 2
    return full[:half] + full[150: 150 + n - half]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sd3mini train-toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(Recipe()).items():
        kind = type(value)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=value,
                       choices=TIMESTEP_SAMPLERS if name == "t_sampler" else None)
    p.add_argument("--out", default="runs/toy", help="folder for checkpoints and the log")
    p.add_argument("--minutes", type=float, help="stop after this much wall time")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    p.add_argument("--eval-every", type=int, default=0, help="judge the EMA model every N steps")
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = Recipe(**{k: getattr(args, k) for k in asdict(Recipe())})
    result = train(r, args.out, minutes=args.minutes, resume=args.resume, eval_every=args.eval_every)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"trained {result['steps']} steps in {result['minutes']:.1f} min ({result['params'] / 1e6:.2f} M "
              f"parameters); weights: {Path(args.out) / 'toy_sd3.safetensors'}")
