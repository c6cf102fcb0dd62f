"""The embedded tiny SD3: data, judge, training (resume, DDP), and the shipped model's quality."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd3mini.toy import data
from sd3mini.toy.judge import find_objects, judge, score
from sd3mini.toy.model import VOCAB, ToyTextEncoder, shipped_path, toy_pipeline
from sd3mini.toy.train import Recipe, load_training_state, train, training_batch

TINY = dict(steps=4, batch=6, width=64, depth=2, text_width=64, text_layers=1, warmup=2)


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


def test_judge_rejects_wrong_captions():
    images, captions, scenes = data.batch(12, 200, holdout=False, dropout=False)
    opposite = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
    wrong = 0
    for image, scene in zip(images, scenes):
        if scene.relation:
            text = data.caption(data.Scene(scene.objects, opposite[scene.relation]))
        else:
            o = scene.objects[0]
            other = next(c for c in data.COLOURS if c != o.colour)
            text = data.caption(data.Scene((data.Obj(other, o.shape, o.size, o.cell),)))
        wrong += judge(image, text)["all"]
    assert wrong == 0
    assert find_objects(torch.full((3, 32, 32), -1.0)) == {}     # nothing on a black image


# --- text encoder ---------------------------------------------------------------------------------
def test_unknown_words_warn():
    enc = ToyTextEncoder(width=64, layers=1, heads=1)
    with pytest.warns(UserWarning, match=r"\['dragon', 'flying'\]"):
        tokens = enc.tokenize(["a flying red dragon"])
    assert tokens[0, :6].tolist() == [1, VOCAB.index("a"), 3, VOCAB.index("red"), 3, 2]
    context, pooled = enc.encode(["a red circle", ""])
    assert context.shape == (2, 16, 64) and pooled.shape == (2, 64)


# --- training -------------------------------------------------------------------------------------
def test_training_resumes_exactly(tmp_path):
    r = Recipe(**TINY)
    train(r, tmp_path / "once", progress=False)
    train(Recipe(**TINY | {"steps": 2}), tmp_path / "twice", progress=False)
    train(r, tmp_path / "twice", resume=True, progress=False)
    from sd3mini.checkpoint import open_state_dict

    once = open_state_dict(tmp_path / "once" / "last.safetensors")
    twice = open_state_dict(tmp_path / "twice" / "last.safetensors")
    assert once.keys() == twice.keys() and any(k.startswith("opt.") for k in once)
    for k in once:
        assert torch.equal(once[k].load(), twice[k].load()), k
    log = (tmp_path / "once" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 4
    pipe = toy_pipeline(tmp_path / "once" / "toy_sd3.safetensors")           # the exported weights load
    assert pipe("a red circle", seed=0, progress=False)[0].size == (32, 32)


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


def test_ddp_two_cpu_ranks(tmp_path):
    """torchrun with 2 gloo ranks: they train on different batches and end with identical weights."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in (TINY | {"steps": 3}).items()]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29613",
           "-m", "sd3mini", "train-toy", *args, "--out", str(tmp_path), "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ranks agree: weights identical across 2 ranks" in done.stdout
    from sd3mini.checkpoint import file_metadata

    assert '"world": 2' in file_metadata(tmp_path / "last.safetensors")["sd3mini_train"]


# --- the shipped model ----------------------------------------------------------------------------
SHIPPED_CAPTIONS = [
    "a large red circle in the top left", "a large blue square in the bottom right", "a large yellow triangle in the center",
    "a large green square in the top", "a large purple circle in the bottom", "a large orange triangle in the left",
    "a small red square in the center", "a small blue triangle in the top right", "a small yellow circle in the bottom left",
    "a large red triangle above a large blue circle", "a large blue square left of a large yellow circle",
    "a small green triangle below a large red square", "a large orange circle right of a small purple square",
]


@pytest.mark.skipif(not shipped_path().exists(), reason="the shipped weights are not built yet")
def test_shipped_model_follows_captions():
    pipe = toy_pipeline()
    images = pipe(SHIPPED_CAPTIONS, seed=0, progress=False)
    results = [judge(im, c) for im, c in zip(images, SHIPPED_CAPTIONS)]
    singles, pairs = results[:9], results[9:]
    assert sum(r["colour"] for r in singles) >= 8
    assert sum(r["shape"] for r in singles) >= 8
    assert sum(r["cell"] for r in singles) >= 8
    assert sum(r["relation"] for r in pairs) >= 3


@pytest.mark.skipif(not shipped_path().exists(), reason="the shipped weights are not built yet")
def test_cli_generates_with_the_shipped_model(tmp_path, capsys):
    from PIL import Image

    from sd3mini.cli import main

    main(["generate", "a red circle above a blue square", "--seed", "0", "-o", str(tmp_path / "one.png")])
    assert Image.open(tmp_path / "one.png").size == (128, 128)          # 32 x 32, shown 4x
    main(["generate", "a small green triangle", "--grid", "4", "--upscale", "1", "-o", str(tmp_path / "grid.png")])
    assert Image.open(tmp_path / "grid.png").size == (128, 128)         # 4 x 4 images of 32 x 32
    assert "toy model" in capsys.readouterr().out
