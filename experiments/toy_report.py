"""Measure the tiny SD3 and write the numbers the training chapter and the README show.

    python experiments/toy_report.py eval                    # the shipped model on the 300 fixed captions
    python experiments/toy_report.py eval --ckpt runs/x/toy_sd3.safetensors --cfg 1 1.5 2 3 4 6
    python experiments/toy_report.py pairs                   # 100 new pair captions (another seed), as the CLI draws
    python experiments/toy_report.py log runs/shipped        # the shipped run's curve
    python experiments/toy_report.py log runs/posA:0 runs/pairs90:5000 runs/ship25:15000 --out ...  # a staged run
    python experiments/toy_report.py log runs/posA --out sd3mini/toy/results/toy_run_half_pairs.json
    python experiments/toy_report.py ablation runs/ab_logit_normal runs/ab_uniform runs/ab_cosmap --steps 2000
    python experiments/toy_report.py ablation runs/ln runs/s3 --steps 7000 --no-final --out sd3mini/toy/results/toy_shift.json
    python experiments/toy_report.py latent runs/latent:runs/ab_logit_normal_shift1 runs/latent_s3:runs/ab_logit_normal
    python experiments/toy_report.py trace runs/three_stage_toy_sd3.safetensors sd3mini/assets/toy_sd3.safetensors
    python experiments/toy_report.py order runs/old/toy_sd3.safetensors runs/ship/toy_sd3.safetensors   # word order
    python experiments/toy_report.py samples runs/a/toy_sd3.safetensors runs/b/toy_sd3.safetensors   # one row each

The runs they read (constant learning rate, single objects; S = logit_normal, uniform, cosmap):
    python -m sd3mini train-toy --t-sampler S --p-pair 0 --steps 2000 --cooldown 0 --cfg-scale 4 --eval-every 500 --out runs/ab_S
    python -m sd3mini train-toy --t-shift 1 --p-pair 0 --steps 2000 --cooldown 0 --cfg-scale 4 --eval-every 500 --out runs/ab_logit_normal_shift1
    python -m sd3mini train-toy --eval-every 1000 --seed N --out runs/p50_seedN   # the one-hour recipe, seeds 0-3
    torchrun --nproc_per_node=2 -m sd3mini train-toy --recipe shipped --eval-every 1000 --out runs/shipped

Evaluation protocol: ``sd3mini.toy.data.eval_captions()`` (150 fully specified single objects, 150 related
pairs, held-out colour-shape pairs included), caption i drawn from noise seed i, the model's default
sampler (Euler, 20 steps, shift 3) with its default CFG and without CFG, judged by ``sd3mini.toy.judge``.
"""

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sd3mini.checkpoint import file_metadata
from sd3mini.toy import data
from sd3mini.toy.judge import judge, pair_parts, score
from sd3mini.toy.model import same_word_cosines, shipped_path, toy_pipeline

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "sd3mini" / "toy" / "results"    # package data; the book reads it with sd3mini.book
KEYS = ("colour", "shape", "size", "cell", "relation", "all")


def portable(arg: str) -> str:
    """A path as it would be typed from the repository root (the JSON files are committed)."""
    return os.path.relpath(arg, ROOT) if os.path.isabs(arg) else arg


def command() -> str:
    return " ".join(":".join(map(portable, arg.split(":"))) for arg in sys.argv)   # LATENT_DIR:PIXEL_RUN too


def summarize(results: list[dict]) -> dict:
    return {k: round(float(np.mean([r[k] for r in results if r[k] is not None])), 4)
            if any(r[k] is not None for r in results) else None for k in KEYS} | {"n": len(results)}


