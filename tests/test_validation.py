"""Bad input gets a clear one-line error, never a wrong image or a traceback (issue 14).

Each case names its input and the message it must give. The CLI cases run ``sd3mini.cli.main`` in this
process (it is what ``python -m sd3mini`` runs; a subprocess per case would cost ~2 s of imports) and
check the exit status, that stderr is one ``error:`` line with no traceback, and that no picture was
written; ``test_cli_in_a_subprocess`` runs a few of them as a user would, through ``python -m sd3mini``.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import GOLDEN, MANIFESTS, save_hub_layout, sparse_checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file

import sd3mini
from sd3mini import CheckpointError
from sd3mini.checks import ArgumentError
from sd3mini.cli import main
from sd3mini.toy.model import load_toy, shipped_path, toy_pipeline
from sd3mini.toy.recipe import Recipe, learning_rate
from sd3mini.toy.train import train

ROOT = Path(__file__).parents[1]
TINY_RUN = dict(steps=2, batch=2, width=32, depth=1, text_width=32, text_layers=1, heads=1, warmup=1, cooldown=0)


# --- files the cases use --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    hub = save_hub_layout(d / "hub")
    train(Recipe(**TINY_RUN), d / "run", progress=False)
    (d / "empty").mkdir()
    (d / "not_diffusers").mkdir()
    (d / "not_diffusers" / "weights.safetensors").write_bytes((d / "run" / "toy_sd3.safetensors").read_bytes())
    (d / "vae.safetensors").write_bytes((GOLDEN / "vae.safetensors").read_bytes())   # alone: no CLIPs beside it
    Image.new("RGB", (3, 3)).save(d / "small.png")
    (d / "notes.txt").write_text("not an image")
    bomb = {"mmdit": dict(depth=400, hidden_size=8192, num_heads=64, patch_size=4, in_channels=3,
                          pos_embed_max_size=16, adm_in_channels=8192, context_in_dim=8192, mlp_ratio=4.0,
                          qk_norm=True, x_block_self_attn_layers=[]),
            "text": dict(width=8192, layers=100, heads=2, pool="eos"), "latent_scale": 1.0, "latent_shift": 0.0,
            "image_size": 32, "defaults": dict(steps=20, cfg_scale=2.0, shift=3.0, sampler="euler")}
    sparse_checkpoint(d / "bomb.safetensors", {"mmdit.x": [1]}, {"sd3mini_toy": json.dumps(bomb)})
    sparse_checkpoint(d / "clip_g_1280.safetensors", json.loads((MANIFESTS / "text_encoder_clip_g.json").read_text()))
    return dict(dir=d, model=hub, clip_l=hub.parent / "text_encoders" / "clip_l.safetensors",
                clip_g=hub.parent / "text_encoders" / "clip_g.safetensors",
                t5=hub.parent / "text_encoders" / "t5xxl_fp16.safetensors", vae=d / "vae.safetensors",
                run=d / "run", state=d / "run" / "last.safetensors", small=d / "small.png", notes=d / "notes.txt",
                bomb=d / "bomb.safetensors", clip_g_1280=d / "clip_g_1280.safetensors")


def fill(args, files, tmp_path):
    """``{model}``-style placeholders -> the fixture's paths; ``{tmp}`` -> this case's folder."""
    return [a.format(tmp=tmp_path, **files) for a in args]


# --- the command line -----------------------------------------------------------------------------
P = "a red circle"   # a prompt in the tiny model's vocabulary: no warning before the error
CLI_CASES = [   # (id, argv, exit status, the message)
    ("width 0", ["generate", P, "--width", "0"], 2, r"--width must be at least 1, got 0"),
    ("height 0", ["generate", P, "--height", "0"], 2, r"--height must be at least 1, got 0"),
    ("width not a multiple", ["generate", P, "--width", "30"], 2,
     r"width 30 is not a multiple of 4; the nearest valid sizes are 28 and 32"),
    ("width too large", ["generate", P, "--width", "128"], 2, r"width 128 is larger than this model supports: the maximum is 64"),
    ("width float", ["generate", P, "--width", "32.0"], 2, r"argument --width: invalid int value: '32.0'"),
    ("steps float", ["generate", P, "--steps", "2.5"], 2, r"argument --steps: invalid int value: '2.5'"),
    ("steps 0", ["generate", P, "--steps", "0"], 2, r"--steps must be at least 1, got 0"),
    ("upscale 0", ["generate", P, "--upscale", "0"], 2, r"--upscale must be at least 1, got 0"),
    ("upscale -1", ["generate", P, "--upscale", "-1"], 2, r"--upscale must be at least 1, got -1"),
    ("grid 0", ["generate", P, "--grid", "0"], 2, r"--grid must be at least 1, got 0"),
    ("grid -2", ["generate", P, "--grid", "-2"], 2, r"--grid must be at least 1, got -2"),
    ("seed 2**70", ["generate", P, "--seed", str(2**70)], 2, r"--seed must be in \[0, 2\*\*64 - 1\]"),
    ("seed + grid overflows", ["generate", P, "--seed", str(2**64 - 2), "--grid", "2"], 2,
     r"--seed must be in \[0, 2\*\*64 - 4\]"),
    ("cfg nan", ["generate", P, "--cfg", "nan"], 2, r"--cfg must be a finite number, got nan"),
    ("cfg inf", ["generate", P, "--cfg", "inf"], 2, r"--cfg must be a finite number, got inf"),
    ("cfg -1", ["generate", P, "--cfg", "-1"], 2, r"--cfg must be >= 0, got -1.0"),
    ("shift -1", ["generate", P, "--shift", "-1"], 2, r"--shift must be > 0, got -1.0"),
    ("shift 0", ["generate", P, "--shift", "0"], 2, r"--shift must be > 0, got 0.0"),
    ("slg on the tiny model", ["generate", P, "--slg"], 2, r"--slg does not apply to the tiny model"),
    ("fp16 on the tiny model", ["generate", P, "--dtype", "fp16"], 2, r"--dtype fp16 does not apply to the tiny model"),
    ("offload on the tiny model", ["generate", P, "--offload", "model"], 2, r"--offload model does not apply"),
    ("no-t5 on the tiny model", ["generate", P, "--no-t5"], 2, r"--no-t5 does not apply to the tiny model"),
    ("clip-l on the tiny model", ["generate", P, "--clip-l", "{clip_l}"], 2, r"--clip-l does not apply to the tiny model"),
    ("denoise without init image", ["generate", P, "--denoise", "0.5"], 2, r"--denoise=0.5 applies to image-to-image only: pass --init-image too"),
    ("denoise 0", ["generate", P, "--init-image", "{small}", "--denoise", "0"], 2, r"--denoise must be in \(0, 1\]"),
    ("init image missing", ["generate", P, "--init-image", "{tmp}/nothing.png"], 2, r"--init-image .*nothing.png: no such file"),
    ("init image not an image", ["generate", P, "--init-image", "{notes}"], 2, r"--init-image .*notes.txt is not an image"),
    ("init image 3x3", ["generate", P, "--init-image", "{small}"], 2, r"init_image is 3x3 pixels; .* at least 4x4"),
    ("output in a missing folder", ["generate", P, "-o", "{tmp}/no/such/out.png"], 2, r"the folder .*no/such does not exist"),
    ("output .xyz", ["generate", P, "-o", "{tmp}/out.xyz"], 2, r"unknown image extension '.xyz'"),
    ("output is a folder", ["generate", P, "-o", "{tmp}"], 2, r"--output .* is a folder"),
    ("output exists", ["generate", P, "-o", "{tmp}/exists.png"], 2, r"exists; pass --force to overwrite it"),
    ("a VAE as --ckpt", ["generate", P, "--ckpt", "{vae}"], 1, r"vae.safetensors: no SD3 MMDiT in this file; it looks like an LDM-layout VAE"),
    ("a training state as --ckpt", ["generate", P, "--ckpt", "{state}"], 2,
     r"is a train-toy training state .* --ckpt .*toy_sd3.safetensors"),
    ("an empty folder as --ckpt", ["generate", P, "--ckpt", "{dir}/empty"], 1, r"is not a diffusers SD3 folder: .*\(it is empty\)"),
    ("a non-diffusers folder", ["generate", P, "--ckpt", "{dir}/not_diffusers"], 1,
     r"is not a diffusers SD3 folder: it has no transformer/, vae/, .* pass the file itself"),
    ("a misspelled model name", ["generate", P, "--ckpt", "sd3_mediun"], 1, r"no such file or folder: sd3_mediun \(and not a model name: sd3_medium, .*; did you mean sd3_medium\?\)"),
    ("a toy file whose metadata lies", ["generate", P, "--ckpt", "{bomb}"], 1, r"bomb.safetensors: its metadata describes an MM-DiT \(depth 400, hidden_size 8192\) that its tensors do "
     r"not hold \(not an MMDiT state dict"),
    ("clip-l and clip-g swapped", ["generate", P, "--ckpt", "{model}", "--no-t5", "--clip-l", "{clip_g}", "--clip-g",
                                   "{clip_l}", "--device", "cpu"], 1,
     r"clip_l and clip_g are swapped: .*clip_g.safetensors \(passed as clip_l\) is a CLIP text encoder \(width 128"),
    ("T5 passed as clip-l", ["generate", P, "--ckpt", "{model}", "--no-t5", "--clip-l", "{t5}", "--device", "cpu"], 1,
     r"t5xxl_fp16.safetensors \(passed as clip_l\): no CLIP text encoder in this file; it looks like a T5 text encoder"),
    ("info on a non-checkpoint", ["info", "{notes}"], 1, r"notes.txt is not a safetensors file"),
    ("unknown option", ["generate", P, "--widht", "32"], 2, r"unrecognized arguments: --widht 32"),
    # train-toy
    ("train steps 0", ["train-toy", "--steps", "0", "--out", "{tmp}/r"], 2, r"--steps must be at least 1, got 0"),
    ("train steps abc", ["train-toy", "--steps", "abc"], 2, r"argument --steps: invalid int value: 'abc'"),
    ("train batch 0", ["train-toy", "--batch", "0", "--out", "{tmp}/r"], 2, r"--batch must be at least 1, got 0"),
    ("train warmup -1", ["train-toy", "--warmup", "-1", "--out", "{tmp}/r"], 2, r"--warmup must be at least 0, got -1"),
    ("train cooldown -1", ["train-toy", "--cooldown", "-1", "--out", "{tmp}/r"], 2, r"--cooldown must be at least 0, got -1"),
    ("train cooldown > steps", ["train-toy", "--steps", "10", "--cooldown", "20", "--out", "{tmp}/r"], 2,
     r"the cool-down \(20 steps\) is longer than the run \(10 steps\)"),
    ("train heads 3", ["train-toy", "--heads", "3", "--out", "{tmp}/r"], 2, r"--width 128 must be divisible by --heads 3"),
    ("train lr 0", ["train-toy", "--lr", "0", "--out", "{tmp}/r"], 2, r"--lr must be > 0, got 0.0"),
    ("train into an existing run", ["train-toy", "--out", "{run}"], 2,
     r"--out .*run already holds a run \(last.safetensors, toy_sd3.safetensors, train_log.jsonl\); pass --resume"),
    ("train resume with nothing", ["train-toy", "--resume", "--out", "{tmp}/r"], 2, r"--resume: .* has no last.safetensors"),
    ("train resume with another lr", ["train-toy", "--resume", "--out", "{run}", "--lr", "5e-4"] +
     [f"--{k.replace('_', '-')}={v}" for k, v in TINY_RUN.items() if k not in ("steps", "lr")], 2,
     r"--resume with another recipe than .*: lr 0.001 -> 0.0005; pass --force"),
    ("train resume with another width", ["train-toy", "--resume", "--force", "--out", "{run}", "--width", "64"], 2,
     r"--resume: .* holds another model \(width 32 -> 64"),
]


@pytest.mark.parametrize("argv,status,message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_refuses(argv, status, message, files, tmp_path, capfd):
    (tmp_path / "exists.png").write_bytes(b"keep me")
    before = set(tmp_path.rglob("*")) | set(files["dir"].rglob("*"))
    assert main(fill(argv, files, tmp_path)) == status
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and out == ""
    assert re.search(message, lines[0]), lines[0]
    assert set(tmp_path.rglob("*")) | set(files["dir"].rglob("*")) == before       # nothing written
    assert (tmp_path / "exists.png").read_bytes() == b"keep me"


def test_cli_force_overwrites(tmp_path, capfd):
    out = tmp_path / "out.png"
    out.write_bytes(b"old")
    assert main(["generate", P, "--steps", "2", "-o", str(out), "--force"]) == 0
    assert Image.open(out).size == (128, 128) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("argv,status,message,env", [
    (["generate", P, "--grid", "0"], 2, r"--grid must be at least 1", {}),
    (["generate", P, "--ckpt", "{vae}"], 1, r"no SD3 MMDiT in this file", {}),
    (["generate", P, "--ckpt", "sd3_medium", "--no-t5"], 1,
     r"the Hugging Face Hub cannot be reached .* not in the local cache", {"HF_HUB_OFFLINE": "1"}),
], ids=["usage error", "runtime failure", "offline Hub"])
def test_cli_in_a_subprocess(argv, status, message, env, files, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")} | env
    done = subprocess.run([sys.executable, "-m", "sd3mini", *fill(argv, files, tmp_path)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == status
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert re.search(message, done.stderr), done.stderr
    assert not (tmp_path / "out.png").exists()


def test_cli_debug_shows_the_traceback(files, tmp_path, capfd):
    assert main(["--debug", "generate", P, "--ckpt", str(files["vae"]), "-o", str(tmp_path / "x.png")]) == 1
    assert re.search(r"Traceback.*CheckpointError: .*\nerror: .*no SD3 MMDiT", capfd.readouterr().err, re.S)


# --- SD3Pipeline.__call__ -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    return toy_pipeline()


KW = dict(steps=2, progress=False)
SMALL = Image.new("RGB", (3, 3))
PIPE_CASES = [
    ("seed 1.7", dict(seed=1.7), r"seed must be an integer, got 1.7"),
    ("seed 2**70", dict(seed=2**70), r"seed must be in \[0, 2\*\*64"),
    ("steps 2.5", dict(steps=2.5), r"steps must be an integer, got 2.5"),
    ("width 32.0", dict(width=32.0), r"width must be an integer, got 32.0"),
    ("width 0", dict(width=0), r"width must be at least 4, got 0"),
    ("height 0", dict(height=0), r"height must be at least 4, got 0"),
    ("cfg nan", dict(cfg_scale=float("nan")), r"cfg_scale must be a finite number, got nan"),
    ("cfg inf", dict(cfg_scale=float("inf")), r"cfg_scale must be a finite number, got inf"),
    ("shift 0", dict(shift=0.0), r"shift must be > 0, got 0.0"),
    ("shift -1", dict(shift=-1.0), r"shift must be > 0, got -1.0"),
    ("sampler", dict(sampler="ddim"), r"unknown sampler 'ddim'"),
    ("slg=True on the tiny model", dict(slg=True), r"slg=True is the reference's .* this model has 4 joint blocks"),
    ("slg layer 99", dict(slg=dict(scale=2.5, start=0.0, end=1.0, layers=[99])),
     r"slg layer 99 is out of range: this model has 4 joint blocks \(0-3\)"),
    ("slg without layers", dict(slg=dict(scale=2.5)), r"slg must be a dict with the keys scale, start, end, layers"),
    ("init image 3x3", dict(init_image=SMALL), r"init_image is 3x3 pixels"),
    ("init image not an image", dict(init_image=np.zeros((32, 32, 3))), r"init_image must be a PIL image"),
    ("denoise 0", dict(init_image=Image.new("RGB", (32, 32)), denoise=0.0), r"denoise must be in \(0, 1\]"),
    ("denoise without init image", dict(denoise=0.5), r"denoise=0.5 applies to image-to-image only: pass init_image"),
]


@pytest.mark.parametrize("kwargs,message", [c[1:] for c in PIPE_CASES], ids=[c[0] for c in PIPE_CASES])
def test_pipeline_refuses(toy, kwargs, message, monkeypatch):
    monkeypatch.setattr(toy, "_encode_text", lambda *a: pytest.fail("a model ran before the check"))
    with pytest.raises(ArgumentError, match=message):
        toy(P, **KW | kwargs)


@pytest.mark.parametrize("prompt,negative,message", [
    ([], "", r"prompt is an empty list"),
    (["a red circle", "a blue square"], ["a dog"], r"negative_prompt has 1 items but prompt has 2"),
    ([P, 3], "", r"prompt must be a string or a list of strings"),
    (None, "", r"prompt must be a string or a list of strings"),
], ids=["empty list", "batch mismatch", "not a string", "None"])
def test_pipeline_refuses_prompts(toy, prompt, negative, message):
    with pytest.raises(ArgumentError, match=message):
        toy(prompt, negative, **KW)


def test_long_tiny_prompt_warns(toy):
    words = "a large red circle in the top left above a small blue square in the bottom right"
    with pytest.warns(UserWarning, match=r"longer than the tiny model's 14 words and was truncated; dropped: "
                                         r"'the bottom right'"):
        toy(words, seed=0, **KW)


def test_warmup_zero_trains():
    assert learning_rate(Recipe(warmup=0), 0) == Recipe().lr


# --- sample() -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_inputs(toy):
    cond, uncond = toy.text_encoder.encode([P]), toy.text_encoder.encode([""])
    return dict(model=toy.mmdit, noise=sd3mini.make_noise(0, (3, 32, 32)), cond=cond, uncond=uncond)


def nan_at(t, value=float("nan")):
    t = t.clone()
    t.view(-1)[0] = value
    return t


SAMPLE_CASES = [
    ("noise nan", lambda i: dict(noise=nan_at(i["noise"])), r"noise contains 1 NaN or inf value"),
    ("noise inf", lambda i: dict(noise=nan_at(i["noise"], math.inf)), r"noise contains 1 NaN or inf value"),
    ("init latent nan", lambda i: dict(init_latent=nan_at(i["noise"]), denoise=0.5), r"init_latent contains"),
    ("context nan", lambda i: dict(cond=(nan_at(i["cond"][0]), i["cond"][1])), r"cond context contains"),
    ("pooled inf", lambda i: dict(cond=(i["cond"][0], nan_at(i["cond"][1], math.inf))), r"cond pooled contains"),
    ("uncond nan", lambda i: dict(uncond=(nan_at(i["uncond"][0]), i["uncond"][1])), r"uncond context contains"),
    ("cfg nan", lambda i: dict(cfg_scale=float("nan")), r"cfg_scale must be a finite number"),
    ("shift 0", lambda i: dict(shift=0.0), r"shift must be > 0"),
    ("steps 2.5", lambda i: dict(steps=2.5), r"steps must be an integer"),
    ("too large for the tiny model", lambda i: dict(noise=torch.zeros(1, 3, 80, 80)),
     r"noise is 80x80, larger than this model takes: at most 64x64"),
    ("channels", lambda i: dict(noise=torch.zeros(1, 16, 32, 32)), r"noise has 16 channels; this model takes 3"),
    ("batch mismatch", lambda i: dict(noise=torch.zeros(2, 3, 32, 32)), r"for noise of batch 2 they must be \(2, L, C\)"),
    ("init latent shape", lambda i: dict(init_latent=torch.zeros(1, 3, 16, 16), denoise=0.5), r"init_latent has shape"),
    ("slg layer 99", lambda i: dict(slg=dict(scale=1.0, start=0.0, end=1.0, layers=[99])), r"slg layer 99 is out of range"),
    ("denoise without init latent", lambda i: dict(denoise=0.5), r"denoise=0.5 applies to image-to-image only"),
]


@pytest.mark.parametrize("change,message", [c[1:] for c in SAMPLE_CASES], ids=[c[0] for c in SAMPLE_CASES])
def test_sample_refuses(toy_inputs, change, message):
    args = dict(toy_inputs, steps=2, shift=3.0, cfg_scale=2.0, progress=False) | change(toy_inputs)
    model = args["model"]
    args["model"] = _NoCall(model)
    with pytest.raises(ArgumentError, match=message):
        sd3mini.sample(**args)


class _NoCall(torch.nn.Module):
    """The model's config and parameters, but calling it fails the test: checks come before any step."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, *args, **kwargs):
        pytest.fail("the model ran before the arguments were checked")


