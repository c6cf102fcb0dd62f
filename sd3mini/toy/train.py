"""Train the tiny SD3 from scratch with the paper's recipe.

    python -m sd3mini train-toy                                                  # one hour, one core
    torchrun --nproc_per_node=2 -m sd3mini train-toy --recipe shipped            # the shipped model

    rectified flow: z = (1 - sigma) x0 + sigma noise, predict v = noise - x0, MSE   (sd3mini.flow)
    sigma ~ logit-normal(0, 1) (or uniform / mode / cosmap), shifted; 10% empty captions for CFG; AdamW, EMA

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
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..checkpoint import CheckpointError, FolderLock, file_metadata, open_state_dict, save_state_dict
from ..checks import ArgumentError, Parser, check_cfg, check_choice, check_int, check_number, check_shift
from ..flow import TIMESTEP_SAMPLERS, flow_matching_loss, interpolate, process_in, sample_t, time_shift
from ..mmdit import MMDiT
from . import data
from .model import TOY_MAX_PARAMS, ToyTextEncoder, toy_mmdit_config


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


# Named recipes for ``--recipe``: the fields that differ from ``Recipe()``, and the number of ranks each
# was measured with (``batch`` is per rank, so another number of ranks is another recipe).
PRESETS = {
    # The default: one hour on one core. It learns single objects and both colours of a pair, not
    # relations (benchmarks/RESULTS.md).
    "one-hour": ({}, 1),
    # The shipped model: 11 500 steps of 2 x 48 captions, 90% pairs after 1 000 steps of single objects,
    # the learning rate cooled to 0 over the last 6 000; 80 minutes on 2 CPU cores under
    # ``torchrun --nproc_per_node=2``. Relations rise mostly in the cool-down (chapter 15). Its sampling
    # default, CFG 2, was chosen on the 300 evaluation captions after training (the run judged at 3).
    "shipped": ({"steps": 11500, "cooldown": 6000, "p_pair": 0.9, "singles_first": 1000}, 2),
}


def recipe_from(stored: dict, path=None) -> Recipe:
    """A recipe stored in a checkpoint (``path``, for messages). Runs before 2026-12 also stored
    ``text_pool``, always "eos", the only pooling left."""
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


class ToySD3(nn.Module):
    """The trainable pair: text encoder + MM-DiT. forward -> the predicted velocity."""

    def __init__(self, r: Recipe):
        super().__init__()
        self.text = ToyTextEncoder(width=r.text_width, layers=r.text_layers, heads=r.heads)
        self.mmdit = MMDiT(toy_mmdit_config(r.width, r.depth, r.patch, r.text_width, heads=r.heads)).initialize_weights()

    def forward(self, zt, sigma, tokens):
        """zt (B, 3, H, W) at noise levels sigma (B,), tokens (B, 16) -> the velocity (B, 3, H, W)."""
        context, pooled = self.text(tokens)
        return self.mmdit(zt, 1000 * sigma, y=pooled, context=context)


def learning_rate(r: Recipe, step: int) -> float:
    """Warm-up, constant, then a linear cool-down to 0 over the last ``r.cooldown`` steps. The
    schedule up to the cool-down does not depend on ``r.steps``, so a run can be extended by resuming."""
    warm = min(1.0, (step + 1) / r.warmup) if r.warmup else 1.0
    cool = min(1.0, (r.steps - step) / r.cooldown) if r.cooldown else 1.0
    return r.lr * warm * cool


def data_stats(n: int = 2048, seed: int = 999) -> tuple[float, float]:
    """(latent_scale, latent_shift): SD3 normalizes its latents to unit variance (scale 1/std, offset the
    mean); the same, measured on pixels."""
    images, _, _ = data.batch(seed, n)
    return 1.0 / images.std().item(), images.mean().item()


def training_batch(r: Recipe, step: int, rank: int, latent_scale: float, latent_shift: float, draw=None):
    """(x0, captions, noise, sigma) of ``step`` on ``rank``: a function of (seed, rank, step) only, so
    resuming is exact. ``draw(n, generator)``: the noise levels before the shift (default: ``r.t_sampler``;
    the paper's arms draw each formulation's own)."""
    seed = (r.seed * 1_000_003 + rank) * 10_000_019 + step
    # A curriculum: single objects first teach grid position, which pair captions never name
    # (benchmarks/RESULTS.md).
    p_pair = 0.0 if step < r.singles_first else r.p_pair
    images, captions, _ = data.batch(seed, r.batch, p_pair=p_pair)
    rng = random.Random(seed)
    captions = ["" if rng.random() < r.cfg_drop else c for c in captions]
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=gen)
    levels = draw(r.batch, gen) if draw is not None else sample_t(r.batch, r.t_sampler, generator=gen)
    return process_in(images, latent_scale, latent_shift), captions, noise, time_shift(levels, r.t_shift)


# --- checkpoints ----------------------------------------------------------------------------------
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


def export(path, ema: ToySD3, r: Recipe, latent_scale: float, latent_shift: float, extra: dict | None = None):
    """The shipped format: EMA weights in float16 plus what ``load_toy`` needs to rebuild the pipeline."""
    cfg = asdict(ema.mmdit.config)
    meta = {"mmdit": cfg, "text": ema.text.config, "latent_scale": latent_scale,
            "latent_shift": latent_shift, "image_size": data.IMAGE_SIZE, "recipe": asdict(r),
            "defaults": toy_defaults(r)} | (extra or {})
    sd = {f"mmdit.{k}": v.half() for k, v in ema.mmdit.state_dict().items()}
    sd |= {f"text.{k}": v.half() for k, v in ema.text.state_dict().items()}
    save_state_dict(sd, path, metadata={"sd3mini_toy": json.dumps(meta)})      # atomic: a temporary file, renamed


# --- evaluation -----------------------------------------------------------------------------------
def toy_defaults(r: Recipe) -> dict:
    """How a model of this recipe samples by default (stored in its exported file)."""
    return dict(steps=20, cfg_scale=r.cfg_scale, shift=r.t_shift, sampler="euler")


def generate(pipe, captions, *, seed=0, batch=100, **options) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] for ``captions`` through ``pipe``, image i from seed ``seed + i``;
    ``options`` are the pipeline's (steps, cfg_scale, shift, ...)."""
    return torch.cat([pipe(captions[i: i + batch], seed=seed + i, output="tensor", progress=False, **options)
                      for i in range(0, len(captions), batch)])


