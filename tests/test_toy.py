"""The embedded tiny SD3: data, judge, training (resume, DDP), and the shipped model's quality."""

import copy
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import sd3mini
from sd3mini.checkpoint import file_metadata, open_state_dict
from sd3mini.toy import data
from sd3mini.toy.data import training_batch
from sd3mini.toy.judge import find_objects, judge, pair_parts, score
from sd3mini.toy.model import VOCAB, ToyTextEncoder, load_toy, same_word_cosines, shipped_path, toy_pipeline
from sd3mini.toy.recipe import Recipe, learning_rate
from sd3mini.toy.train import train

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))    # toy_report
TINY = dict(steps=4, batch=6, width=64, depth=2, text_width=64, text_layers=1, warmup=2, cooldown=0)


# --- data -----------------------------------------------------------------------------------------
def test_batches_are_deterministic():
    a, b = data.batch(5, 16), data.batch(5, 16)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], data.batch(6, 16)[0])
    images = a[0]
    assert images.shape == (16, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    edges = ((images > -1) & (images < 0.8)).float().mean()
    assert edges > 0.005                                         # anti-aliased: partial-coverage pixels exist


def test_scenes_follow_the_rules():
    rng = random.Random(0)
    for _ in range(2000):
        scene = data.random_scene(rng)
        for obj in scene.objects:
            assert (obj.colour, obj.shape) not in data.HELD_OUT   # held out of training
        if scene.relation:
            a, b = scene.objects
            assert a.colour != b.colour
            (xa, ya), (xb, yb) = a.centre(), b.centre()
            assert {"above": ya < yb, "below": ya > yb, "left of": xa < xb, "right of": xa > xb}[scene.relation]


def test_captions():
    scene = data.Scene((data.Obj("red", "circle", "large", "top left"),))
    assert data.caption(scene) == "a large red circle in the top left"
    pair = data.Scene((data.Obj("purple", "circle", "small", "bottom"), data.Obj("blue", "triangle", "large", "top")),
                      "below")
    assert data.caption(pair) == "a small purple circle below a large blue triangle"
    seen = {data.caption(scene, random.Random(i)) for i in range(200)}
    assert {"a red circle", "a large red circle", "a red circle in the top left", "a large circle"} <= seen
    for text in seen | {data.caption(pair, random.Random(i)) for i in range(50)}:
        assert set(text.split()) <= set(VOCAB)
    parsed = data.parse_caption("a small purple circle below a large blue triangle")
    assert parsed["relation"] == "below" and parsed["objects"][1] == {"size": "large", "colour": "blue", "shape": "triangle"}
    evals = data.eval_captions()
    assert len(evals) == 300 and evals == data.eval_captions()
    assert 30 < sum(map(data.uses_held_out, evals)) < 120


# --- judge ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [False, True])
def test_judge_agrees_with_ground_truth(dropout):
    images, captions, _ = data.batch(11, 400, holdout=False, dropout=dropout)
    s = score(images, captions)
    assert s["all"] >= 0.98, s


OPPOSITE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def test_judge_rejects_wrong_captions():
    images, captions, scenes = data.batch(12, 200, holdout=False, dropout=False)
    wrong = 0
    for image, scene in zip(images, scenes):
        if scene.relation:
            text = data.caption(data.Scene(scene.objects, OPPOSITE[scene.relation]))
        else:
            o = scene.objects[0]
            other = next(c for c in data.COLOURS if c != o.colour)
            text = data.caption(data.Scene((data.Obj(other, o.shape, o.size, o.cell),)))
        wrong += judge(image, text)["all"]
    assert wrong == 0
    assert find_objects(torch.full((3, 32, 32), -1.0)) == {}     # nothing on a black image


def test_pair_parts_on_ground_truth():
    """Each part of a relation, judged apart: right on true captions, "arranged" wrong when swapped."""
    images, captions, scenes = data.batch(5, 120, p_pair=1.0, holdout=False, dropout=False)
    true = [pair_parts(im, c) for im, c in zip(images, captions)]
    swapped = [pair_parts(im, data.caption(data.Scene(sc.objects, OPPOSITE[sc.relation]))) for im, sc in zip(images, scenes)]
    assert sum(p["colours"] and p["arranged"] and p["shapes"] for p in true) >= 118
    assert sum(bool(p["arranged"]) for p in swapped) <= 2
    assert pair_parts(images[0], "a red circle") is None


# --- text encoder ---------------------------------------------------------------------------------
def test_unknown_words_warn():
    enc = ToyTextEncoder(width=64, layers=1, heads=1)
    with pytest.warns(UserWarning, match=r"\['dragon', 'flying'\]"):
        tokens = enc.tokenize(["a flying red dragon"])
    assert tokens[0, :6].tolist() == [1, VOCAB.index("a"), 3, VOCAB.index("red"), 3, 2]
    context, pooled = enc.encode(["a red circle", ""])
    assert context.shape == (2, 16, 64) and pooled.shape == (2, 64)


# --- training -------------------------------------------------------------------------------------
def test_fresh_text_encoder_sees_word_order():
    """The same words in another order must give other states, or "red above blue" = "blue above red".
    With nn.Embedding's N(0, 1) word vectors over N(0, 0.02^2) positions a fresh encoder gave 0.9997 and
    the trained one 1.000; with both at N(0, 1) a fresh one gives ~0.5."""
    torch.manual_seed(0)
    assert same_word_cosines(ToyTextEncoder())["red"] < 0.8


def test_training_resumes_exactly(tmp_path):
    r = Recipe(**TINY)
    train(r, tmp_path / "once", progress=False)
    train(Recipe(**TINY | {"steps": 2}), tmp_path / "twice", progress=False)
    train(r, tmp_path / "twice", resume=True, progress=False)

    once = open_state_dict(tmp_path / "once" / "last.safetensors")
    twice = open_state_dict(tmp_path / "twice" / "last.safetensors")
    assert once.keys() == twice.keys() and any(k.startswith("opt.") for k in once)
    for k in once:
        assert torch.equal(once[k].load(), twice[k].load()), k
    log = (tmp_path / "once" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 4
    pipe = toy_pipeline(tmp_path / "once" / "toy_sd3.safetensors")           # the exported weights load
    assert pipe("a red circle", seed=0, progress=False)[0].size == (32, 32)


def test_a_run_resumed_in_stages_gives_one_curve(tmp_path):
    """The shipped run was three stages, each a copy of the last one's ``last.safetensors`` resumed with
    another recipe; ``toy_report.py log RUN:FROM_STEP ...`` stitches their logs for chapter 15."""
    from toy_report import stitched

    train(Recipe(**TINY), tmp_path / "a", progress=False)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "last.safetensors", tmp_path / "b")
    train(Recipe(**TINY | {"steps": 7, "lr": 5e-4}), tmp_path / "b", resume=True, force=True, progress=False)
    curve = stitched([(tmp_path / "a", 0), (tmp_path / "b", 4)])
    assert curve["steps_trained"] == 7
    assert [(st["from_step"], st["recipe"]["lr"]) for st in curve["stages"]] == [(0, 1e-3), (4, 5e-4)]
    with pytest.raises(AssertionError, match="gap"):
        stitched([(tmp_path / "a", 0), (tmp_path / "b", 5)])   # step 5 left to a, whose log ends at 4


def test_recipe_presets(tmp_path):
    """``--recipe NAME`` makes a preset's values the defaults; options given on the command line win."""
    from sd3mini.toy.recipe import PRESETS
    from sd3mini.toy.train import main

    main(["--recipe", "shipped", "--out", str(tmp_path)] + [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()])
    stored = json.loads(file_metadata(tmp_path / "toy_sd3.safetensors")["sd3mini_toy"])["recipe"]
    assert stored == asdict(Recipe(**PRESETS["shipped"][0] | TINY))
    assert stored["p_pair"] == 0.9 and stored["singles_first"] == 1000                # from the preset
    assert PRESETS["one-hour"] == ({}, 1)                                            # the defaults themselves


def test_the_shipped_file_is_the_shipped_recipe():
    """The shipped weights come from ``torchrun --nproc_per_node=2 -m sd3mini train-toy --recipe shipped``:
    its stored recipe is the preset's, trained to the end on 2 ranks."""
    from sd3mini.toy.recipe import PRESETS

    meta = json.loads(file_metadata(shipped_path())["sd3mini_toy"])
    values, ranks = PRESETS["shipped"]
    assert meta["recipe"] == asdict(Recipe(**values))
    assert (meta["world"], meta["steps_trained"]) == (ranks, values["steps"])
    assert meta["defaults"]["cfg_scale"] == Recipe(**values).cfg_scale == 2.0     # chosen on the 300 captions


def test_fresh_pair_captions():
    """``toy_report.py pairs``: new pair captions (none of them in the evaluation set), each judged fully
    specified and with its size words left out."""
    from toy_report import fresh_pairs

    report = fresh_pairs(n=3, seed=5)
    assert report["pairs"] == 3
    for phrasing in ("full", "no_sizes"):
        r = report[phrasing]
        assert r["seen"]["n"] + r["held_out"]["n"] == 3 and len(r["examples"]) == 3
        assert not set(r["examples"]) & set(data.eval_captions())
        assert all(data.parse_caption(c)["relation"] for c in r["examples"])
    assert not any(w in data.SIZES for c in report["no_sizes"]["examples"] for w in c.split())
    assert [data.parse_caption(c)["objects"][0]["colour"] for c in report["full"]["examples"]] == [
        data.parse_caption(c)["objects"][0]["colour"] for c in report["no_sizes"]["examples"]]


def test_sample_rows_for_the_chapter(tmp_path):
    """``toy_report.py samples``: one row of nine images per checkpoint, with the judge's verdicts."""
    from PIL import Image
    from toy_report import CELL_CAPTIONS, samples

    assert len({c.split(" in the ")[1] for c in CELL_CAPTIONS}) == 9                  # every grid cell once
    assert not any(data.uses_held_out(c) for c in CELL_CAPTIONS)
    result = samples([str(shipped_path())] * 2, tmp_path / "rows.json")
    assert Image.open(tmp_path / "rows.png").size == (9 * 34 - 2, 2 * 34 - 2)
    assert [len(r["judge"]) for r in result["rows"]] == [9, 9]
    assert result["rows"][0]["judge"] == result["rows"][1]["judge"]                  # seeded: the same images
    assert sum(j["cell"] for j in result["rows"][0]["judge"]) >= 8                   # the shipped model places them


def test_batches_depend_on_rank_and_step():
    r = Recipe(**TINY)
    a = training_batch(r, 3, 0, 1.0, 0.0)
    assert torch.equal(a[0], training_batch(r, 3, 0, 1.0, 0.0)[0])
    assert not torch.equal(a[0], training_batch(r, 3, 1, 1.0, 0.0)[0])
    assert not torch.equal(a[0], training_batch(r, 4, 0, 1.0, 0.0)[0])


def test_singles_first_curriculum():
    r = Recipe(**TINY | {"singles_first": 5, "p_pair": 1.0, "cfg_drop": 0.0})
    before, after = training_batch(r, 4, 0, 1.0, 0.0)[1], training_batch(r, 5, 0, 1.0, 0.0)[1]
    assert all(data.parse_caption(c)["relation"] is None for c in before)       # single objects only
    assert all(data.parse_caption(c)["relation"] is not None for c in after)    # then the configured mix


def test_learning_rate_schedule():
    r = Recipe(lr=1e-3, warmup=10, steps=100, cooldown=20)
    lrs = [learning_rate(r, s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)      # linear warm-up
    assert lrs[10:81] == [pytest.approx(1e-3)] * 71                             # constant
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:])) and lrs[-1] == pytest.approx(5e-5)  # to 0
    longer = Recipe(lr=1e-3, warmup=10, steps=150, cooldown=20)                  # extending a run by resuming
    assert [learning_rate(longer, s) for s in range(80)] == lrs[:80]            # changes nothing before
    assert learning_rate(Recipe(cooldown=0), 10**6) == Recipe().lr              # no cool-down: constant


