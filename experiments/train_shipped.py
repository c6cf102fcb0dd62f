"""The shipped tiny SD3 in one command: three stages of ``train-toy``, each resumed from the one before.

    python experiments/train_shipped.py --out runs/shipped --threads 1 --eval-every 1000    # ~140 min, one core
    python experiments/toy_report.py log runs/shipped/stage1:0 runs/shipped/stage2:5000 runs/shipped/stage3:15000

How the stages came about is in chapter 14:
  1. steps 0-5 000: the one-hour recipe's first 5 000 steps (single objects, then half pairs; constant rate);
  2. steps 5 000-15 000: 90% pairs, the learning rate cooled to 0 over 10 000-15 000;
  3. steps 15 000-25 000: 90% pairs at half the peak rate (5e-4), cooled again over 20 000-25 000.
The EMA weights are then written with CFG 3 as their default (``OUT/toy_sd3.safetensors``), the scale
chosen on the 300 evaluation captions (``toy_report.py eval --cfg 1 1.5 2 3 4 6``).

Every stage writes its own folder, so each keeps its recipe for ``toy_report.py log``. A stage that
finished is skipped when the command is run again; one that was interrupted resumes. Arguments this
script does not know (``--threads``, ``--eval-every``, ``--seed``, model sizes) go to every stage.
``--divide N`` divides every step count by N: a rehearsal of the whole schedule in seconds (the tests).
"""

import argparse
import shutil
import sys
from pathlib import Path

from reexport import reexport
from sd3mini.toy.train import Recipe, training_meta
from sd3mini.toy.train import main as train_toy

STAGES = (  # (the step a stage ends at, its train-toy arguments); each resumes from the last one's end
    (5000, {"--p-pair": 0.5, "--cooldown": 0}),
    (15000, {"--p-pair": 0.9, "--cooldown": 5000}),
    (25000, {"--p-pair": 0.9, "--cooldown": 5000, "--lr": 5e-4}),
)
CFG_SCALE = 3.0


def steps_done(folder: Path) -> int:
    state = folder / "last.safetensors"
    return training_meta(state)["step"] if state.exists() else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/shipped")
    p.add_argument("--divide", type=int, default=1, help="divide every step count by this (a quick rehearsal)")
    args, passed_on = p.parse_known_args(argv)
    out, d = Path(args.out), args.divide
    schedule = {"--warmup": max(1, Recipe().warmup // d), "--singles-first": Recipe().singles_first // d}
    previous = None
    for i, (end, stage_args) in enumerate(STAGES, start=1):
        folder = out / f"stage{i}"
        if steps_done(folder) < end // d:
            if previous is not None and not (folder / "last.safetensors").exists():
                folder.mkdir(parents=True, exist_ok=True)                 # start from the last stage's end
                shutil.copy(previous / "last.safetensors", folder / "last.safetensors")
            flags = schedule | {"--steps": end // d} | {k: v // d if k == "--cooldown" else v
                                                         for k, v in stage_args.items()}
            # A stage resumes the last one's state with its own recipe (--resume --force), or starts afresh (--force).
            again = ["--resume", "--force"] if (folder / "last.safetensors").exists() else ["--force"]
            code = train_toy([str(a) for kv in flags.items() for a in kv] + passed_on + ["--out", str(folder)] + again)
            if code:                                    # stopped by a signal: the next run resumes this stage
                return code
        previous = folder
    reexport(previous / "last.safetensors", out / "toy_sd3.safetensors", CFG_SCALE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
