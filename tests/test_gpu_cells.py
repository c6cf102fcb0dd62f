"""The chapters' real-weights cells, run through the notebooks themselves on the CPU.

On a machine without a GPU every cell behind ``if real_weights_available():`` prints one skip line, so
nbval never runs their bodies. Here they do run: tiny files in the official Hub layout (the tiny MM-DiT
and a small random VAE in ``sd3_medium.safetensors``, tiny CLIP-L, CLIP-G and T5 in ``text_encoders/``,
a tiny T5 tokenizer in ``tokenizer_3/``) stand in for the weights, ``SD3MINI_BOOK_DEVICE=cpu`` makes
``sd3mini.book`` answer with the CPU, ``SD3MINI_PHOTO`` replaces the photo download, and the Hub is
offline.

Each test reads the chapter's ``.ipynb``, runs its setup cell, the imports, definitions and literal
constants of the cells before the real-weights cell (not their computations: a real-weights cell must
not depend on them), then the real-weights cell's own source, and checks what the cell claims. Renaming
anything such a cell uses (an argument, a helper of ``sd3mini.book``) makes its test fail.
"""

import contextlib
import io
import json
import re
import sys
import types
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from helpers import (definitions, python, save_hub_layout, tiny_mmdit, tiny_t5_tokenizer,  # noqa: E402
                     tiny_text_encoders)

import sd3mini  # noqa: E402
from sd3mini import book  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
GUARD = "if real_weights_available("
PHOTO_SIZE = (640, 480)            # not square: the cell's centre crop has something to do
BASE = 64                          # diffusers' base_size for SD3: sample_size 128 / patch 2


# --------------------------------------------------------------------------------------------------
# Running a chapter's cells
# --------------------------------------------------------------------------------------------------
def code_cells(name: str) -> list[tuple[int, str]]:
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    return [(i, "".join(c["source"])) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]


def run_gpu_cell(name: str):
    """Run chapter ``name``'s real-weights cell as a reader would after its setup: -> (namespace, stdout)."""
    cells = code_cells(name)
    gpu = [k for k, (_, source) in enumerate(cells) if GUARD in source]
    assert len(gpu) == 1, f"{name}: expected one real-weights cell, found {len(gpu)}"
    (setup_index, setup), *between = cells[: gpu[0]]
    index, source = cells[gpu[0]]
    namespace = {"__name__": "__main__"}
    plt.close("all")
    exec(compile(python(setup), f"{name}.ipynb cell {setup_index}", "exec"), namespace)
    for i, cell in between:
        exec(compile(definitions(cell), f"{name}.ipynb cell {i} (definitions)", "exec"), namespace)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python(source), f"{name}.ipynb cell {index}", "exec"), namespace)
    text = out.getvalue()
    assert "Skipped" not in text, text
    return namespace, text


# --------------------------------------------------------------------------------------------------
# The stand-in weights
# --------------------------------------------------------------------------------------------------
def diffusers_grid(dim: int, m: int) -> torch.Tensor:
    """diffusers' initial SD3 grid, computed by diffusers (``PatchEmbed`` calls this): (m * m, dim)."""
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    return torch.as_tensor(embeddings.get_2d_sincos_pos_embed(dim, m, base_size=BASE, output_type="pt")).float()


def write_hub(folder: Path) -> Path:
    """The Hub layout in miniature; its MM-DiT stores the formula's grid (integer positions). The VAE is
    a small random one (the fewest channels GroupNorm allows, one block per level): 512-pixel images in
    seconds."""
    torch.manual_seed(0)
    vae = sd3mini.SDVAE(sd3mini.VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)).eval()
    model = save_hub_layout(folder, types.SimpleNamespace(mmdit=tiny_mmdit(), vae=vae))
    model.rename(folder / book.HUB_MODELS["sd3_medium"][1])
    tiny_t5_tokenizer().save_pretrained(folder / book.T5_TOKENIZER_FOLDER)
    return folder


