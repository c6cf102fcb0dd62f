"""Re-run the paper's three central experiments on the shapes world (chapter 16).

    python -m sd3mini.toy.paper formulations --seeds 0 1 2     # 5 formulations, same network and budget
    python -m sd3mini.toy.paper backbones --seeds 0 1 2        # MM-DiT vs DiT vs CrossDiT
    python -m sd3mini.toy.paper scaling --seeds 0 1 2          # depth d = 1..5, width 32 d, heads d
    python -m sd3mini.toy.paper noise-levels --seeds 0         # formulations: high noise, pictures
    python -m sd3mini.toy.paper edm-sampler --seeds 0          # EDM with Heun's steps (after noise-levels)

Every arm is one short training run of the tiny SD3 (the text encoder and data of ``train-toy``), judged
two ways at the end and along the way:

- **validation loss**: one fixed held-out set of captions, images, noises and noise levels t (8 levels,
  evenly spaced), scored for every formulation by rectified flow's velocity error at the same
  signal-to-noise ratio (``formulations.rf_velocity_error``), averaged over t so that every noise level
  counts once, whatever the weighting a formulation trained with;
- **the judge** (``judge.score``) on 120 fixed captions, sampled with the formulation's own sampler at
  5, 10 and 25 steps.

Each arm writes ``OUT/arms/<arm>.json`` when it ends and is skipped when that file exists,
so a sweep that is stopped continues where it was; ``--workers 2`` runs two arms at once, each on one
thread (on two cores, half the wall time and the same numbers); ``--collect`` merges the files into the package's
results (``sd3mini/toy/results/paper_<experiment>.json``).
"""

import argparse
import copy
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import formulations as fm
from ..book import RESULTS
from ..flow import process_in, process_out
from ..pipeline import image_grid
from ..vae import tensor_to_images
from . import data, judge
from .backbones import build_backbone
from .data import data_stats, training_batch
from .model import ToyTextEncoder, toy_mmdit_config
from .recipe import Recipe
from .train import optimizer_step

STEP_COUNTS = (5, 10, 25)
VAL_LEVELS = 8


@dataclass(frozen=True)
class Arm:
    """One configuration: a formulation, a backbone and a size, trained with the short recipe."""
    formulation: str = "rf/lognorm"   # one of formulations.FORMULATIONS
    backbone: str = "mmdit"            # one of backbones.BACKBONES
    depth: int = 4                     # blocks
    width: int = 128                   # the backbone's hidden size
    heads: int = 2
    steps: int = 2000                  # training steps (short_recipe's schedule)
    batch: int = 48
    seed: int = 0                      # of the initial weights and of the batches

    def name(self) -> str:
        return (f"{self.formulation.replace('/', '-')}_{self.backbone}_d{self.depth}w{self.width}h{self.heads}"
                f"_seed{self.seed}")


def short_recipe(arm: Arm) -> Recipe:
    """``train-toy``'s recipe shortened to ``arm.steps``: single objects for the first half (grid position is
    taught by single-object captions only, and took ~500 steps of them; with a fifth, 400 steps, no arm
    learned it: benchmarks/RESULTS.md), then half pairs, the learning rate cooled to 0 over the last 40%;
    the resolution shift 3 for every formulation."""
    return Recipe(steps=arm.steps, batch=arm.batch, warmup=200, cooldown=int(0.4 * arm.steps),
                  singles_first=arm.steps // 2, p_pair=0.5, t_shift=3.0, seed=arm.seed, width=arm.width,
                  depth=arm.depth, heads=arm.heads)


class Denoiser(nn.Module):
    """Text encoder + backbone; ``forward(z, t, tokens)`` -> the network's raw output for the formulation."""

    def __init__(self, arm: Arm, r: Recipe):
        super().__init__()
        self.formulation = arm.formulation
        self.text = ToyTextEncoder(width=r.text_width, layers=r.text_layers, heads=2)
        config = toy_mmdit_config(arm.width, arm.depth, r.patch, r.text_width, heads=arm.heads)
        self.net = build_backbone(arm.backbone, config)

    def forward(self, z, t, tokens=None, text=None):
        context, pooled = text if text is not None else self.text(tokens)
        return self.net(fm.network_input(self.formulation, z, t), 1000 * t, y=pooled, context=context)


