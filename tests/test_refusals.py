"""No two runs clobber each other, no work is done before a refusal, no raw or misleading message (issue 22).

The tables follow tests/test_validation.py: each case names its input and the message it must give; the
CLI cases check the exit status, a single ``error:`` line and that nothing was written.
"""

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import GOLDEN, MANIFESTS, sparse_checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file
from test_validation import P, TINY_RUN, files, fill  # noqa: F401  (files: the fixture)

import sd3mini
from sd3mini import CheckpointError
from sd3mini.checks import ArgumentError
from sd3mini.checkpoint import file_metadata
from sd3mini.cli import main
from sd3mini.toy.model import ToySD3, load_toy, shipped_path, toy_pipeline
from sd3mini.toy.recipe import Recipe
from sd3mini.toy.train import train

TINY_ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_RUN.items() if k != "steps"]


@pytest.fixture(scope="module")
def more(files, tmp_path_factory):  # noqa: F811
    """The files of this module's cases, beside test_validation's."""
    d = tmp_path_factory.mktemp("more")
    Image.new("RGB", (528, 528)).save(d / "large.png")
    Image.fromarray(np.full((32, 32), 2.0, np.float32)).save(d / "bright.tif")
    # malformed files: a header without data_offsets, a sharded folder whose index has no weight_map
    blob = json.dumps({"a": {"dtype": "F16", "shape": [2]}}).encode()
    (d / "no_offsets.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + b"\0" * 4)
    (d / "sharded").mkdir()
    (d / "sharded" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    (d / "two").mkdir()
    for name in ("a", "b"):
        (d / "two" / f"{name}.safetensors").write_bytes((GOLDEN / "vae.safetensors").read_bytes())
    # training states: cut short, with a recipe field this sd3mini does not know
    state = files["state"].read_bytes()
    (d / "cut").mkdir()
    (d / "cut" / "last.safetensors").write_bytes(state[: len(state) // 2])
    (d / "newer").mkdir()
    meta = json.loads(file_metadata(files["state"])["sd3mini_train"])
    meta["recipe"]["dropout"] = 0.1
    save_file(load_file(files["state"]), d / "newer" / "last.safetensors", {"sd3mini_train": json.dumps(meta)})
    # a diffusers folder (info describes each component)
    for folder, src in (("transformer", files["model"]), ("vae", files["vae"]), ("text_encoder", files["clip_l"]),
                        ("text_encoder_2", files["clip_g"])):
        (d / "diffusers" / folder).mkdir(parents=True)
        (d / "diffusers" / folder / "model.safetensors").write_bytes(Path(src).read_bytes())
    return dict(files, more=d)


# --- the command line -----------------------------------------------------------------------------
CLI_CASES = [   # (id, argv, exit status, the message)
    *[(f"output {ext}", ["generate", P, "-o", f"{{tmp}}/out{ext}"], 2,
       rf"--output .*out{ext}: PIL reads {ext} \(\w+\) images but cannot write them; use .png, .jpg or .webp")
      for ext in (".psd", ".cur", ".fits", ".xpm")],
    ("cfg 1e30", ["generate", P, "--cfg", "1e30"], 2, r"--cfg must be at most 100 \(images saturate long before\)"),
    ("shift 1e-300", ["generate", P, "--shift", "1e-300"], 2, r"--shift must be in \[0.01, 100\] .*got 1e-300"),
    ("shift 1e300", ["generate", P, "--shift", "1e300"], 2, r"--shift must be in \[0.01, 100\] .*got 1e\+300"),
    ("seed -1", ["generate", P, "--seed", "-1"], 2, r"--seed must be in \[0, 2\*\*64 - 1\] .*got -1"),
    ("upscale 100000", ["generate", P, "--upscale", "100000"], 2,
     r"the picture would be 3200000x3200000 pixels \(--grid 1 of 32x32, shown 100000x\); the most generate writes "
     r"is 16383 a side: lower --grid or --upscale"),
    ("grid 1000", ["generate", P, "--grid", "1000"], 2, r"the picture would be 135992x135992 pixels"),
    ("width 65", ["generate", P, "--width", "65"], 2,
     r"width 65 is larger than this model supports: the maximum is 64 pixels$"),
    ("width 62", ["generate", P, "--width", "62"], 2, r"width 62 is not a multiple of 4; the nearest valid sizes "
                                                      r"are 60 and 64"),
    ("init image too large", ["generate", P, "--init-image", "{more}/large.png"], 2,
     r"the init image \(528x528 pixels\) is larger than this model supports: the maximum is 64 pixels; pass width "
     r"and height, or a smaller image"),
    ("float init image outside [0, 1]", ["generate", P, "--init-image", "{more}/bright.tif"], 2,
     r"--init-image .*bright.tif is a float image \(mode F\) with values in \[2, 2\]; sd3mini reads float images "
     r"as \[0, 1\]"),
    ("clip-l with a diffusers folder", ["generate", P, "--ckpt", "{dir}/empty", "--clip-l", "{tmp}/none"], 2,
     r"--clip-l does not apply to a diffusers folder or Hub repository: it has its own text encoders"),
    ("t5xxl and tokenizer with a Hub id", ["generate", P, "--ckpt", "owner/repo", "--t5xxl", "x", "--tokenizer", "y"],
     2, r"--t5xxl, --tokenizer do not apply to a diffusers folder or Hub repository"),
    ("t5xxl with no-t5", ["generate", P, "--ckpt", "{model}", "--no-t5", "--t5xxl", "{t5}"], 2,
     r"--t5xxl and --no-t5 contradict each other"),
    ("tokenizer with no-t5", ["generate", P, "--ckpt", "{model}", "--no-t5", "--tokenizer", "google/t5"], 2,
     r"--tokenizer \(the T5 tokenizer\) does not apply with --no-t5"),
    ("a header without data_offsets", ["info", "{more}/no_offsets.safetensors"], 1,
     r"no_offsets.safetensors has a malformed header: tensor 'a' needs dtype, shape .* and data_offsets"),
    ("an index without weight_map", ["info", "{more}/sharded"], 1,
     r"model.safetensors.index.json is not a safetensors index: it needs a JSON object with a \"weight_map\""),
    ("a folder of unrelated files", ["info", "{more}/two"], 1,
     r"two holds several .safetensors files \(a.safetensors, b.safetensors\) and no index; pass one of them"),
    ("a truncated training state", ["train-toy", "--resume", "--out", "{more}/cut"] + TINY_ARGS, 1,
     r"cut/last.safetensors is truncated: .* a train-toy training state cut short .* resume from an earlier copy "
     r"of it, or start the run over with --force"),
    ("an unknown recipe field", ["train-toy", "--resume", "--out", "{more}/newer"] + TINY_ARGS, 1,
     r"newer/last.safetensors: its recipe has 'dropout', which this sd3mini's train-toy does not know"),
    ("resume with fewer steps", ["train-toy", "--resume", "--out", "{run}", "--steps", "1"] + TINY_ARGS, 2,
     r"--resume: .*last.safetensors has trained 2 steps already; pass --steps larger than 2"),
    ("resume with as many steps", ["train-toy", "--resume", "--out", "{run}", "--steps", "2"] + TINY_ARGS, 2,
     r"has trained 2 steps already"),
    ("a recipe over the size cap", ["train-toy", "--width", "2048", "--out", "{tmp}/r"], 2,
     r"this recipe makes a model of [\d,.]+ M parameters; a tiny model has at most 50 M"),
    ("train t-shift 1000", ["train-toy", "--t-shift", "1000", "--out", "{tmp}/r"], 2, r"--t-shift must be in \[0.01"),
]


@pytest.mark.parametrize("argv,status,message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_before_any_work(argv, status, message, more, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr("sd3mini.pipeline.integrate", lambda *a, **k: pytest.fail("sampling ran before the refusal"))
    before = set(tmp_path.rglob("*")) | set(more["dir"].rglob("*")) | set(more["more"].rglob("*"))
    assert main(fill(argv, more, tmp_path)) == status
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and out == "", err
    assert re.search(message, lines[0]), lines[0]
    assert set(tmp_path.rglob("*")) | set(more["dir"].rglob("*")) | set(more["more"].rglob("*")) == before


def test_unwritable_output_folder_is_refused_before_sampling(tmp_path, capfd, monkeypatch):
    """A probe, not os.access: root may write nowhere in /sys, yet os.access says it can."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:                                         # root writes in any 0555 folder
        if not os.path.isdir("/sys"):
            pytest.skip("running as root without /sys: no folder root cannot write in")
        folder = Path("/sys")
    monkeypatch.setattr("sd3mini.pipeline.integrate", lambda *a, **k: pytest.fail("sampling ran before the refusal"))
    assert main(["generate", P, "-o", str(folder / "out.png")]) == 2
    assert re.search(rf"--output .*out.png: cannot write in {folder} \(", capfd.readouterr().err)


def test_full_size_sd3_header_is_refused_before_loading(tmp_path, capfd, monkeypatch):
    """A sparse SD3-medium (4 GB of shapes, no data) with its CLIPs beside it: --width 1000 is refused from
    the headers, before any component is built (once it took 36 s and 8.5 GB)."""
    sparse_checkpoint(tmp_path / "sd3_medium.safetensors", json.loads((MANIFESTS / "sd3_medium.json").read_text()))
    (tmp_path / "text_encoders").mkdir()
    for kind in ("clip_l", "clip_g"):
        sparse_checkpoint(tmp_path / "text_encoders" / f"{kind}.safetensors",
                          json.loads((MANIFESTS / f"text_encoder_{kind}.json").read_text()))
    monkeypatch.setattr("sd3mini.loading.build", lambda *a, **k: pytest.fail("a component was loaded"))
    start = time.perf_counter()
    argv = ["generate", "a fox", "--ckpt", str(tmp_path / "sd3_medium.safetensors"), "--no-t5", "--device", "cpu",
            "-o", str(tmp_path / "out.png")]
    assert main(argv + ["--width", "1000"]) == 2
    assert "width 1000 is not a multiple of 16; the nearest valid sizes are 992 and 1008" in capfd.readouterr().err
    assert main(argv + ["--grid", "20"]) == 2                     # 20 x 1024 px + lines: too large a picture
    assert "the picture would be 20518x20518 pixels" in capfd.readouterr().err
    assert time.perf_counter() - start < 10


def test_hub_model_sizes_are_refused_before_the_download(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr("sd3mini.sources.hub_download", lambda *a, **k: pytest.fail("a download started"))
    assert main(["generate", "a fox", "--ckpt", "sd3.5_large", "--width", "4000", "-o", str(tmp_path / "o.png")]) == 2
    assert "width 4000 is larger than this model supports: the maximum is 3072" in capfd.readouterr().err


# --- the API: every argument named ----------------------------------------------------------------
API_CASES = [   # (id, call, the message)
    ("get_sigmas shift 0", lambda: sd3mini.get_sigmas(4, 0.0), r"shift must be > 0, got 0.0"),
    ("get_sigmas shift nan", lambda: sd3mini.get_sigmas(4, math.nan), r"shift must be a finite number, got nan"),
    ("get_sigmas steps 2.5", lambda: sd3mini.get_sigmas(2.5), r"steps must be an integer, got 2.5"),
    ("time_shift -1", lambda: sd3mini.time_shift(torch.rand(4), -1.0), r"shift must be > 0, got -1.0"),
    ("time_shift 1e-300", lambda: sd3mini.time_shift(torch.rand(4), 1e-300), r"shift must be in \[0.01, 100\]"),
    ("sample_t -1", lambda: sd3mini.sample_t(-1), r"n must be at least 0, got -1"),
    ("make_noise seed 1.5", lambda: sd3mini.make_noise(1.5, (3, 8, 8)), r"seed must be an integer, got 1.5"),
    ("make_noise seed 2**70", lambda: sd3mini.make_noise(2**70, (3, 8, 8)), r"seed must be in \[0, 2\*\*64 - 1\]"),
    ("make_noise batch 0", lambda: sd3mini.make_noise(0, (3, 8, 8), batch=0), r"batch must be at least 1, got 0"),
    ("sample cfg 1e30", lambda: sd3mini.sample(None, torch.zeros(1, 3, 8, 8), None, None, steps=2, shift=3.0,
                                               cfg_scale=1e30), r"cfg_scale must be at most 100"),
]


@pytest.mark.parametrize("call,message", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_names_the_argument(call, message):
    with pytest.raises(ArgumentError, match=message):
        call()


def test_from_single_file_names_its_arguments(files, monkeypatch):  # noqa: F811
    monkeypatch.setattr("sd3mini.loading.build", lambda *a, **k: pytest.fail("a component was loaded"))
    with pytest.raises(ArgumentError, match=r"dtype must be None, torch.float32, torch.float16 or torch.bfloat16, "
                                            r"got 'fp16'"):
        sd3mini.SD3Pipeline.from_single_file(files["model"], dtype="fp16", no_t5=True, device="cpu")
    with pytest.raises(ArgumentError, match=r"t5xxl=.* and no_t5=True contradict each other"):
        sd3mini.SD3Pipeline.from_single_file(files["model"], t5xxl=files["t5"], no_t5=True, device="cpu")


# --- the tiny model's files -----------------------------------------------------------------------
def _toy_file(path, change):
    meta = json.loads(file_metadata(shipped_path())["sd3mini_toy"])
    change(meta)
    save_file(load_file(shipped_path()), path, metadata={"sd3mini_toy": json.dumps(meta)})
    return path


def _set(*keys_value):
    """A change to the metadata: _set("text", "heads", -1) sets meta["text"]["heads"] = -1."""
    *keys, value = keys_value
    return lambda meta: (meta[keys[0]] if len(keys) == 2 else meta).__setitem__(keys[-1], value)


TOY_META_CASES = [   # (id, change to the shipped file's metadata, the message after "its sd3mini_toy metadata ")
    ("defaults {}", _set("defaults", {}), r"is invalid: defaults lacks steps, cfg_scale, shift, sampler"),
    ("defaults steps 0", _set("defaults", "steps", 0), r"is invalid: defaults steps must be at least 1, got 0"),
    ("defaults sampler", _set("defaults", "sampler", "ddim"), r"is invalid: defaults sampler must be one of euler"),
    ("latent_scale 0", _set("latent_scale", 0), r"is invalid: latent_scale must be > 0, got 0"),
    ("latent_scale 'abc'", _set("latent_scale", "abc"), r"is invalid: latent_scale must be a finite number, got 'abc'"),
    ("text heads -1", _set("text", "heads", -1), r"is invalid: text heads must be at least 1, got -1"),
    ("text unknown key", _set("text", "dropout", 0.1), r"is invalid: text has unknown settings \['dropout'\]"),
    ("image_size 10**6", _set("image_size", 10**6), r"is invalid: image_size must be at most 64, got 1000000"),
    ("image_size 30", _set("image_size", 30), r"is invalid: image_size 30 is not a multiple of the patch size 4"),
]


@pytest.mark.parametrize("change,message", [c[1:] for c in TOY_META_CASES], ids=[c[0] for c in TOY_META_CASES])
def test_toy_metadata_values(change, message, tmp_path):
    path = _toy_file(tmp_path / "toy.safetensors", change)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r": its sd3mini_toy metadata " + message):
        load_toy(path)


def test_toy_metadata_stored_as_an_object(tmp_path):
    meta = json.loads(file_metadata(shipped_path())["sd3mini_toy"])
    path = sparse_checkpoint(tmp_path / "object.safetensors", {"mmdit.x": [1]}, {"sd3mini_toy": meta})
    with pytest.raises(CheckpointError, match=r"object.safetensors: its sd3mini_toy metadata is a JSON dict, not a "
                                              r"string holding JSON"):
        load_toy(path)


def test_toy_size_is_capped_before_anything_is_allocated(tmp_path, monkeypatch):
    """A sparse file whose header agrees with its metadata: width 1024, depth 8 (once 3.1 GB of RSS)."""
    r = Recipe(width=1024, depth=8, text_width=1024, heads=16)
    with torch.device("meta"):
        model = ToySD3(r)
    shapes = {f"{part}.{k}": list(v.shape) for part in ("mmdit", "text")
              for k, v in getattr(model, part).state_dict().items()}
    meta = json.loads(file_metadata(shipped_path())["sd3mini_toy"])
    meta["mmdit"] = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(model.mmdit.config).items()}
    meta["text"] = model.text.config
    path = sparse_checkpoint(tmp_path / "big.safetensors", shapes, {"sd3mini_toy": json.dumps(meta)})
    monkeypatch.setattr("sd3mini.toy.model.MMDiT", lambda *a, **k: pytest.fail("an MM-DiT was built"))
    with pytest.raises(CheckpointError, match=r"big.safetensors holds a tiny model of [\d,.]+ M parameters; "
                                              r"sd3mini loads tiny models of at most 50 M"):
        load_toy(path)


def test_toy_loads_into_its_own_tensors(monkeypatch):
    """The tiny model is built on the CPU and the file copied into it: no second copy of the weights."""
    seen = []
    real = torch.nn.Module.load_state_dict
    monkeypatch.setattr(torch.nn.Module, "load_state_dict",
                        lambda self, sd, *a, **k: seen.append(len(sd)) or real(self, sd, *a, **k))
    mmdit, text, _ = load_toy()
    assert seen == [0, 0]                             # nothing left to assign: every tensor was copied in place
    stored = load_file(shipped_path())
    for prefix, module in (("mmdit", mmdit), ("text", text)):
        assert all(torch.equal(v, stored[f"{prefix}.{k}"].float()) for k, v in module.state_dict().items())


@pytest.mark.parametrize("word", ["<pad>", "<bos>", "<eos>", "<unk>"])
def test_toy_control_words_in_a_prompt_are_unknown_words(word):
    text = toy_pipeline().text_encoder
    with pytest.warns(UserWarning, match=re.escape(f"ignored: ['{word}']")):
        tokens = text.tokenize(f"a red {word} circle")
    assert tokens[0, :6].tolist() == [1, text.tokenize("a")[0, 1].item(), text.tokenize("red")[0, 1].item(), 3,
                                      text.tokenize("circle")[0, 1].item(), 2]


# --- messages that name the right thing -----------------------------------------------------------
def test_a_long_negative_prompt_is_called_so():
    pipe = toy_pipeline()
    long = " ".join(["red"] * 20)
    with pytest.warns(UserWarning, match=r"^negative prompt is longer than the tiny model's 14 words") as caught:
        pipe(P, long, steps=1, seed=0, progress=False)
    assert not any(str(w.message).startswith("prompt ") for w in caught)
    tokenizer = sd3mini.SD3Tokenizer()
    with pytest.warns(UserWarning, match=r"^negative prompt is longer than CLIP's 77 tokens"):
        tokenizer(["a fox", "fox " * 1250], names=["prompt", "negative prompt"])


def test_overflow_message_fits_the_dtype(monkeypatch):
    pipe = toy_pipeline()
    monkeypatch.setattr("sd3mini.pipeline.integrate", lambda model, noise, *a, **k: torch.full_like(noise, math.inf))
    with pytest.raises(FloatingPointError, match=r"It ran in float32 on cpu, which does not overflow on sensible "
                                                 r"inputs: lower cfg_scale") as e:
        pipe(P, steps=1, seed=0, progress=False)
    assert "bf16" not in str(e.value)
    assert "Use bf16" in sd3mini.pipeline.overflow_hint(torch.float16, "cuda")


def test_hub_entry_not_found_names_what_was_asked(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    from sd3mini.sources import hub_download

    def refuse(*args, **kwargs):
        raise errors.EntryNotFoundError("missing")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(FileNotFoundError, match=r"^the Hub repository owner/repo has no file matching "
                                                r"transformer/\*, vae/\*$"):
        hub_download("owner/repo", allow_patterns=["transformer/*", "vae/*"])


def test_info_names_what_it_describes(more, capsys):
    assert main(["info", str(more["more"] / "diffusers")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{more['more'] / 'diffusers'}: a diffusers folder\n")
    for part in ("transformer (model.safetensors)", "vae (model.safetensors)", "text_encoder_2 (model.safetensors)"):
        assert part in out
    assert "MMDiT: custom" in out and "VAE:" in out
    assert main(["info", str(more["clip_g"])]) == 0                # a CLIP-G of width 128: not called clip_l
    out = capsys.readouterr().out
    assert "text encoder clip:" in out and "width 128 (neither CLIP-L's 768 nor CLIP-G's 1280)" in out


def test_debug_keeps_the_exit_status(capfd):
    assert main(["--debug", "generate", P, "--grid", "0"]) == 2       # (exit 1: test_validation's debug test)
    err = capfd.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "error: --grid must be at least 1, got 0"


def test_ctrl_c_while_importing_exits_quietly(tmp_path):
    """Ctrl-C in the first seconds lands in ``import torch``: a torch.py that raises KeyboardInterrupt there
    makes the moment exact (a real signal lands before or after it, by the machine's speed)."""
    (tmp_path / "torch.py").write_text("raise KeyboardInterrupt\n")
    env = os.environ | {"OMP_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "sd3mini", "generate", P, "-o", str(tmp_path / "x.png")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 130 and done.stderr.strip() == "error: interrupted", done.stderr


# --- outputs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".jpg", ".webp"])
def test_jpeg_and_webp_carry_the_parameters(ext, tmp_path):
    out = tmp_path / f"out{ext}"
    assert main(["generate", "a café red circle", "--steps", "1", "--seed", "3", "-o", str(out)]) == 0
    with Image.open(out) as image:
        comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert comment[:8] == b"UNICODE\0"
    text = comment[8:].decode("utf-16-be")
    assert text.startswith("prompt: 'a café red circle'") and "seed: 3" in text


def test_init_images_of_more_than_8_bits_are_scaled(tmp_path):
    from sd3mini.cli import open_image

    cases = {"grey16.png": np.full((32, 32), 32768, np.uint16), "grey.tif": np.full((32, 32), 0.5, np.float32),
             "int32.tif": np.full((32, 32), 70000 // 2, np.int32)}
    for name, array in cases.items():
        Image.fromarray(array).save(tmp_path / name)
        pixel = open_image(tmp_path / name).getpixel((0, 0))
        assert pixel == (128, 128, 128) or (name == "int32.tif" and pixel == (136, 136, 136)), (name, pixel)


def test_init_image_is_rounded_to_the_models_multiple(tmp_path, capsys):
    Image.new("RGB", (38, 36), "red").save(tmp_path / "in.png")
    assert main(["generate", P, "--init-image", str(tmp_path / "in.png"), "--steps", "2", "--upscale", "1",
                 "-o", str(tmp_path / "out.png")]) == 0
    assert Image.open(tmp_path / "out.png").size == (36, 36)    # the tiny model's multiple is 4, not 16


def test_a_grid_is_drawn_in_batches_that_do_not_grow(tmp_path, monkeypatch):
    """Batches of at most GRID_BATCH_MAX images, and the same picture as one batch of all."""
    import sd3mini.cli as cli

    argv = ["generate", P, "--grid", "5", "--steps", "2", "--seed", "4", "--upscale", "1"]
    assert main(argv + ["-o", str(tmp_path / "one.png")]) == 0
    sizes = []
    real = sd3mini.SD3Pipeline.__call__
    monkeypatch.setattr(sd3mini.SD3Pipeline, "__call__", lambda self, p, *a, **k: sizes.append(len(p)) or
                        real(self, p, *a, **k))
    monkeypatch.setattr(cli, "GRID_BATCH_MAX", 16)
    assert main(argv + ["-o", str(tmp_path / "parts.png")]) == 0
    assert sizes == [13, 12]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")), np.asarray(Image.open(tmp_path / "parts.png")))
    assert Image.open(tmp_path / "parts.png").text == Image.open(tmp_path / "one.png").text
    assert max(count for _, count in cli.grid_batches(480**2, 32 * 32)) <= 64


def test_two_runs_writing_one_output_both_succeed(tmp_path, monkeypatch):
    """Both write their picture before either renames it (a barrier): with one shared temporary name the
    second rename failed, or published the other's half-written file."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)   # restored after two threads swap it
    barrier = threading.Barrier(2, timeout=60)
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        barrier.wait()

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out.png"
    status = {}
    runs = [threading.Thread(target=lambda i=i: status.setdefault(i, main(
        ["generate", P, "--steps", "1", "--seed", str(i), "--force", "-o", str(out)]))) for i in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(120)
    assert status == {0: 0, 1: 0}
    with Image.open(out) as image:
        image.load()
        assert image.size == (128, 128) and "seed: " in image.text["parameters"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_a_second_training_run_into_the_same_folder_is_refused(tmp_path, capfd):
    from sd3mini.toy.recipe import check_recipe

    check_recipe(Recipe(**TINY_RUN))                 # its first call imports torch._dynamo: not while racing
    out = tmp_path / "run"
    args = ["train-toy", "--out", str(out), "--save-every", "50"] + TINY_ARGS
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "sd3mini", *args, "--steps", "300"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 1) and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, "the first run ended before the second started"
    for extra in ([], ["--force"], ["--resume"]):
        assert main(args + extra + ["--steps", "400"]) == 2
        err = capfd.readouterr().err
        assert re.fullmatch(rf"error: --out {out} is in use by another train-toy run \(it holds the folder's lock\); "
                            r"wait for it to end, or choose another --out\n", err), err
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, 301))
    assert load_toy(out / "toy_sd3.safetensors")[2]["steps_trained"] == 300
    train(Recipe(**TINY_RUN | {"steps": 301}), out, resume=True, progress=False)   # the lock went with it