def evaluate_checkpoint(ckpt=None, cfg_scales=(None, 1.0)) -> dict:
    pipe = toy_pipeline(ckpt)
    captions = data.eval_captions()
    held = [data.uses_held_out(c) for c in captions]
    report = {"checkpoint": portable(str(ckpt)) if ckpt else shipped_path().name, "captions": len(captions), "held_out_captions": sum(held),
              "sampler": dict(pipe.defaults)}
    for cfg in cfg_scales:
        label = f"cfg {cfg if cfg is not None else pipe.defaults['cfg_scale']:g}"
        t0 = time.perf_counter()
        images = []
        for i in range(0, len(captions), 50):          # batches of 50; caption i uses seed i
            images += pipe(captions[i: i + 50], seed=i, cfg_scale=cfg, progress=False)
        seconds = time.perf_counter() - t0
        results = [judge(im, c) for im, c in zip(images, captions)]
        report[label] = {"all_captions": summarize(results),
                         "seen": summarize([r for r, h in zip(results, held) if not h]),
                         "held_out": summarize([r for r, h in zip(results, held) if h]),
                         "single_objects": summarize(results[:150]), "pairs": summarize(results[150:]),
                         "single_held_out": summarize([r for r, h in zip(results[:150], held) if h]),
                         "pairs_held_out": summarize([r for r, h in zip(results[150:], held[150:]) if h]),
                         "seconds_per_image": round(seconds / len(captions), 4)}
    gt_images, gt_captions, _ = data.batch(2024, 1000, holdout=False, dropout=True)
    report["judge_on_ground_truth"] = {k: round(v, 4) for k, v in score(gt_images, gt_captions).items()}
    return report


def word_order(ckpt) -> dict:
    """Does the text encoder see word order, and does the image follow it? ``same_word_cosines`` on
    ``ORDER_PAIR`` (1.0: the encoder cannot tell subject from object), and on 120 pair captions of the
    evaluation set: both colours found, arranged as the caption says, both shapes (``judge.pair_parts``)."""
    pipe = toy_pipeline(ckpt)
    cosines = {w: round(c, 4) for w, c in
               same_word_cosines(pipe.text_encoder, words=("red", "circle", "blue", "square", "above")).items()}
    captions = data.eval_captions()[150:270]
    parts = [pair_parts(im, c) for im, c in zip(pipe(captions, seed=0, progress=False), captions)]
    drawn = [p for p in parts if p["colours"]]
    both, arranged, shapes = len(drawn), sum(p["arranged"] for p in drawn), sum(p["shapes"] for p in drawn)
    steps = json.loads(file_metadata(ckpt)["sd3mini_toy"]).get("steps_trained")
    return {"checkpoint": Path(ckpt).name, "steps_trained": steps, "cosines": cosines, "pair_captions": len(captions),
            "both_colours": both, "arranged": arranged, "both_shapes": shapes}


def fresh_pairs(ckpt=None, n: int = 100, seed: int = 20261202) -> dict:
    """``n`` new pair captions (drawn with ``seed``, none of them in the evaluation set; every colour-shape
    combination, held-out ones included), as the CLI would draw them: caption i from noise seed 10 000 + i,
    the model's default sampler. Judged twice: fully specified, and with the size words left out."""
    from sd3mini.toy.judge import generate

    pipe = toy_pipeline(ckpt)
    rng, known, scenes = random.Random(seed), set(data.eval_captions()), []
    while len(scenes) < n:
        scene = data.random_scene(rng, p_pair=1.0, holdout=False)
        if data.caption(scene) not in known:                  # new, and drawn once
            known.add(data.caption(scene))
            scenes.append(scene)
    phrasings = {"full": [data.caption(sc) for sc in scenes],
                 "no_sizes": [" ".join((data.describe(sc.objects[0], False, True), sc.relation,
                                        data.describe(sc.objects[1], False, True))) for sc in scenes]}
    report = {"checkpoint": portable(str(ckpt)) if ckpt else shipped_path().name, "pairs": n, "caption_seed": seed,
              "noise_seeds": [10_000, 10_000 + n - 1], "sampler": dict(pipe.defaults), "command": command()}
    for name, captions in phrasings.items():
        images = generate(pipe, captions, seed=10_000)
        results = [judge(im, c) for im, c in zip(images, captions)]
        parts = [pair_parts(im, c) for im, c in zip(images, captions)]
        held = [data.uses_held_out(c) for c in captions]
        report[name] = {"seen": summarize([r for r, h in zip(results, held) if not h]),
                        "held_out": summarize([r for r, h in zip(results, held) if h]),
                        "both_colours": sum(p["colours"] for p in parts),
                        "arranged": sum(bool(p["arranged"]) for p in parts),
                        "both_shapes": sum(bool(p["shapes"]) for p in parts),
                        "examples": captions[:3]}
    return report


def swap_shapes(caption: str) -> str:
    """A pair caption with its two shape words exchanged."""
    words = caption.split()
    first = next(i for i, w in enumerate(words) if w in data.SHAPES)
    words[first], words[-1] = words[-1], words[first]
    return " ".join(words)


