"""What the book's chapters share beyond the model: the measured results they plot, and the one place
every cell that needs the official weights asks what to do.

A real-weights cell asks ``real_weights_available()`` and, if it may run, takes everything that depends
on the machine from here: the device and number format (``real_weights_device``, ``real_weights_dtype``),
the memory to plan with and the peak it reached (``device_memory``, ``reset_peak_memory``,
``peak_memory``), the files (``real_weights``), the tokenizer (``real_tokenizer``) and the example
photo (``example_photo``). For a reader that is a CUDA GPU and the Hub. For the tests it is the CPU and
tiny local files: ``SD3MINI_BOOK_DEVICE=cpu`` with ``SD3MINI_WEIGHTS=<folder>`` runs the very same cells
(``tests/test_gpu_cells.py``).

All of it works from an installed wheel with any working directory (as on Colab): the results are
package data (``sd3mini/toy/results/``), not files beside the notebooks.
"""

from __future__ import annotations

import io
import json
import os
import sys
import urllib.request
from pathlib import Path

import torch
from PIL import Image

from .loading import TEXT_ENCODERS
from .pipeline import default_dtype
from .sources import HUB_MODELS, HUB_TEXT_ENCODERS, download, tokenizer_for

RESULTS = Path(__file__).parent / "toy" / "results"     # written by experiments/toy_report.py
WEIGHTS_ENV = "SD3MINI_WEIGHTS"                         # a local folder laid out as the Hub repository
DEVICE_ENV = "SD3MINI_BOOK_DEVICE"                      # tests only: "cpu" runs the cells on the CPU
PHOTO_ENV = "SD3MINI_PHOTO"                             # a local image instead of the example photo
PHOTO_URL = "https://raw.githubusercontent.com/pytorch/vision/main/gallery/assets/astronaut.jpg"
T5_TOKENIZER_FOLDER = "tokenizer_3"                     # in $SD3MINI_WEIGHTS, where it has one


def data_path(name: str) -> Path:
    """The path of a measured-results file shipped with the package, e.g. ``data_path("toy_eval.json")``."""
    path = RESULTS / name
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in RESULTS.iterdir()))
        raise FileNotFoundError(f"no results file {name!r} in {RESULTS}; the package ships: {known}")
    return path


def load_json(name: str):
    """A shipped results file, parsed: ``load_json("toy_eval.json")``."""
    return json.loads(data_path(name).read_text())


# --------------------------------------------------------------------------------------------------
# Where the real-weights cells run, and in which number format
# --------------------------------------------------------------------------------------------------
def real_weights_device():
    """The device every real-weights cell computes on: ``cuda`` (the GPU) for a reader.

    ``$SD3MINI_BOOK_DEVICE`` overrides it; the tests set ``cpu`` to run the same cells on tiny local
    files. Only ``cpu`` and ``cuda[:n]`` are accepted (a ValueError names the value otherwise)."""
    value = os.environ.get(DEVICE_ENV, "").strip()
    if not value:
        return torch.device("cuda")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"${DEVICE_ENV}={value!r}: use cpu or cuda (or unset it for the GPU)")
    return device


def real_weights_dtype(precise: bool = False):
    """The number format of the real-weights cells: bfloat16 on a GPU that computes it fast (compute
    capability 8 and up: Ampere and newer), float16 on older ones (a Colab T4 is 7.5), float32 on the CPU.

    The pipeline's own default (``pipeline.default_dtype``), so a cell and ``SD3Pipeline`` agree.

    ``precise=True``: float32 on every device, for a cell that measures a model rather than a number
    format and can afford it (chapter 3's VAE, 0.3 GB)."""
    return torch.float32 if precise else default_dtype(real_weights_device())


def _cuda(device) -> bool:
    return device.type == "cuda"


def device_memory() -> tuple[str, int]:
    """``(name, bytes)`` of the memory a cell plans with: on a GPU its name and total memory
    (``torch.cuda.get_device_properties``); on the CPU (the tests' override) ``"CPU (host RAM)"`` and
    the host's physical memory, the memory the same code would fill there."""
    device = real_weights_device()
    if _cuda(device):
        props = torch.cuda.get_device_properties(device)
        return props.name, int(props.total_memory)
    return "CPU (host RAM)", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_cpu_peak_at_reset = 0


def _peak_rss() -> int:
    """The process's peak resident memory so far, in bytes (ru_maxrss: kilobytes on Linux)."""
    import resource                       # Unix only: imported where it is used

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_memory():
    """Start a peak-memory measurement: ``torch.cuda.reset_peak_memory_stats`` on a GPU. On the CPU the
    operating system keeps one peak per process that cannot be reset; it is only noted."""
    global _cpu_peak_at_reset
    device = real_weights_device()
    if _cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _cpu_peak_at_reset = _peak_rss()


def peak_memory() -> int:
    """Bytes at the peak since ``reset_peak_memory()``: on a GPU the most that PyTorch's tensors held
    (``torch.cuda.max_memory_allocated``). On the CPU a stand-in that is an upper bound: the whole
    process's peak resident memory since it started (Python, libraries, earlier cells included)."""
    device = real_weights_device()
    if _cuda(device):
        return int(torch.cuda.max_memory_allocated(device))
    return _peak_rss()


# --------------------------------------------------------------------------------------------------
# Whether they can run
# --------------------------------------------------------------------------------------------------
def _local_weights(model: str, text_encoders=TEXT_ENCODERS) -> dict[str, Path] | None:
    """The files under ``$SD3MINI_WEIGHTS`` (the Hub repository's layout), or None if it is not set."""
    folder = os.environ.get(WEIGHTS_ENV)
    if not folder:
        return None
    folder = Path(folder).expanduser()
    paths = {"model": folder / HUB_MODELS[model][1]}
    paths.update({kind: folder / HUB_TEXT_ENCODERS[kind] for kind in text_encoders})
    return paths


