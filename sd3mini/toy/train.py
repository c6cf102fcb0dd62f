"""Train the tiny SD3 from scratch with the paper's recipe: the step, and the loop that repeats it.

    python -m sd3mini train-toy                                                  # one hour, one core
    torchrun --nproc_per_node=2 -m sd3mini train-toy --recipe shipped            # the shipped model

    rectified flow: z = (1 - sigma) x0 + sigma noise, predict v = noise - x0, MSE   (sd3mini.flow)
    sigma ~ logit-normal(0, 1) (or uniform / mode / cosmap), shifted; 10% empty captions for CFG; AdamW, EMA

The recipe is ``recipe.py``, the batches ``data.py``, the run's files ``checkpoints.py``, and running
unchanged under ``torchrun --nproc_per_node=N`` ``ddp.py``. Checkpoints are safetensors:
``last.safetensors`` (everything needed to resume) and ``toy_sd3.safetensors`` (the EMA weights, what
``sd3mini.toy.model.toy_pipeline`` loads).
"""

import argparse
import copy
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..checkpoint import FolderLock
from ..checks import ArgumentError, Parser, check_int, check_number
from ..flow import TIMESTEP_SAMPLERS, flow_matching_loss, interpolate
from .checkpoints import (RUN_FILES, export, load_training_state, save_training_state, training_meta,
                          trim_log)
from .data import data_stats, training_batch
from .ddp import StopOnSignal, ranks_agree, setup_distributed
from .judge import eval_captions_subset, evaluate
from .model import ToySD3, pipeline_of
from .recipe import (ARCHITECTURE, PRESETS, Recipe, check_recipe, learning_rate, recipe_changes, recipe_from,
                     toy_defaults)


def update_ema(ema, model, step: int, decay: float):
    """ema <- decay * ema + (1 - decay) * model, with a warm-up so that early weights fade fast."""
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - decay)


def train_step(model, ema, opt, r: Recipe, step: int, batch, forward=None) -> torch.Tensor:
    """One step of the recipe on ``batch`` = (x0, captions, noise, sigma) from ``training_batch``: the
    velocity loss, backward, gradient clipping, AdamW at ``learning_rate(r, step)``, then the EMA.
    ``forward`` runs the model (its DDP wrapper under torchrun; default: ``model``). Returns the loss."""
    x0, captions, noise, sigma = batch
    v = (forward or model)(interpolate(x0, noise, sigma), sigma, model.text.tokenize(captions))
    return optimizer_step(model, ema, opt, r, step, flow_matching_loss(v, x0, noise))