def shape_trace(ckpts: list[str]) -> dict:
    """Does a pair fail where the text encoder carries little of each object's shape? Per checkpoint, for
    every evaluation pair caption whose two shapes differ: the trace of the shapes in the fainter colour
    word (1 - cosine of its state when the two shape words swap), and whether the image (seed 0, the
    model's default sampler) has both shapes right (``judge.pair_parts``; a colour not drawn counts as a
    wrong shape)."""
    captions = [c for c in data.eval_captions()[150:]
                if len({o["shape"] for o in data.parse_caption(c)["objects"]}) == 2]
    models = []
    for ckpt in ckpts:
        pipe = toy_pipeline(ckpt)
        traces = []
        for c in captions:
            c1, c2 = (o["colour"] for o in data.parse_caption(c)["objects"])
            cos = same_word_cosines(pipe.text_encoder, (c, swap_shapes(c)), words=(c1, c2))
            traces.append(round(1 - max(cos[c1], cos[c2]), 4))
        images = pipe(captions, seed=0, progress=False)
        models.append({"checkpoint": portable(ckpt), "sampler": dict(pipe.defaults),
                       "steps_trained": json.loads(file_metadata(ckpt)["sd3mini_toy"]).get("steps_trained"),
                       "trace": traces, "shapes_right": [bool(pair_parts(im, c)["shapes"]) for im, c in zip(images, captions)]})
    return {"captions": captions, "models": models}


CELL_CAPTIONS = ("a large red circle in the top left", "a small blue square in the top",
                 "a large yellow triangle in the top right", "a small green square in the left",
                 "a large purple circle in the center", "a small orange triangle in the right",
                 "a large blue triangle in the bottom left", "a small red square in the bottom",
                 "a large green triangle in the bottom right")   # one per grid cell, none held out


def samples(ckpts: list[str], out: Path) -> dict:
    """One row per checkpoint: ``CELL_CAPTIONS`` (caption i from noise seed i, the model's default sampler),
    saved as OUT.png, 32 x 32 pixels each with a 2-pixel gap; the judge's verdicts are returned."""
    from sd3mini.pipeline import image_grid

    rows, images = [], []
    for ckpt in ckpts:
        pipe = toy_pipeline(ckpt)
        row = pipe(list(CELL_CAPTIONS), seed=0, progress=False)
        images += row
        rows.append({"checkpoint": portable(ckpt), "recipe": json.loads(file_metadata(ckpt)["sd3mini_toy"])["recipe"],
                     "sampler": dict(pipe.defaults), "judge": [judge(im, c) for im, c in zip(row, CELL_CAPTIONS)]})
    image_grid(images, cols=len(CELL_CAPTIONS), gap=2).save(out.with_suffix(".png"))
    return {"captions": list(CELL_CAPTIONS), "image_size": 32, "gap": 2, "rows": rows}


def curve(run: Path) -> dict:
    return stitched([(run, 0)])