def with_diffusers_grid(folder: Path, to: Path) -> Path:
    """A copy of the Hub folder whose MM-DiT stores diffusers' initial grid (positions p * 64 / M)."""
    import shutil

    from sd3mini.loading import save_single_file

    if not to.exists():
        shutil.copytree(folder, to)
        model = to / book.HUB_MODELS["sd3_medium"][1]
        mmdit, vae = sd3mini.load_mmdit(model), sd3mini.load_vae(model)
        mmdit.pos_embed.copy_(diffusers_grid(mmdit.config.hidden_size, mmdit.config.pos_embed_max_size)[None])
        save_single_file(model, mmdit=mmdit, vae=vae)
    return to


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("hub")
    photo = Image.new("RGB", PHOTO_SIZE, (40, 60, 90))
    draw = ImageDraw.Draw(photo)
    draw.ellipse((200, 120, 440, 360), fill=(230, 180, 60))
    draw.rectangle((0, 0, 79, 479), fill=(200, 30, 30))       # cut off by the centre crop
    photo.save(root / "photo.png")
    return write_hub(root / "integer"), root / "photo.png"


@pytest.fixture
def weights(hub, monkeypatch):
    """The environment of a reader with the weights, on the CPU: -> the Hub folder in use."""
    folder, photo = hub
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(book.DEVICE_ENV, "cpu")
    monkeypatch.setenv(book.WEIGHTS_ENV, str(folder))
    monkeypatch.setenv(book.PHOTO_ENV, str(photo))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                       # nothing may be downloaded
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    yield folder
    plt.close("all")


WITH_CELLS = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb") if GUARD in p.read_text())
CHECKED = ["00_tour", "03_vae", "09_positional_embedding", "10_text_conditioning", "13_sd3_by_hand",
           "14_real_weights"]
# Chapters whose real-weights cell does not take its machine from sd3mini.book yet (so it cannot run
# here): when one is converted, its xfail turns into a failure that asks for a test of what it claims.
NOT_YET = {}


def test_the_checked_chapters_have_their_real_weights_cells():
    assert set(CHECKED) <= set(WITH_CELLS)


@pytest.mark.parametrize("name", [n for n in WITH_CELLS if n not in CHECKED])
def test_every_other_real_weights_cell_runs_on_the_cpu(weights, name, request):
    """A chapter that gains a real-weights cell is run here at least; it deserves a test of its claims."""
    if name in NOT_YET:
        request.applymarker(pytest.mark.xfail(strict=True, reason=NOT_YET[name]))
    run_gpu_cell(name)


# --------------------------------------------------------------------------------------------------
# The chapters
# --------------------------------------------------------------------------------------------------
def test_tour_names_the_chapters_whose_cells_will_run(weights):
    _, out = run_gpu_cell("00_tour")
    listed = re.search(r"chapters ([\d, and]+) will run on (\S+) in (\S+)\.", out)
    assert listed, out
    chapters = {int(n) for n in re.findall(r"\d+", listed.group(1))}
    with_cells = {int(p.name[:2]) for p in NOTEBOOKS.glob("*.ipynb") if GUARD in p.read_text()} - {0}
    assert chapters == with_cells
    assert listed.group(2, 3) == ("cpu", "torch.float32")