def test_ddp_two_cpu_ranks(tmp_path):
    """torchrun with 2 gloo ranks: they train on different batches and end with identical weights, and
    the same command run again gives the same weights bit for bit (the shipped recipe is reproducible)."""
    # 4 steps, pairs from step 2: both of the preset's phases
    args = [f"--{k.replace('_', '-')}={v}" for k, v in (TINY | {"singles_first": 2}).items()]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    weights = []
    # the second run judges itself during training and exports another CFG default: neither may change
    # a weight (the shipped run was judged every 1 000 steps, at CFG 3, and re-exported with CFG 2)
    for out, port, extra in ((tmp_path / "a", 29613, []), (tmp_path / "b", 29614, ["--eval-every", "2",
                                                                                   "--cfg-scale", "3"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               "-m", "sd3mini", "train-toy", "--recipe", "shipped", *args, *extra, "--out", str(out),
               "--threads", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                              cwd=Path(__file__).parents[1])
        assert done.returncode == 0, done.stderr[-3000:]
        assert "ranks agree: weights identical across 2 ranks" in done.stdout
        assert "measured with" not in done.stdout + done.stderr              # 2 ranks, as the preset
        assert '"world": 2' in file_metadata(out / "last.safetensors")["sd3mini_train"]
        weights.append({k: v.load() for k, v in open_state_dict(out / "toy_sd3.safetensors").items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# --- the shipped model ----------------------------------------------------------------------------
SINGLE_CAPTIONS = [
    "a large red circle in the top left", "a large blue square in the bottom right", "a large yellow triangle in the center",
    "a large green square in the top", "a large purple circle in the bottom", "a large orange triangle in the left",
    "a small red square in the center", "a small blue triangle in the top right", "a small yellow circle in the bottom left",
    "a large purple triangle in the right", "a small orange square in the top", "a green circle in the bottom right",
]                                                   # the last three are colour-shape pairs held out of training
README_EXAMPLE = "a large red circle in the top left"
RELATION_BOUND = 0.75  # measured on these 40 captions: 0.825 (the models shipped before: 0.725, 0.625; the first: 0.15)


def test_shipped_weights_are_in_the_package():
    assert shipped_path().exists(), "sd3mini/assets/toy_sd3.safetensors is missing: the CLI and the book need it"
    assert shipped_path().stat().st_size <= 20e6
    assert f'generate "{README_EXAMPLE}"' in (Path(__file__).parents[1] / "README.md").read_text()


def test_shipped_model_follows_single_object_captions():
    """Measured on the 300-caption evaluation: single objects ~0.99-1.00 in every attribute."""
    pipe = toy_pipeline()
    results = [judge(im, c) for im, c in zip(pipe(SINGLE_CAPTIONS, seed=0, progress=False), SINGLE_CAPTIONS)]
    for key in ("colour", "shape", "size", "cell"):
        assert sum(r[key] for r in results if r[key] is not None) >= 11, key
    example = pipe([README_EXAMPLE] * 8, seed=0, progress=False)
    assert sum(judge(im, README_EXAMPLE)["all"] for im in example) >= 7      # the README's prompt comes out right


def test_shipped_model_on_two_object_captions():
    """On the 300-caption evaluation: both colours 0.99, relation (with both shapes right) 0.91; the first
    shipped model, whose encoder was blind to word order, reached 0.20, the one before this 0.88 (0.725 on
    these 40 captions). A bound that fails for both."""
    captions = data.eval_captions(0, 40, seed=77)
    scores = score(toy_pipeline()(captions, seed=0, progress=False), captions)
    assert scores["colour"] >= 0.9
    assert scores["relation"] >= RELATION_BOUND


def test_shipped_text_encoder_sees_word_order():
    """Measured 0.81 (the first shipped model: 1.000, the same state for "red" as subject and as object)."""
    _, text, _ = load_toy()
    assert same_word_cosines(text)["red"] < 0.9


def test_cli_generates_with_the_shipped_model(tmp_path, capsys):
    from PIL import Image

    from sd3mini.cli import main

    main(["generate", README_EXAMPLE, "--seed", "0", "-o", str(tmp_path / "one.png")])
    assert Image.open(tmp_path / "one.png").size == (128, 128)          # 32 x 32, shown 4x
    assert judge(Image.open(tmp_path / "one.png").resize((32, 32), Image.NEAREST), README_EXAMPLE)["all"]
    main(["generate", "a small green triangle", "--grid", "4", "--upscale", "1", "-o", str(tmp_path / "grid.png")])
    assert Image.open(tmp_path / "grid.png").size == (134, 134)         # 4 x 4 images of 32 x 32, 2-px gaps
    assert "toy model" in capsys.readouterr().out


def test_cooldown_longer_than_the_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cool-down"):
        train(Recipe(**TINY | {"cooldown": 5}), tmp_path, progress=False)


# --- interrupting and resuming --------------------------------------------------------------------
QUICK = dict(steps=40, batch=2, width=32, depth=1, text_width=32, text_layers=1, heads=1, warmup=2, cooldown=10)


def test_sigterm_saves_and_the_resumed_run_is_exact(tmp_path):
    """SIGTERM a train-toy run mid-way: it saves its state at the step it reached and exits 143; resumed,
    it ends with the weights of a run that was never interrupted, and its log has each step once."""
    import signal
    import time

    args = [f"--{k.replace('_', '-')}={v}" for k, v in QUICK.items()]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "sd3mini", "train-toy", *args, "--out", str(tmp_path / "cut"),
                            "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           cwd=Path(__file__).parents[1])
    log = tmp_path / "cut" / "train_log.jsonl"
    deadline = time.time() + 60
    while not (log.exists() and log.read_text().count("\n") >= 3) and time.time() < deadline and run.poll() is None:
        time.sleep(0.01)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGTERM, err[-2000:]
    stopped_at = training_meta_step(tmp_path / "cut" / "last.safetensors")
    assert 3 <= stopped_at < QUICK["steps"] and f"stopped by SIGTERM at step {stopped_at}" in out
    assert "Traceback" not in err

    train(Recipe(**QUICK), tmp_path / "cut", resume=True, progress=False)
    train(Recipe(**QUICK), tmp_path / "whole", progress=False)
    cut, whole = open_state_dict(tmp_path / "cut" / "last.safetensors"), open_state_dict(tmp_path / "whole" / "last.safetensors")
    assert cut.keys() == whole.keys()
    for k in cut:
        assert torch.equal(cut[k].load(), whole[k].load()), k
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, QUICK["steps"] + 1))


def training_meta_step(path) -> int:
    from sd3mini.toy.checkpoints import training_meta

    return training_meta(path)["step"]


def test_save_every_and_the_log_is_trimmed_on_resume(tmp_path, monkeypatch):
    """Checkpoints every --save-every steps and at the end; rows logged after the last save (a crash) are
    dropped when the run resumes, so the log never holds a step twice."""
    import sd3mini.toy.train as toy_train

    saved = []
    real = toy_train.save_training_state
    monkeypatch.setattr(toy_train, "save_training_state", lambda path, *a: saved.append(a[3]) or real(path, *a))
    r = Recipe(**QUICK | {"steps": 5, "cooldown": 0})
    train(r, tmp_path, save_every=2, progress=False)
    assert saved == [2, 4, 5]
    log = tmp_path / "train_log.jsonl"
    log.write_text(log.read_text() + '{"step": 6, "loss": 9.0, "minutes": 0}\n')   # logged, then a crash
    train(Recipe(**QUICK | {"steps": 7, "cooldown": 0}), tmp_path, resume=True, progress=False)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6, 7] and rows[5]["loss"] != 9.0


def test_pipelines_keep_their_own_defaults():
    """Per-model defaults are constructor arguments, stored as copies: no pipeline changes another's."""
    from sd3mini.pipeline import MODEL_DEFAULTS
    from sd3mini.toy.model import toy_pipeline

    a, b = toy_pipeline(), toy_pipeline()
    a.defaults["steps"] = 3
    assert b.defaults["steps"] == 20 and a.default_size == b.default_size == 32
    before = dict(MODEL_DEFAULTS["custom"])
    a2 = sd3mini.SD3Pipeline(a.mmdit, a.vae, a.text_encoder)
    a2.defaults["steps"] = 1
    assert MODEL_DEFAULTS["custom"] == before


def test_stored_recipes_with_the_removed_text_pool():
    from sd3mini.checkpoint import CheckpointError
    from sd3mini.toy.recipe import recipe_from

    stored = asdict(Recipe()) | {"text_pool": "eos"}
    assert recipe_from(stored) == Recipe()
    with pytest.raises(CheckpointError, match="mean"):
        recipe_from(stored | {"text_pool": "mean"})


def test_train_step_is_the_loop_of_train(tmp_path):
    """train() is train_step repeated: the same recipe stepped by hand ends with the same weights."""
    from sd3mini.toy.data import data_stats, training_batch
    from sd3mini.toy.model import ToySD3
    from sd3mini.toy.train import train_step

    r = Recipe(**TINY | {"steps": 3})
    train(r, tmp_path / "run", progress=False)
    torch.manual_seed(r.seed)
    model = ToySD3(r)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, betas=(0.9, 0.99), weight_decay=r.weight_decay)
    scale, shift = data_stats()
    for step in range(r.steps):
        train_step(model, ema, opt, r, step, training_batch(r, step, 0, scale, shift))
    saved = {k[4:]: v.load() for k, v in sd3mini.open_state_dict(tmp_path / "run" / "last.safetensors").items()
             if k.startswith("ema.")}
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)


def test_a_damaged_log_row_does_not_block_resume(tmp_path):
    """A row cut short by a crash is dropped with the rows after the saved step, not a JSONDecodeError."""
    from sd3mini.toy.checkpoints import trim_log

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    trim_log(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def test_minutes_stop_after_the_step_on_every_rank(tmp_path):
    """--minutes is decided with the signals (one all_reduce under DDP), after a step: a run whose time is
    up stops at once, saved and not interrupted."""
    result = train(Recipe(**TINY), tmp_path / "run", minutes=1e-9, progress=False)
    assert result["steps"] == 1 and result["interrupted"] is None
    assert (tmp_path / "run" / "last.safetensors").exists()