def stitched(stages: list[tuple[Path, int]]) -> dict:
    """One training curve from a run continued in stages with ``--resume`` (a later stage's folder began
    as a copy of the earlier one's ``last.safetensors``): stage i supplies the log from its first step on,
    and its recipe (from its exported checkpoint) is kept, so the learning rate of every step can be redrawn."""
    rows, recipes = {}, []
    for i, (run, first) in enumerate(stages):
        until = stages[i + 1][1] if i + 1 < len(stages) else float("inf")
        for line in (run / "train_log.jsonl").read_text().splitlines():
            r = json.loads(line)
            if first < r["step"] <= until:
                rows[r["step"]] = r
        meta = json.loads(file_metadata(run / "toy_sd3.safetensors")["sd3mini_toy"])
        recipes.append({"from_step": first, "run": run.name, "recipe": meta["recipe"]})
    rows = [rows[s] for s in sorted(rows)]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "the stages leave a gap in the log"
    loss = [r["loss"] for r in rows]
    every = 50
    return {"recipe": recipes[-1]["recipe"], "stages": recipes, "world": meta.get("world", 1),
            "steps_trained": rows[-1]["step"],
            "minutes": rows[-1]["minutes"],
            "loss_steps": list(range(every, len(loss) + 1, every)),
            "loss": [round(float(np.mean(loss[i - every: i])), 5) for i in range(every, len(loss) + 1, every)],
            "evals": [{"step": r["step"], "minutes": r["minutes"], **{k: round(v, 4) for k, v in r["eval"].items()}}
                      for r in rows if "eval" in r]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--ckpt")
    e.add_argument("--cfg", type=float, nargs="+", help="guidance scales to evaluate (default: the model's and 1)")
    e.add_argument("--out", default=str(OUT / "toy_eval.json"))
    lg = sub.add_parser("log", help="a run's training curve; RUN:FROM_STEP ... for a run continued in stages")
    lg.add_argument("runs", nargs="+", metavar="RUN[:FROM_STEP]")
    lg.add_argument("--out", default=str(OUT / "toy_shipped_run.json"))
    ab = sub.add_parser("ablation")
    ab.add_argument("runs", nargs="+")
    ab.add_argument("--steps", type=int, required=True, help="the equal budget: compare every arm at this step")
    ab.add_argument("--out", default=str(OUT / "toy_ablation.json"))
    ab.add_argument("--no-final", action="store_true", help="only the training-log evals, no 300-caption eval")
    fp = sub.add_parser("pairs", help="new pair captions drawn with another seed, judged as the CLI draws them")
    fp.add_argument("--ckpt")
    fp.add_argument("--n", type=int, default=100)
    fp.add_argument("--seed", type=int, default=20261202)
    fp.add_argument("--out", default=str(OUT / "toy_fresh_pairs.json"))
    tr = sub.add_parser("trace", help="the shapes' trace in the colour words, against both shapes drawn right")
    tr.add_argument("ckpts", nargs="+")
    tr.add_argument("--out", default=str(OUT / "toy_shape_trace.json"))
    od = sub.add_parser("order", help="word order in the text encoder and in the images, per checkpoint")
    od.add_argument("ckpts", nargs="+")
    od.add_argument("--out", default=str(OUT / "toy_word_order.json"))
    sm = sub.add_parser("samples", help="one caption per grid cell, one row of images per checkpoint (.png + .json)")
    sm.add_argument("ckpts", nargs="+")
    sm.add_argument("--out", default=str(OUT / "toy_recipe_samples.json"))
    lt = sub.add_parser("latent", help="pair latent runs (toy_latent_vs_pixel.py) with the pixel runs they match")
    lt.add_argument("pairs", nargs="+", metavar="LATENT_DIR:PIXEL_RUN")
    lt.add_argument("--out", default=str(OUT / "toy_latent_vs_pixel.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.what == "eval":
        result = evaluate_checkpoint(args.ckpt, tuple(args.cfg) if args.cfg else (None, 1.0))
    elif args.what == "log":
        stages = [(Path(a.split(":")[0]), int(a.split(":")[1]) if ":" in a else 0) for a in args.runs]
        result = stitched(stages) | {"command": command()}
    elif args.what == "pairs":
        result = fresh_pairs(args.ckpt, args.n, args.seed)
    elif args.what == "trace":
        result = shape_trace(args.ckpts) | {"command": command()}
    elif args.what == "order":
        result = {"models": [word_order(c) for c in args.ckpts], "command": command()}
    elif args.what == "samples":
        result = samples(args.ckpts, Path(args.out)) | {"command": command()}
    elif args.what == "latent":
        result = {"comparisons": [], "command": command()}
        for pair in args.pairs:
            latent_dir, pixel_run = map(Path, pair.split(":"))
            c = curve(pixel_run)
            result["comparisons"].append({"latent": json.loads((latent_dir / "result.json").read_text()),
                                          "pixel_run": pixel_run.name, "pixel_recipe": c["recipe"], "pixel_evals": c["evals"]})
    else:
        arms = {}
        for run in map(Path, args.runs):
            c = curve(run)
            keep = [i for i, s in enumerate(c["loss_steps"]) if s <= args.steps]
            arms[run.name] = {"recipe": c["recipe"], "evals": [e for e in c["evals"] if e["step"] <= args.steps],
                              "loss_steps": [c["loss_steps"][i] for i in keep], "loss": [c["loss"][i] for i in keep],
                              "final": None if args.no_final else evaluate_checkpoint(run / "toy_sd3.safetensors", (None,))}
        result = {"budget_steps": args.steps, "arms": arms, "command": command()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1)[:3000])


if __name__ == "__main__":
    main()