def validation_set(latent_scale: float, latent_shift: float, n: int = 128, seed: int = 20261204):
    """Held-out images, captions and noises (a seed no training batch uses), and the noise levels t."""
    images, captions, _ = data.batch(seed, n, p_pair=0.5)
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    levels = (torch.arange(VAL_LEVELS) + 0.5) / VAL_LEVELS
    return process_in(images, latent_scale, latent_shift), captions, eps, levels


@torch.no_grad()
def validation_loss(model: Denoiser, val) -> dict:
    """Rectified flow's velocity error per noise level, and its mean over the levels ("loss")."""
    x0, captions, eps, levels = val
    text = model.text(model.text.tokenize(captions))
    per_level = []
    for t in levels:
        t = t.expand(len(x0))
        z = fm.noisy(model.formulation, x0, eps, t)
        per_level.append(fm.rf_velocity_error(model.formulation, model(z, t, text=text), z, t, x0, eps).mean())
    return {"loss": float(torch.stack(per_level).mean()), "per_level": [round(float(v), 5) for v in per_level]}


@torch.no_grad()
def generate(model: Denoiser, captions: list[str], steps: int, cfg_scale: float = 2.0, seed: int = 0,
             shift: float = 3.0, heun: bool = False) -> torch.Tensor:
    """Images (B, 3, 32, 32) in model space with the formulation's own sampler and classifier-free guidance;
    ``heun``: EDM's second-order steps (``formulations.heun_step``, 2 steps - 1 network calls) for edm."""
    name = model.formulation
    cond = model.text(model.text.tokenize(captions))
    uncond = model.text(model.text.tokenize([""] * len(captions)))
    text = tuple(torch.cat([c, n]) for c, n in zip(cond, uncond))

    def predict(z, t):                                  # (x0_hat, eps_hat) with guidance
        out_c, out_u = model(torch.cat([z, z]), t.expand(2 * len(captions)), text=text).chunk(2)
        out = out_u + cfg_scale * (out_c - out_u)        # affine in the output, so the same as guiding x0
        return fm.predict_x0_eps(name, out, z, t.expand(len(captions)))

    ts = fm.sampling_t(name, steps, shift)
    a, b = fm.path(name, ts[0])
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(captions), 3, data.IMAGE_SIZE, data.IMAGE_SIZE, generator=gen) * torch.sqrt(a**2 + b**2)
    for t, t_next in zip(ts[:-1], ts[1:]):
        x0, eps = predict(z, t)
        z_next = fm.ddim_step(name, x0, eps, t_next)
        if heun and float(t_next) > 0:                  # the last step, to t = 0, stays Euler's (EDM's too)
            z_next = fm.heun_step(name, x0, eps, predict(z_next, t_next)[1], t, t_next)
        z = z_next
    return z