# --- loaders --------------------------------------------------------------------------------------
def test_toy_metadata_is_checked_before_anything_is_allocated(files, monkeypatch):
    """A 500-byte file whose metadata describes a ~300 GB model: refused from its header, nothing built."""
    assert files["bomb"].stat().st_size < 1000
    monkeypatch.setattr("sd3mini.toy.model.MMDiT", lambda *a, **k: pytest.fail("an MM-DiT was built"))
    with pytest.raises(CheckpointError, match="its metadata describes an MM-DiT"):
        load_toy(files["bomb"])


def test_toy_metadata_that_disagrees_with_the_tensors(tmp_path, monkeypatch):
    from sd3mini.checkpoint import file_metadata

    meta = json.loads(file_metadata(shipped_path())["sd3mini_toy"])
    meta["mmdit"]["depth"] = 400
    save_file(load_file(shipped_path()), tmp_path / "lie.safetensors", metadata={"sd3mini_toy": json.dumps(meta)})
    monkeypatch.setattr("sd3mini.toy.model.MMDiT", lambda *a, **k: pytest.fail("an MM-DiT was built"))
    with pytest.raises(CheckpointError, match=r"metadata does not match its tensors: depth 400 \(tensors: 4\)"):
        load_toy(tmp_path / "lie.safetensors")