def _colab_token() -> bool:
    """Whether Colab's Secrets hold a non-empty ``HF_TOKEN`` this notebook may read: the usual way to
    keep a token on Colab (the key icon in the left bar). Only in Colab; sd3mini asks for nothing, and
    any error (no such secret, no notebook access, an old or broken ``google.colab``) means no."""
    if "google.colab" not in sys.modules:
        return False
    try:
        from google.colab import userdata            # only in Colab

        return bool((userdata.get("HF_TOKEN") or "").strip())
    except Exception:
        return False


def _hub_token() -> bool:
    """A Hugging Face token: in the environment, saved by ``huggingface-cli login`` / ``notebook_login()``,
    or, on Colab, in its Secrets as ``HF_TOKEN`` (``huggingface_hub`` reads it from there too)."""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return True
    from huggingface_hub import constants   # imported only when no token is in the environment

    return Path(constants.HF_TOKEN_PATH).is_file() or _colab_token()


def _missing(model: str, text_encoders=TEXT_ENCODERS) -> str | None:
    """Why the real weights cannot run here (one line), or None if they can."""
    if model not in HUB_MODELS:
        return f"unknown model {model!r}; choose one of {sorted(HUB_MODELS)}."
    device = real_weights_device()
    local = _local_weights(model, text_encoders)
    if _cuda(device) and not torch.cuda.is_available():
        if "google.colab" in sys.modules:
            return "no CUDA GPU here: Runtime > Change runtime type > T4 GPU, then run all cells again."
        return "no CUDA GPU here."
    if not _cuda(device) and local is None:
        return f"${DEVICE_ENV}={device} runs these cells on local files only: set ${WEIGHTS_ENV}."
    if local is not None:
        absent = [str(p) for p in local.values() if not p.is_file()]
        return f"${WEIGHTS_ENV} is set but lacks {', '.join(absent)}." if absent else None
    if _hub_token():
        return None
    repo = HUB_MODELS[model][0]
    return (f"the {model} weights need a Hugging Face token: accept the licence at "
            f"https://huggingface.co/{repo}, then run "
            "huggingface_hub.notebook_login() (or set HF_TOKEN, or on Colab add the secret HF_TOKEN), "
            f"or set ${WEIGHTS_ENV} to a folder with the files; then run this cell again.")


def real_weights_available(model: str = "sd3_medium", text_encoders=TEXT_ENCODERS) -> bool:
    """Whether a chapter's real-weight cells can run: a CUDA GPU, and the official files (the model and
    the ``text_encoders`` the cell reads) either in ``$SD3MINI_WEIGHTS`` or downloadable with a Hugging
    Face token (``HF_TOKEN``, a saved login, or Colab's secret ``HF_TOKEN``). Otherwise prints one line
    that says what to do and returns False.
    It never asks for a login and never raises. (Colab itself may ask once whether this notebook may
    read a secret HF_TOKEN that the reader stored without notebook access, as the download would.)

    With ``$SD3MINI_BOOK_DEVICE=cpu`` (the tests) the CPU is accepted, with local files only."""
    try:
        reason = _missing(model, tuple(text_encoders))
    except Exception as e:                              # a broken CUDA or hub install: say so, skip
        reason = f"could not check ({type(e).__name__}: {e})."
    if reason is not None:                  # one line; the one a CPU stores (no GPU) fits 88 columns
        device = "the CPU" if os.environ.get(DEVICE_ENV, "").strip() == "cpu" else "a GPU"
        print(f"Skipped (needs the official {model} weights on {device}): {reason}")
    return reason is None


# --------------------------------------------------------------------------------------------------
# What they read
# --------------------------------------------------------------------------------------------------
def real_weights(model: str = "sd3_medium", text_encoders=TEXT_ENCODERS) -> dict[str, Path]:
    """``{"model": path, "clip_l": path, ...}``: the files in ``$SD3MINI_WEIGHTS`` or, without it, the Hub
    download (cached after the first time). Call after ``real_weights_available()`` said yes."""
    local = _local_weights(model)
    if local is not None:
        return {k: v for k, v in local.items() if k == "model" or k in text_encoders}
    return download(model, text_encoders=text_encoders)


def real_tokenizer():
    """SD3's tokenizer for the official encoders (an ``SD3Tokenizer``): CLIP's BPE ships with sd3mini;
    T5's comes from ``tokenizer_3/`` in ``$SD3MINI_WEIGHTS`` where that folder exists (the SD3.5
    repositories have one), else from google/t5-v1_1-xxl on the Hub (public, cached after the first
    time), as ``SD3Pipeline.from_single_file`` reads it."""
    folder = os.environ.get(WEIGHTS_ENV)
    local = Path(folder).expanduser() / T5_TOKENIZER_FOLDER if folder else None
    return tokenizer_for(str(local) if local is not None and local.is_dir() else None, need_t5=True)


def example_photo():
    """The chapters' example photo as an RGB PIL image: ``astronaut.jpg`` from torchvision's gallery,
    downloaded from ``PHOTO_URL``. ``$SD3MINI_PHOTO``: a local image file instead (the tests use one;
    so can a reader offline)."""
    local = os.environ.get(PHOTO_ENV)
    if local:
        return Image.open(Path(local).expanduser()).convert("RGB")
    with urllib.request.urlopen(PHOTO_URL, timeout=60) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")
