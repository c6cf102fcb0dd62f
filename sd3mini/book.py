"""What the book's chapters share beyond the model: the measured results they plot, and one decision
for every cell that needs the official weights.

Both work from an installed wheel with any working directory (as on Colab): the results are package
data (``sd3mini/toy/results/``), not files beside the notebooks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .loading import HUB_MODELS, HUB_TEXT_ENCODERS, TEXT_ENCODERS

RESULTS = Path(__file__).parent / "toy" / "results"     # written by experiments/toy_report.py
WEIGHTS_ENV = "SD3MINI_WEIGHTS"                         # a local folder laid out as the Hub repository


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


def _local_weights(model: str) -> dict[str, Path] | None:
    """The files under ``$SD3MINI_WEIGHTS`` (the Hub repository's layout), or None if it is not set."""
    folder = os.environ.get(WEIGHTS_ENV)
    if not folder:
        return None
    folder = Path(folder).expanduser()
    paths = {"model": folder / HUB_MODELS[model][1]}
    paths.update({kind: folder / HUB_TEXT_ENCODERS[kind] for kind in TEXT_ENCODERS})
    return paths


def _hub_token() -> bool:
    """A Hugging Face token in the environment or saved by ``huggingface-cli login`` / ``notebook_login()``.
    Only looks: reading Colab's secrets can open a permission dialog, so they are not consulted."""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return True
    from huggingface_hub import constants

    return Path(constants.HF_TOKEN_PATH).is_file()


def _missing(model: str) -> str | None:
    """Why the real weights cannot run here (one line), or None if they can."""
    import torch

    if model not in HUB_MODELS:
        return f"unknown model {model!r}; choose one of {sorted(HUB_MODELS)}."
    if not torch.cuda.is_available():
        return ("no CUDA GPU here (on Colab: Runtime > Change runtime type > T4 GPU); "
                "the rest of the chapter runs on the CPU.")
    local = _local_weights(model)
    if local is not None:
        absent = [str(p) for p in local.values() if not p.is_file()]
        return f"${WEIGHTS_ENV} is set but lacks {', '.join(absent)}." if absent else None
    if _hub_token():
        return None
    repo = HUB_MODELS[model][0]
    return (f"no Hugging Face token: accept the licence at https://huggingface.co/{repo}, then run "
            "huggingface_hub.notebook_login() (or set HF_TOKEN), or set "
            f"${WEIGHTS_ENV} to a folder with the files; then run this cell again.")


def real_weights_available(model: str = "sd3_medium") -> bool:
    """Whether a chapter's real-weight cells can run: a CUDA GPU, and the official files either in
    ``$SD3MINI_WEIGHTS`` or downloadable with a Hugging Face token. Otherwise prints one line that says
    what to do and returns False. It never prompts for a login and never raises."""
    try:
        reason = _missing(model)
    except Exception as e:                              # a broken CUDA or hub install: say so, skip
        reason = f"could not check ({type(e).__name__}: {e})."
    if reason is not None:
        print(f"Skipped (needs the official {model} weights on a GPU): {reason}")
    return reason is None


def real_weights(model: str = "sd3_medium", text_encoders=TEXT_ENCODERS) -> dict[str, Path]:
    """``{"model": path, "clip_l": path, ...}``: the files in ``$SD3MINI_WEIGHTS`` or, without it, the Hub
    download (cached after the first time). Call after ``real_weights_available()`` said yes."""
    from .loading import download

    local = _local_weights(model)
    if local is not None:
        return {k: v for k, v in local.items() if k == "model" or k in text_encoders}
    return download(model, text_encoders=text_encoders)