def judge_scores(model: Denoiser, latent_scale: float, latent_shift: float, n: int = 120,
                 heun: bool = False) -> dict:
    """{steps: {"singles": score, "pairs": score, "held_out_pairs": score}} on fixed captions."""
    captions = data.eval_captions()[: n // 2] + data.eval_captions()[150: 150 + n // 2]
    result = {}
    for steps in STEP_COUNTS:
        images = process_out(generate(model, captions, steps, heun=heun), latent_scale, latent_shift)  # [-1, 1]
        groups = {"singles": captions[: n // 2],
                  "pairs": [c for c in captions[n // 2:] if not data.uses_held_out(c)],
                  "held_out_pairs": [c for c in captions[n // 2:] if data.uses_held_out(c)]}
        index = {c: i for i, c in enumerate(captions)}
        result[str(steps)] = {g: {k: round(v, 4) for k, v in judge.score([images[index[c]] for c in cs], cs).items()}
                              | {"n": len(cs)} for g, cs in groups.items()}
    return result


def flops_per_image(model: Denoiser) -> int:
    """Forward FLOPs of the backbone for one image and its caption (matrix products; the counter's)."""
    z, t = torch.zeros(1, 3, data.IMAGE_SIZE, data.IMAGE_SIZE), torch.full((1,), 0.5)
    with torch.no_grad():
        text = model.text(model.text.tokenize(["a red circle"]))
        with FlopCounterMode(display=False) as counter:
            model.net(z, 1000 * t, y=text[1], context=text[0])
    return counter.get_total_flops()


def train_arm(arm: Arm, val_every: int = 250, progress: bool = False) -> tuple[Denoiser, dict]:
    """Train one arm from scratch: its EMA model, and a log of the validation curve and training loss."""
    r = short_recipe(arm)
    torch.manual_seed(arm.seed)
    model = Denoiser(arm, r)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, betas=(0.9, 0.99), weight_decay=r.weight_decay)
    latent_scale, latent_shift = data_stats()
    val = validation_set(latent_scale, latent_shift)
    draw = lambda n, generator: fm.train_t(arm.formulation, n, generator)  # noqa: E731  (each its own levels)
    curve, losses = [], []
    for step in range(r.steps):
        x0, captions, eps, t = training_batch(r, step, 0, latent_scale, latent_shift, draw)
        z = fm.noisy(arm.formulation, x0, eps, t)
        loss = fm.loss(arm.formulation, model(z, t, model.text.tokenize(captions)), x0, eps, t)
        losses.append(optimizer_step(model, ema, opt, r, step, loss).item())
        if (step + 1) % val_every == 0 or step + 1 == r.steps:
            curve.append({"step": step + 1, **validation_loss(ema, val)})
            if progress:
                print(f"{arm.name()} step {step + 1}: val {curve[-1]['loss']:.4f}", flush=True)
    return ema, {"train_loss": [round(sum(losses[i:i + 50]) / 50, 5) for i in range(0, len(losses), 50)], "val": curve}


def run_arm(arm: Arm, val_every: int = 250, judge_captions: int = 120, progress: bool = False) -> dict:
    """Train one arm from scratch; returns its validation curve, final judge scores, size and cost."""
    start = time.time()
    ema, log = train_arm(arm, val_every, progress)
    flops = flops_per_image(ema)
    return {"arm": asdict(arm), "recipe": asdict(short_recipe(arm)),
            "params": sum(p.numel() for p in ema.net.parameters()),
            "text_params": sum(p.numel() for p in ema.text.parameters()),
            "flops_per_image": flops, "train_flops_per_step": 3 * flops * arm.batch, **log,
            "judge": judge_scores(ema, *data_stats(), judge_captions),
            "minutes": round((time.time() - start) / 60, 2)}


def experiment_arms(name: str, seeds) -> list[Arm]:
    if name == "formulations":
        return [Arm(formulation=f, seed=s) for s in seeds for f in fm.FORMULATIONS]
    if name == "backbones":
        # Matched parameters (within 4%): MM-DiT has two weight sets per block, DiT one (so 7 blocks for
        # MM-DiT's 4, and with every token through every weight, 1.8 x the FLOPs), a CrossDiT block about
        # 0.7 of a joint block (5 blocks). DiT with 4 blocks matches MM-DiT's FLOPs instead (half the
        # weights per block).
        return [Arm(backbone=b, depth=d, seed=s) for s in seeds
                for b, d in (("mmdit", 4), ("dit", 7), ("dit", 4), ("crossdit", 5))]
    if name == "scaling":
        return [Arm(depth=d, width=32 * d, heads=d, seed=s) for s in seeds for d in (1, 2, 3, 4, 5)]
    raise ValueError(f"unknown experiment {name!r}")


def run_and_save(arm: Arm, path: Path):
    """One arm, written to ``path`` when it ends (through a temporary file, so a stopped run leaves none)."""
    print(f"{time.strftime('%H:%M:%S')} {arm.name()}", flush=True)
    result = run_arm(arm, progress=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    print(f"{time.strftime('%H:%M:%S')} {arm.name()} done in {result['minutes']} min: "
          f"val {result['val'][-1]['loss']:.4f}", flush=True)


def sweep(name: str, seeds, out: Path, steps: int | None = None, workers: int = 1):
    """Run every arm of an experiment that has no result file yet, ``workers`` at a time (each on one
    thread, so a run gives the same numbers alone or beside another). Results live in ``out/arms/`` by
    arm, so the arm formulations and backbones share (rf/lognorm, MM-DiT, depth 4, 2 heads) runs once;
    scaling's depth 4 has 4 heads (32 channels each, as at every depth) and its own runs."""
    folder = out / "arms"
    folder.mkdir(parents=True, exist_ok=True)
    arms = [replace(arm, steps=steps) if steps else arm for arm in experiment_arms(name, seeds)]
    paths = [(arm, folder / f"{arm.name()}.json") for arm in arms]
    todo = [(arm, path) for arm, path in paths if not path.exists()]
    print(f"{time.strftime('%H:%M:%S')} {name}: {len(todo)} of {len(arms)} arms to run, {workers} at a time",
          flush=True)
    if workers == 1:
        for arm, path in todo:
            run_and_save(arm, path)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for job in as_completed([pool.submit(run_and_save, arm, path) for arm, path in todo]):
            job.result()


HIGH_LEVELS = (0.97, 0.99, 0.998)      # above the validation's top level 0.9375: b/a = 32, 99, 499 on rf's path
SAMPLE_CAPTIONS = ("a large red circle in the top left", "a small blue square in the center",
                   "a large yellow triangle in the bottom right", "a small green square in the top right",
                   "a large purple circle in the bottom left", "a small orange triangle in the left")


def few_step_gap(model: Denoiser, latent_scale: float, latent_shift: float, n: int = 60,
                 reference_steps: int = 100) -> dict:
    """How far few-step samples are from where the sampler converges: the root-mean-square pixel
    difference (pixels in [-1, 1]) between samples at 5, 10 and 25 steps and at ``reference_steps``,
    from the same noise, on ``n`` fixed captions."""
    captions = data.eval_captions()[:n]
    images = {steps: process_out(generate(model, captions, steps), latent_scale, latent_shift).clamp(-1, 1)
              for steps in (*STEP_COUNTS, reference_steps)}
    return {str(steps): round(float((images[steps] - images[reference_steps]).pow(2).mean().sqrt()), 5)
            for steps in STEP_COUNTS}


PICTURE_STEPS = (5, 25)
PICTURE_GAP = 2                        # white pixels between the pictures' tiles


def pictures(models: dict, latent_scale: float, latent_shift: float) -> Image.Image:
    """One picture: a row per (formulation, steps) in ``models``' order and ``PICTURE_STEPS``, a column per
    ``SAMPLE_CAPTIONS``, each sampled from the same noise with the formulation's own sampler."""
    tiles = [image for model in models.values() for steps in PICTURE_STEPS for image in tensor_to_images(
        process_out(generate(model, list(SAMPLE_CAPTIONS), steps), latent_scale, latent_shift))]
    return image_grid(tiles, cols=len(SAMPLE_CAPTIONS), gap=PICTURE_GAP)


def noise_levels(base: Arm = Arm(), out: Path = Path("runs/paper"), results: Path | None = None,
                 gap_captions: int = 60) -> Path:
    """Train each formulation's ``base`` arm again (seed 0: the sweep's very run, with the same seed,
    batches and thread count, so the same validation loss), then measure what the sweep did not: the
    error at three noise levels above the validation's, how far 5, 10 and 25 sampling steps land from
    100 (``few_step_gap``), and pictures at 5 and 25 steps (``paper_noise_levels.json`` and ``.png``).
    The EMA models are kept in ``out/models/``."""
    (out / "models").mkdir(parents=True, exist_ok=True)
    latent_scale, latent_shift = data_stats()
    x0, captions, eps, levels = validation_set(latent_scale, latent_shift)
    val = (x0, captions, eps, torch.cat([levels, torch.tensor(HIGH_LEVELS)]))
    rows, models = [], {}
    for name in fm.FORMULATIONS:
        arm = replace(base, formulation=name)
        print(f"{time.strftime('%H:%M:%S')} noise levels: {arm.name()}", flush=True)
        models[name], log = train_arm(arm, val_every=arm.steps)          # validated once, at the end
        save_file(models[name].state_dict(), out / "models" / f"{arm.name()}.safetensors")
        rows.append({"arm": asdict(arm), "val": log["val"][-1]["loss"],            # the sweep's 8 levels
                     "per_level": validation_loss(models[name], val)["per_level"],  # at all 11 levels
                     "few_step_gap": few_step_gap(models[name], latent_scale, latent_shift, gap_captions)})
    target = (results or RESULTS) / "paper_noise_levels.json"
    pictures(models, latent_scale, latent_shift).save(target.with_suffix(".png"))
    target.write_text(json.dumps({
        "command": "OMP_NUM_THREADS=1 python -m sd3mini.toy.paper noise-levels --seeds 0",
        "levels": [round(float(t), 4) for t in val[3]], "arms": rows, "captions": list(SAMPLE_CAPTIONS),
        "png": {"rows": [[name, steps] for name in fm.FORMULATIONS for steps in PICTURE_STEPS],
                "tile": data.IMAGE_SIZE, "gap": PICTURE_GAP}}, indent=1) + "\n")
    return target


def edm_sampler(base: Arm = Arm(formulation="edm"), out: Path = Path("runs/paper"), results: Path | None = None,
                judge_captions: int = 120) -> Path:
    """EDM judged with its own sampler, Heun's steps, beside the Euler steps the sweep took
    (``paper_edm_sampler.json``): the model noise-levels kept in ``out/models/`` (seed 0), on the
    judge's captions and noises, so the Euler scores are the sweep's for that model."""
    weights = out / "models" / f"{base.name()}.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights} not found: noise-levels trains and keeps it "
                                f"(python -m sd3mini.toy.paper noise-levels --seeds {base.seed})")
    model = Denoiser(base, short_recipe(base))
    model.load_state_dict(load_file(weights))
    stats = data_stats()
    target = (results or RESULTS) / "paper_edm_sampler.json"
    target.write_text(json.dumps({
        "command": f"OMP_NUM_THREADS=1 python -m sd3mini.toy.paper edm-sampler --seeds {base.seed}",
        "arm": asdict(base), "network_calls": {"euler": {str(s): s for s in STEP_COUNTS},
                                               "heun": {str(s): 2 * s - 1 for s in STEP_COUNTS}},
        "euler": judge_scores(model, *stats, judge_captions),
        "heun": judge_scores(model, *stats, judge_captions, heun=True)}, indent=1) + "\n")
    return target


COMMANDS = {name: f"OMP_NUM_THREADS=1 python -m sd3mini.toy.paper {name} --seeds 0 1 2"
            for name in ("formulations", "backbones", "scaling")}


def collect(name: str, out: Path, seeds=(0, 1, 2), results: Path | None = None) -> Path:
    """Merge an experiment's finished arms into ``sd3mini/toy/results/paper_<name>.json`` (what chapter 16
    reads); arms not finished yet are listed as missing."""
    arms, missing = [], []
    for arm in experiment_arms(name, seeds):
        path = out / "arms" / f"{arm.name()}.json"
        if path.exists():
            arms.append(json.loads(path.read_text()))
        else:
            missing.append(arm.name())
    target = (results or RESULTS) / f"paper_{name}.json"
    target.write_text(json.dumps({"experiment": name, "command": COMMANDS[name], "seeds": list(seeds),
                                  "val_levels": VAL_LEVELS, "step_counts": list(STEP_COUNTS),
                                  "arms": arms, "missing": missing}, indent=1) + "\n")
    return target


def spread(values) -> dict:
    """mean, min and max of a list of numbers (one per seed)."""
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def configurations(results: dict) -> list[tuple[dict, list[dict]]]:
    """A ``collect``ed experiment's arms grouped by configuration (the arm less its seed), in the order
    the experiment lists them: [(configuration, [its arms, one per seed])]."""
    groups = {}
    for arm in results["arms"]:
        config = {k: v for k, v in arm["arm"].items() if k != "seed"}
        groups.setdefault(json.dumps(config, sort_keys=True), (config, []))[1].append(arm)
    return list(groups.values())


def summary(results: dict) -> list[dict]:
    """One row per configuration of a ``collect``ed experiment, its seeds pooled: the final validation
    loss and every judge score (per step count, caption group and metric) as ``spread``s over the
    seeds that have finished, in the order the experiment lists its arms."""
    rows = []
    for config, arms in configurations(results):
        first = arms[0]["judge"]
        judged = {steps: {group: {metric: spread([a["judge"][steps][group][metric] for a in arms])
                                  for metric in scores if metric != "n"}
                          for group, scores in by_group.items()}
                  for steps, by_group in first.items()}
        rows.append({**config, "seeds": [a["arm"]["seed"] for a in arms], "params": arms[0]["params"],
                     "flops_per_image": arms[0]["flops_per_image"],
                     "val": spread([a["val"][-1]["loss"] for a in arms]), "judge": judged})
    return rows


def compute_curves(results: dict) -> list[dict]:
    """One curve per configuration: the validation loss at each validation step (a ``spread`` over the
    seeds) against the training compute spent so far, ``train_flops_per_step`` x step (the forward pass
    and the backward, twice its cost, per image, times the batch)."""
    curves = []
    for config, arms in configurations(results):
        steps = [e["step"] for e in arms[0]["val"]]
        curves.append({**config, "steps": steps, "flops": [arms[0]["train_flops_per_step"] * s for s in steps],
                       "loss": [spread([a["val"][i]["loss"] for a in arms]) for i in range(len(steps))]})
    return curves


def frontier(curves: list[dict]) -> list[dict]:
    """The compute-optimal frontier of ``compute_curves``: the points no configuration beats (in mean
    loss) with as much compute or less, in order of compute, each with the index of its curve."""
    points = sorted((c, loss["mean"], i) for i, curve in enumerate(curves)
                    for c, loss in zip(curve["flops"], curve["loss"]))
    best = []
    for c, loss, i in points:
        if not best or loss < best[-1]["loss"]:
            best.append({"flops": c, "loss": loss, "curve": i})
    return best


def power_law(compute, loss) -> dict:
    """The least-squares line through (log compute, log loss): loss ~ k * compute ** slope."""
    x, y = (torch.tensor(v, dtype=torch.float64).log() for v in (compute, loss))
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum())
    return {"k": float((y.mean() - slope * x.mean()).exp()), "slope": slope}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sd3mini.toy.paper", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=("formulations", "backbones", "scaling", "noise-levels", "edm-sampler"))
    p.add_argument("--collect", action="store_true", help="merge the finished arms into the package's "
                                                          "results (sd3mini/toy/results/paper_*.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("runs/paper"))
    p.add_argument("--steps", type=int, help="shorter runs (tests)")
    p.add_argument("--threads", type=int, default=1, help="threads of noise-levels (a sweep's arms use one each)")
    p.add_argument("--workers", type=int, default=1, help="arms run at once (2 on a 2-core machine)")
    args = p.parse_args(argv)
    if args.collect:
        print(f"wrote {collect(args.experiment, args.out, args.seeds)}")
        return
    torch.set_num_threads(args.threads)
    if args.experiment == "noise-levels":
        print(f"wrote {noise_levels(Arm(seed=args.seeds[0]), args.out)}")
        return
    if args.experiment == "edm-sampler":
        print(f"wrote {edm_sampler(Arm(formulation='edm', seed=args.seeds[0]), args.out)}")
        return
    sweep(args.experiment, args.seeds, args.out, args.steps, args.workers)


if __name__ == "__main__":
    main()