def optimizer_step(model, ema, opt, r: Recipe, step: int, loss: torch.Tensor) -> torch.Tensor:
    """The recipe's update from a loss: backward, gradient clipping, AdamW at ``learning_rate(r, step)``,
    then the EMA. Returns the loss, detached."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
    for group in opt.param_groups:
        group["lr"] = learning_rate(r, step)
    opt.step()
    update_ema(ema, model, step, r.ema)
    return loss.detach()


def check_out(out: Path, r: Recipe, resume: bool, force: bool) -> list[str]:
    """What ``train`` may do with ``out``, checked before anything is written (on every rank, before they
    meet). Returns the recipe changes a forced resume accepts, as "field old -> new" strings."""
    state = out / "last.safetensors"
    if resume:
        if not state.exists():
            raise ArgumentError(f"--resume: {out} has no last.safetensors to resume from; leave out --resume to "
                                "start a run")
        meta = training_meta(state)
        saved = recipe_from(meta.get("recipe"), state)
        done = meta.get("step", 0)
        if r.steps <= done:                           # nothing to train: it would only write the files again
            raise ArgumentError(f"--resume: {state} has trained {done} steps already; pass --steps larger than "
                                f"{done} to extend the run")
        changes = recipe_changes(saved, r)
        shape = [f"{k} {a} -> {b}" for k, (a, b) in changes.items() if k in ARCHITECTURE]
        if shape:
            raise ArgumentError(f"--resume: {state} holds another model ({', '.join(shape)}); a run resumes with "
                                "its own model size")
        told = [f"{k} {a} -> {b}" for k, (a, b) in changes.items()]
        if told and not force:
            raise ArgumentError(f"--resume with another recipe than {state}'s: {', '.join(told)}; pass --force "
                                "to resume with it (its checkpoints record the new recipe)")
        return told
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not force:
        raise ArgumentError(f"--out {out} already holds a run ({', '.join(existing)}); pass --resume to continue "
                            "it, or --force to start over (which deletes them)")
    return []


@dataclass
class Run:
    """What the loop carries: the models, the optimizer, where it is, and where it writes."""
    r: Recipe
    out: Path
    model: ToySD3
    ema: ToySD3
    opt: torch.optim.Optimizer
    forward: nn.Module                 # the model, or its DDP wrapper under torchrun
    latent_scale: float
    latent_shift: float
    rank: int
    world: int
    device: torch.device
    step: int                          # steps done
    start: float                       # time.time() of step 0 (earlier when resumed)
    meta: dict                         # what the training state stores beside the tensors
    log: object                        # train_log.jsonl, open for appending (rank 0), else None
    evals: list                        # the captions the judge scores along the way

    def batch(self):
        x0, captions, noise, sigma = training_batch(self.r, self.step, self.rank, self.latent_scale,
                                                    self.latent_shift)
        return x0.to(self.device), captions, noise.to(self.device), sigma.to(self.device)

    def minutes(self) -> float:
        return (time.time() - self.start) / 60


def _hold(lock: FolderLock, out: Path):
    if not lock.acquire():
        raise ArgumentError(f"--out {out} is in use by another train-toy run (it holds the folder's lock); wait "
                            "for it to end, or choose another --out")


def _start_run(r: Recipe, out: Path, lock: FolderLock, *, resume: bool, force: bool, eval_size: int) -> Run:
    """Lock and check ``out``, build the model (the same initial weights on every rank), resume if asked.
    Under torchrun the ranks are one run: rank 0 holds the lock (if it stops, torchrun stops the others)."""
    if int(os.environ.get("RANK", 0)) == 0 and out.is_dir():
        _hold(lock, out)                              # before the folder is read: no other run changes it now
    changes = check_out(out, r, resume, force)
    rank, world, device = setup_distributed()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _hold(lock, out)                              # a new folder: before anything is written in it
        if force and not resume:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        if changes:
            tqdm.write(f"resuming with a changed recipe: {', '.join(changes)}")
    torch.manual_seed(r.seed)
    model = ToySD3(r).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, betas=(0.9, 0.99), weight_decay=r.weight_decay)
    step, elapsed = 0, 0.0
    if resume:
        saved = load_training_state(out / "last.safetensors", model, ema, opt)
        step, elapsed = saved["step"], saved["elapsed"]
        if rank == 0:
            trim_log(out / "train_log.jsonl", step)
    latent_scale, latent_shift = data_stats()
    meta = {"recipe": asdict(r), "world": world, "params": sum(p.numel() for p in model.parameters()),
            "latent_scale": latent_scale, "latent_shift": latent_shift}
    return Run(r=r, out=out, model=model, ema=ema, opt=opt,
               forward=nn.parallel.DistributedDataParallel(model) if world > 1 else model,
               latent_scale=latent_scale, latent_shift=latent_shift, rank=rank, world=world, device=device,
               step=step, start=time.time() - elapsed, meta=meta,
               log=open(out / "train_log.jsonl", "a") if rank == 0 else None, evals=eval_captions_subset(eval_size))


def _log(run: Run, loss: float, eval_every: int):
    """One row of train_log.jsonl (rank 0); every ``eval_every`` steps the judge's scores of the EMA model."""
    if run.log is None:
        return
    record = {"step": run.step, "loss": round(loss, 5), "minutes": round(run.minutes(), 3)}
    if eval_every and run.step % eval_every == 0:
        pipe = pipeline_of(run.ema.mmdit, run.ema.text, run.latent_scale, run.latent_shift, toy_defaults(run.r),
                           run.device)
        record["eval"] = evaluate(pipe, run.evals)
        tqdm.write(f"step {run.step}: " + ", ".join(f"{k} {v:.2f}" for k, v in record["eval"].items()))
    run.log.write(json.dumps(record) + "\n")
    run.log.flush()


def _save(run: Run, **extra):
    """last.safetensors (to resume) and toy_sd3.safetensors (the EMA weights), on rank 0."""
    run.meta["elapsed"] = time.time() - run.start
    if run.rank == 0:
        save_training_state(run.out / "last.safetensors", run.model, run.ema, run.opt, run.step, run.meta)
        export(run.out / "toy_sd3.safetensors", run.ema, run.r, run.latent_scale, run.latent_shift,
               {"steps_trained": run.step, "world": run.world} | extra)