def test_toy_loader_on_other_files(files):
    with pytest.raises(CheckpointError, match=r"not a tiny-model checkpoint \(no sd3mini_toy metadata\); it looks "
                                              r"like an LDM-layout VAE"):
        load_toy(files["vae"])


def test_clip_g_weights_as_clip_l(files):
    """CLIP-G (width 1280, 32 layers: a full-size header, no data read) is refused as clip_l, and the other way."""
    with pytest.raises(CheckpointError, match=r"this is CLIP-G \(width 1280, 32 layers\), not CLIP-L \(width 768\): "
                                              r"pass it as clip_g"):
        sd3mini.load_text_encoder(files["clip_g_1280"], "clip_l")


def test_swapped_clips_through_the_api(files):
    with pytest.raises(CheckpointError, match=r"clip_l and clip_g are swapped"):
        sd3mini.SD3Pipeline.from_single_file(files["model"], clip_l=files["clip_g"], clip_g=files["clip_l"],
                                             no_t5=True, device="cpu")
    with pytest.raises(CheckpointError, match=r"the text encoders give a pooled vector of 64 \(clip_l\) \+ 64 "
                                              r"\(clip_g\) = 128 values; this MM-DiT takes 192"):
        sd3mini.SD3Pipeline.from_single_file(files["model"], clip_l=files["clip_l"], clip_g=files["clip_l"],
                                             no_t5=True, device="cpu")