def evaluate(pipe, captions, **options) -> dict:
    """The judge's scores (colour, shape, size, cell, relation, all) of ``pipe``'s images of ``captions``."""
    from .judge import score

    return score(generate(pipe, captions, **options), captions)


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


RUN_FILES = ("last.safetensors", "toy_sd3.safetensors", "train_log.jsonl")


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


class StopOnSignal:
    """SIGINT and SIGTERM ask the loop to stop after the current step, which then saves as at the end.
    A second SIGINT interrupts at once (the usual KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def requested(self, world: int, device, time_up: bool = False) -> bool:
        """Whether to stop now (a signal, or ``time_up``); under DDP every rank stops at the same step when
        any rank asks, so none is left waiting in a collective."""
        stop = self.received is not None or time_up
        if world > 1:
            flag = torch.tensor([float(stop)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop


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


@dataclass
class Run:
    """What the loop carries: the models, the optimizer, where it is, and where it writes."""
    r: Recipe
    out: Path
    model: ToySD3
    ema: ToySD3
    opt: torch.optim.Optimizer
    forward: nn.Module
    scale: float
    shift: float
    rank: int
    world: int
    device: torch.device
    step: int = 0
    start: float = 0.0
    meta: dict | None = None
    log: object = None
    evals: list | None = None

    def batch(self):
        x0, captions, noise, sigma = training_batch(self.r, self.step, self.rank, self.scale, self.shift)
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
    rank, world, device = _setup_distributed()
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
    scale, shift = data_stats()
    forward = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    run = Run(r, out, model, ema, opt, forward, scale, shift, rank, world, device)
    elapsed = 0.0
    if resume:
        saved = load_training_state(out / "last.safetensors", model, ema, opt)
        run.step, elapsed = saved["step"], saved["elapsed"]
        if rank == 0:
            trim_log(out / "train_log.jsonl", run.step)
    run.start = time.time() - elapsed
    run.meta = {"recipe": asdict(r), "world": world, "params": sum(p.numel() for p in model.parameters()),
                "latent_scale": scale, "latent_shift": shift}
    run.log = open(out / "train_log.jsonl", "a") if rank == 0 else None
    run.evals = eval_captions_subset(eval_size)
    return run


def _log(run: Run, loss: float, eval_every: int):
    """One row of train_log.jsonl (rank 0); every ``eval_every`` steps the judge's scores of the EMA model."""
    if run.log is None:
        return
    record = {"step": run.step, "loss": round(loss, 5), "minutes": round(run.minutes(), 3)}
    if eval_every and run.step % eval_every == 0:
        from .model import pipeline_of

        pipe = pipeline_of(run.ema.mmdit, run.ema.text, run.scale, run.shift, toy_defaults(run.r), run.device)
        record["eval"] = evaluate(pipe, run.evals)
        tqdm.write(f"step {run.step}: " + ", ".join(f"{k} {v:.2f}" for k, v in record["eval"].items()))
    run.log.write(json.dumps(record) + "\n")
    run.log.flush()


def _save(run: Run, **extra):
    """last.safetensors (to resume) and toy_sd3.safetensors (the EMA weights), on rank 0."""
    run.meta["elapsed"] = time.time() - run.start
    if run.rank == 0:
        save_training_state(run.out / "last.safetensors", run.model, run.ema, run.opt, run.step, run.meta)
        export(run.out / "toy_sd3.safetensors", run.ema, run.r, run.scale, run.shift,
               {"steps_trained": run.step, "world": run.world} | extra)


def _finish(run: Run):
    """Save, close the log; under DDP, check that every rank ended with the same weights."""
    _save(run, minutes=round(run.minutes(), 2))
    if run.log is not None:
        run.log.close()
    if run.world == 1:
        return
    flat = torch.cat([p.detach().flatten() for p in list(run.model.parameters()) + list(run.ema.parameters())])
    gathered = [torch.empty_like(flat) for _ in range(run.world)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    if run.rank == 0:
        print(f"ranks agree: weights {'identical' if same else 'DIFFERENT'} across {run.world} ranks")
    # Tear down in order: gloo's worker thread frees each finished collective (which needs the GIL), so
    # wait for it (a barrier) and drop DDP's reducer while the group is still registered; destroying the
    # group with a collective still to be freed deadlocked at exit (the worker waits for the GIL, the
    # main thread holds it while joining the worker).
    dist.barrier()
    run.forward = run.model
    dist.destroy_process_group()
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


def eval_captions_subset(n: int) -> list[str]:
    """An even mix of single-object and two-object captions from the fixed evaluation set."""
    full = data.eval_captions()
    half = n // 2
    return full[:half] + full[150: 150 + n - half]


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