def _finish(run: Run):
    """Save, close the log; under DDP, check that every rank ended with the same weights."""
    _save(run, minutes=round(run.minutes(), 2))
    if run.log is not None:
        run.log.close()
    if run.world == 1:
        return
    same = ranks_agree(run)
    if run.rank == 0:
        print(f"ranks agree: weights {'identical' if same else 'DIFFERENT'} across {run.world} ranks")
    if not same:
        raise RuntimeError("DDP ranks ended with different weights")


def train(r: Recipe, out: str | Path, *, minutes: float | None = None, resume: bool = False, force: bool = False,
          eval_every: int = 0, eval_size: int = 60, save_every: int = 1000, progress: bool = True) -> dict:
    """Train (or, with ``resume``, continue) a run in the folder ``out``.

    A folder that holds a run is refused unless ``resume`` (continue it) or ``force`` (start over: its
    checkpoints and log are deleted); resuming with another recipe than the saved one (other than a
    larger ``steps``) needs ``force`` too. Checkpoints are written every ``save_every`` steps, at the
    end, and when SIGINT or SIGTERM stops the run (the result then has ``interrupted``: the signal).
    """
    check_recipe(r)
    check_int("--save-every", save_every, minimum=1)
    check_int("--eval-every", eval_every, minimum=0)
    if minutes is not None:
        check_number("--minutes", minutes, above=0)
    lock = FolderLock(out)                            # held for the whole run: a second run is refused
    try:
        run = _start_run(r, Path(out), lock, resume=resume, force=force, eval_size=eval_size)
        bar = tqdm(total=r.steps, initial=run.step, disable=not progress or run.rank != 0, desc="train-toy")
        with StopOnSignal() as stop:
            while run.step < r.steps:
                loss = train_step(run.model, run.ema, run.opt, r, run.step, run.batch(), run.forward).item()
                run.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                _log(run, loss, eval_every)
                if stop.requested(run.world, run.device, time_up=bool(minutes) and run.minutes() >= minutes):
                    break
                if run.step % save_every == 0 and run.step < r.steps:
                    _save(run)
        bar.close()
        _finish(run)
    finally:
        lock.release()
    return {"steps": run.step, "minutes": run.meta["elapsed"] / 60, "params": run.meta["params"],
            "interrupted": stop.received}


def main(argv=None):
    p = Parser(prog="python -m sd3mini train-toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(Recipe()).items():
        kind = type(value)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=value,
                       choices=TIMESTEP_SAMPLERS if name == "t_sampler" else None)
    p.add_argument("--recipe", default="one-hour", choices=PRESETS,
                   help="a named recipe whose values become the defaults of the options above. one-hour "
                        "(the default): an hour on one core, learns single objects but not two-object "
                        "relations; shipped: the shipped model, ~80 min under torchrun --nproc_per_node=2")
    p.add_argument("--out", default="runs/toy", help="folder for checkpoints and the log")
    p.add_argument("--minutes", type=float, help="stop after this much wall time")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors (the same recipe; "
                                                         "a larger --steps extends the run)")
    p.add_argument("--force", action="store_true", help="without --resume: start over in an OUT that holds a run "
                                                        "(deletes its checkpoints and log); with --resume: accept a "
                                                        "changed recipe")
    p.add_argument("--save-every", type=int, default=1000, help="write the checkpoints every N steps (default "
                                                                "1000; also at the end and on SIGINT / SIGTERM)")
    p.add_argument("--eval-every", type=int, default=0, help="judge the EMA model every N steps")
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    preset, ranks = PRESETS[p.parse_known_args(argv)[0].recipe]
    p.set_defaults(**preset)                               # the preset's values; options given still win
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world != ranks and int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(f"note: --recipe {args.recipe} was measured with {ranks} rank(s), this run has {world}: "
                   f"the batch is per rank, so it trains on {world * args.batch} captions a step, not "
                   f"{ranks * args.batch}")
    if args.threads is not None:
        torch.set_num_threads(check_int("--threads", args.threads, minimum=1))
    r = Recipe(**{k: getattr(args, k) for k in asdict(Recipe())})
    result = train(r, args.out, minutes=args.minutes, resume=args.resume, force=args.force,
                   save_every=args.save_every, eval_every=args.eval_every)
    weights = Path(args.out) / "toy_sd3.safetensors"
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    if result["interrupted"]:
        print(f"stopped by {result['interrupted']} at step {result['steps']}; saved {Path(args.out) / 'last.safetensors'} "
              f"and {weights}: continue with --resume")
        return 128 + signal.Signals[result["interrupted"]].value
    print(f"trained {result['steps']} steps in {result['minutes']:.1f} min ({result['params'] / 1e6:.2f} M "
          f"parameters); weights: {weights}")
    return 0