def test_vae_cell_reconstructs_the_photo(weights):
    from PIL import Image

    ns, out = run_gpu_cell("03_vae")
    photo, recon, latent = ns["photo"], ns["recon"], ns["latent"]
    # the local photo, centre-cropped to a square and resized to 512 x 512, as the cell says
    source = book.example_photo()                            # $SD3MINI_PHOTO
    side = min(PHOTO_SIZE)
    left = (PHOTO_SIZE[0] - side) // 2
    expected = source.crop((left, 0, left + side, side)).resize((512, 512), Image.LANCZOS)
    assert photo.size == recon.size == (512, 512)
    assert np.array_equal(np.asarray(photo), np.asarray(expected))
    assert tuple(latent.shape) == (1, 16, 512 // 8, 512 // 8)
    assert f"latent {tuple(latent.shape)}" in out
    assert next(ns["real_vae"].parameters()).dtype == torch.float32 and latent.device.type == "cpu"
    assert f"reconstruction PSNR: {ns['psnr'](photo, recon):.2f} dB" in out
    assert re.search(r"encoder Gaussian: mean \|mu\| \d+\.\d{4}, mean sigma \d+\.\d{4}", out)
    axes = plt.gcf().axes
    assert [ax.get_title() for ax in axes[:1]] == ["original, 512 x 512"] and len(axes) == 4   # + colour bar


@pytest.mark.parametrize("grid", ["integer", "diffusers"])
def test_position_cell_names_the_grid_the_checkpoint_holds(weights, grid, monkeypatch):
    if grid == "diffusers":
        monkeypatch.setenv(book.WEIGHTS_ENV, str(with_diffusers_grid(weights, weights.parent / grid)))
    ns, out = run_gpu_cell("09_positional_embedding")
    m, d = 8, 128                                            # the tiny MM-DiT's grid
    assert f"stored pos_embed: {m} x {m} positions x {d} channels" in out
    verdicts = dict(re.findall(r"^(integer|diffusers|paper)\b.*max \|stored - it\| = [\d.]+ +(\w+)", out, re.M))
    assert verdicts == {"integer": "matches" if grid == "integer" else "differs",
                        "diffusers": "matches" if grid == "diffusers" else "differs",
                        "paper": "differs"}, out
    assert len(plt.gcf().axes) == 1 and len(plt.gcf().axes[0].lines) == 4       # the stored row + 3


def test_text_cell_encodes_the_prompt_with_the_files(weights):
    ns, out = run_gpu_cell("10_text_conditioning")
    ctx, pool = ns["ctx"], ns["pool"]
    # the tiny encoders' widths: CLIP-L 64 + CLIP-G 128 pooled; T5 256 wide, so the context is too
    assert tuple(ctx.shape) == (1, 154, 256) and tuple(pool.shape) == (1, 64 + 128)
    assert f"context {tuple(ctx.shape)} pooled {tuple(pool.shape)} finite: True" in out
    encs = tiny_text_encoders()                             # the weights written to the files
    tokens = sd3mini.SD3Tokenizer(t5=tiny_t5_tokenizer())([ns["prompt"]])
    expected = sd3mini.encode_prompt(tokens, encs["clip_l"], encs["clip_g"], encs["t5xxl"], context_dim=256)
    torch.testing.assert_close(ctx, expected[0])
    torch.testing.assert_close(pool, expected[1])


def test_by_hand_cell_runs_the_checkpoint_in_the_readers_own_class(weights):
    ns, out = run_gpu_cell("13_sd3_by_hand")
    big, package = ns["big"], ns["package"]
    assert "<All keys matched successfully>" in out                       # strict=True, every tensor
    assert type(big).__name__ == "MyMMDiT" and not any(isinstance(m, type(package)) for m in big.modules())
    assert ns["big_config"]["depth"] == package.config.depth
    assert ns["big_config"]["D"] == package.config.hidden_size
    n = sum(p.numel() for p in package.parameters())
    assert f"{n / 1e9:.3f} B parameters; velocity (1, 16, 16, 16)" in out   # the tiny grid: 8 x 8 patches
    assert ns["diff"] < 1e-4 and "in torch.float32" in out


@pytest.mark.parametrize("memory", [None, ("Tesla T4", 15_828_320_256), ("NVIDIA A100", 85_899_345_920)],
                         ids=["host", "t4", "a100"])
def test_generation_cell_picks_the_memory_mode_from_the_memory(weights, memory, monkeypatch):
    if memory is not None:                                   # what a GPU would report
        monkeypatch.setattr(book, "device_memory", lambda: memory)
    ns, out = run_gpu_cell("14_real_weights")
    name, total = book.device_memory()
    first = re.search(r"^(.+): (\d+) GB -> offload='(\w+)', (\S+)$", out, re.M)
    assert first and first.group(1) == name and int(first.group(2)) == round(total / 1e9), out
    assert first.group(3) == ("none" if total / 1e9 > 24 else "sequential") == ns["pipe"].offload
    assert first.group(4) == "torch.float32" and ns["pipe"].device == torch.device("cpu")
    image = ns["image"]
    side = 16 * ns["pipe"].mmdit.config.pos_embed_max_size   # the pipeline's default size for this grid
    assert image.size == (side, side)
    peak = re.search(rf"^{side} x {side} image; peak memory on {re.escape(name)}: (\d+\.\d) GB$", out, re.M)
    assert peak and 0 < float(peak.group(1)), out
    shown = plt.gcf().axes[0].images[0].get_array()
    assert shown.shape == (side, side, 3) and np.array_equal(np.asarray(shown), np.asarray(image))