@pytest.mark.parametrize("source,error,message", [
    ("{vae}", CheckpointError, r"no SD3 MMDiT in this file; it looks like an LDM-layout VAE"),
    ("{state}", CheckpointError, r"no SD3 MMDiT in this file; it looks like a train-toy training state"),
    ("sd3_mediun", FileNotFoundError, r"no such file or folder: sd3_mediun \(.*did you mean sd3_medium\?\)"),
], ids=["VAE", "training state", "misspelled name"])
def test_from_single_file_refuses(files, source, error, message, tmp_path):
    with pytest.raises(error, match=message):
        sd3mini.SD3Pipeline.from_single_file(fill([source], files, tmp_path)[0], no_t5=True, device="cpu")


def test_from_pretrained_refuses(tmp_path):
    with pytest.raises(CheckpointError, match=r"is not a diffusers SD3 folder: it has no transformer/, vae/, "
                                              r"text_encoder/, text_encoder_2/ \(it is empty\)"):
        sd3mini.SD3Pipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no such folder: no_such_thing \(and it is not a Hub repository id"):
        sd3mini.SD3Pipeline.from_pretrained("no_such_thing")


def _hub_error(kind):
    from huggingface_hub import errors

    if kind == "local":
        return errors.LocalEntryNotFoundError("offline")
    return getattr(errors, kind)("refused", response=type("R", (), {"status_code": 401, "headers": {}, "request": None})())


@pytest.mark.parametrize("kind,error,message", [
    ("RepositoryNotFoundError", FileNotFoundError, r"no repository owner/misspelled on the Hugging Face Hub \(or it is "
                                                   r"private or gated: without a token"),
    ("GatedRepoError", PermissionError, r"owner/misspelled is a gated repository"),
    ("local", ConnectionError, r"cannot download owner/misspelled: the Hugging Face Hub cannot be reached"),
], ids=["misspelled repo", "gated", "offline"])
def test_hub_errors(kind, error, message, monkeypatch):
    import huggingface_hub

    from sd3mini.sources import hub_download

    def refuse(*args, **kwargs):
        raise _hub_error(kind)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(error, match=message):
        hub_download("owner/misspelled")


# --- train() --------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    (dict(steps=0), r"--steps must be at least 1, got 0"),
    (dict(batch=0), r"--batch must be at least 1"),
    (dict(cooldown=-1), r"--cooldown must be at least 0"),
    (dict(warmup=-1), r"--warmup must be at least 0"),
    (dict(heads=3), r"--width 32 must be divisible by --heads 3"),
    (dict(width=30, heads=1), r"--width 30 must be divisible by 4"),
    (dict(ema=1.5), r"--ema must be <= 1"),
    (dict(t_sampler="beta"), r"--t-sampler must be one of uniform, logit_normal, mode, cosmap"),
], ids=["steps 0", "batch 0", "cooldown -1", "warmup -1", "heads 3", "width 30", "ema 1.5", "t_sampler"])
def test_train_refuses_recipe(change, message, tmp_path):
    with pytest.raises(ArgumentError, match=message):
        train(Recipe(**TINY_RUN | change), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_train_force_starts_over(files, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(files["run"], run)
    (run / "train_log.jsonl").write_text('{"step": 99, "loss": 1.0, "minutes": 0}\n')
    train(Recipe(**TINY_RUN), run, force=True, progress=False)
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2]


# --- long runs, atomic files, signals -------------------------------------------------------------
def test_long_runs_show_a_progress_bar(tmp_path, capfd, monkeypatch):
    """The tiny model is quiet for a picture or two, but a run of many steps or a big grid shows a bar."""
    assert main(["generate", P, "--steps", "2", "-o", str(tmp_path / "quiet.png")]) == 0
    assert "sampling" not in capfd.readouterr().err
    monkeypatch.setattr("sd3mini.toy.model.QUIET_EVALUATIONS", 8)        # 2 x 2 images x 2 steps = 8
    assert main(["generate", P, "--steps", "2", "--grid", "2", "-o", str(tmp_path / "loud.png")]) == 0
    assert "sampling: 100%" in capfd.readouterr().err


def test_checkpoints_are_written_whole(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous file as it was (a temporary name, then a rename)."""
    import sd3mini.checkpoint as ckpt

    path = tmp_path / "toy_sd3.safetensors"
    ckpt.save_state_dict({"a": torch.zeros(2)}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask          # not safetensors' own 0600

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_state_dict({"a": torch.ones(2)}, path)
    assert torch.equal(load_file(path)["a"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["toy_sd3.safetensors"]


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_asks_the_training_loop_to_stop(name):
    import signal

    from sd3mini.toy.ddp import StopOnSignal

    with StopOnSignal() as stop:
        os.kill(os.getpid(), getattr(signal, name))                 # no KeyboardInterrupt, no exit
        assert stop.received == name and stop.requested(world=1, device="cpu")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
