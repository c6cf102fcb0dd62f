"""What the user names -> one opened source per component, each file's header read once.

    an official single file   sd3_medium.safetensors (text encoders bundled, or beside it in text_encoders/)
    a model name              sd3_medium, sd3.5_large, ... (HUB_MODELS: the single file, downloaded)
    a diffusers folder        transformer/, vae/, text_encoder*/, tokenizer*/
    a Hub repository          owner/name in the diffusers layout (downloaded)

``single_file_sources`` and ``diffusers_sources`` return ``{component: Source}`` for mmdit, vae,
clip_l, clip_g and t5xxl; a file several components share is opened once. ``pipeline`` assembles
an ``SD3Pipeline`` from them and ``loading`` builds each module from its state dict. A new kind of
source is one more function here.
"""

import difflib
import os
import re
from pathlib import Path

from .checkpoint import CheckpointError, open_state_dict
from .loading import TEXT_ENCODERS, mmdit_state_dict
from .text import SD3Tokenizer, clip_tokenizer, load_tokenizer

HUB_MODELS = {
    # name: (repository, single file). All are gated: accept the licence on the model page first.
    "sd3_medium": ("stabilityai/stable-diffusion-3-medium", "sd3_medium.safetensors"),
    "sd3.5_large": ("stabilityai/stable-diffusion-3.5-large", "sd3.5_large.safetensors"),
    "sd3.5_large_turbo": ("stabilityai/stable-diffusion-3.5-large-turbo", "sd3.5_large_turbo.safetensors"),
    "sd3.5_medium": ("stabilityai/stable-diffusion-3.5-medium", "sd3.5_medium.safetensors"),
}
HUB_TEXT_ENCODERS = {"clip_l": "text_encoders/clip_l.safetensors", "clip_g": "text_encoders/clip_g.safetensors",
                     "t5xxl": "text_encoders/t5xxl_fp16.safetensors"}
# The reference fetches its tokenizers from these public (not gated) repositories.
HUB_T5_TOKENIZER = "google/t5-v1_1-xxl"
DIFFUSERS_FOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2")
# Standalone text-encoder files the Hub's single-file repositories keep beside the model, by kind.
TEXT_ENCODER_FILES = {"clip_l": ["clip_l.safetensors"], "clip_g": ["clip_g.safetensors"],
                      "t5xxl": ["t5xxl_fp16.safetensors", "t5xxl.safetensors", "t5xxl_fp32.safetensors"]}


class Source(dict):
    """One file's (or folder's) lazy state dict, ``{key: LazyTensor}`` from its header, that knows its path:
    the loaders read it as a state dict, and messages name it as a path."""

    def __init__(self, path):
        super().__init__(open_state_dict(path))
        self.path = Path(str(path))

    def __fspath__(self):
        return str(self.path)

    def __str__(self):
        return str(self.path)


def open_sources(paths: dict) -> dict[str, Source]:
    """{component: path} -> {component: Source}; a path named twice is opened once (its header read once)."""
    opened = {}
    for path in dict.fromkeys(map(str, paths.values())):
        opened[path] = Source(path)
    return {kind: opened[str(path)] for kind, path in paths.items()}


# --- an official single file, or a model name -------------------------------------------------------
def single_file_sources(path, *, clip_l=None, clip_g=None, t5xxl=None, no_t5: bool = False,
                        token=None) -> dict[str, Source]:
    """The sources of an official single file (or a ``HUB_MODELS`` name, downloaded with its text
    encoders): text encoders from the file when it bundles them, else as given, else beside it."""
    check_model_name(path)
    if str(path) in HUB_MODELS and not Path(str(path)).exists():
        kinds = tuple(k for k in TEXT_ENCODERS if not (k == "t5xxl" and no_t5))
        paths = download(str(path), text_encoders=kinds, token=token)
        path, clip_l, clip_g, t5xxl = paths["model"], paths["clip_l"], paths["clip_g"], paths.get("t5xxl")
    model = Source(path)
    try:                            # no MM-DiT (a VAE, a text encoder, a training state): say so first
        mmdit_state_dict(model)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    given = {kind: src for kind, src in (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", t5xxl))
             if not (kind == "t5xxl" and no_t5)}
    found = {kind: src or find_text_encoder(model, model.path, kind) for kind, src in given.items()}
    separate = open_sources({kind: src for kind, src in found.items() if src is not model})
    return {"mmdit": model, "vae": model} | {kind: separate.get(kind, model) for kind in found}


def find_text_encoder(sd: dict, path: Path, kind: str):
    """A text encoder bundled in the single file (``sd`` itself), or a standalone file beside it."""
    if any(k.startswith(f"text_encoders.{kind}.") for k in sd):
        return sd
    names = TEXT_ENCODER_FILES[kind]
    for folder in (path.parent / "text_encoders", path.parent):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(
        f"no {kind} text encoder: {path.name} does not bundle one and there is no {names[0]} in "
        f"{path.parent / 'text_encoders'}. Pass {kind}=PATH, or no_t5=True to run without T5.")


def check_model_name(path):
    """A path that does not exist must be a model name; say which names there are, and the nearest."""
    name = str(path)
    if Path(name).exists() or name in HUB_MODELS:
        return
    close = difflib.get_close_matches(name, list(HUB_MODELS), n=1)
    raise FileNotFoundError(f"no such file or folder: {name} (and not a model name: {', '.join(HUB_MODELS)}"
                            + (f"; did you mean {close[0]}?)" if close else ")"))


# --- a diffusers folder, or a Hub repository in that layout ------------------------------------------
def diffusers_sources(path_or_repo, *, no_t5: bool = False, token=None) -> tuple[dict[str, Source], Path]:
    """({component: Source}, the folder) of a diffusers folder or Hub repository (downloaded)."""
    root = diffusers_root(path_or_repo, no_t5=no_t5, token=token)
    paths = {"mmdit": root / "transformer", "vae": root / "vae", "clip_l": root / "text_encoder",
             "clip_g": root / "text_encoder_2"}
    if not no_t5 and (root / "text_encoder_3").is_dir():
        paths["t5xxl"] = root / "text_encoder_3"
    return open_sources(paths), root


def is_diffusers(name) -> bool:
    """Whether ``name`` is for ``diffusers_sources`` (a folder, or an owner/name Hub repository) rather
    than ``single_file_sources`` (a file or a model name). owner/name is a local path, mistyped, when a
    folder "owner" is here."""
    path = Path(str(name))
    hub_id = not path.exists() and not path.parent.is_dir() and looks_like_repo(str(name))
    return path.is_dir() or (str(name) not in HUB_MODELS and hub_id)


def diffusers_root(path_or_repo, *, no_t5: bool = False, token=None) -> Path:
    """The folder ``from_pretrained`` loads: a local diffusers folder (checked), or a Hub repository's
    files, downloaded (without T5 when ``no_t5``)."""
    root = Path(str(path_or_repo))
    if root.is_dir():
        check_diffusers_folder(root)
        return root
    if not looks_like_repo(str(path_or_repo)):
        raise FileNotFoundError(f"no such folder: {path_or_repo} (and it is not a Hub repository id such as "
                                "stabilityai/stable-diffusion-3-medium-diffusers)")
    patterns = ["model_index.json", "transformer/*", "vae/*", "text_encoder/*", "text_encoder_2/*",
                "tokenizer/*", "tokenizer_2/*"] + ([] if no_t5 else ["text_encoder_3/*", "tokenizer_3/*"])
    return hub_download(str(path_or_repo), token=token, allow_patterns=patterns)


def check_diffusers_folder(root: Path):
    """A folder must have diffusers' layout; say what it holds instead, and what to pass."""
    missing = [d for d in DIFFUSERS_FOLDERS if not (root / d).is_dir()]
    if not missing:
        return
    held = sorted(p.name + "/" * p.is_dir() for p in root.iterdir())
    single = [name for name in held if name.endswith(".safetensors")]
    what = "it is empty" if not held else f"it holds {', '.join(held[:5])}" + (", ..." if len(held) > 5 else "")
    hint = (f"pass the file itself ({root / single[0]})" if single else
            f"pass an official single file, a diffusers folder or one of {', '.join(HUB_MODELS)}")
    raise CheckpointError(f"{root} is not a diffusers SD3 folder: it has no {'/, '.join(missing)}/ ({what}); {hint}")


def looks_like_repo(name: str) -> bool:
    """A Hub repository id (owner/name), not a file name."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.endswith(".safetensors")


# --- the tokenizer ----------------------------------------------------------------------------------
def tokenizer_for(tokenizer, need_t5: bool, token=None) -> SD3Tokenizer:
    """An SD3Tokenizer from an instance, a diffusers folder, a T5 tokenizer folder or repo, or defaults."""
    if isinstance(tokenizer, SD3Tokenizer):
        return tokenizer
    clip, t5 = clip_tokenizer(), None
    root = Path(str(tokenizer)) if tokenizer is not None else None
    if root is not None and (root / "tokenizer").is_dir():          # a diffusers folder
        clip = load_tokenizer(root / "tokenizer", "clip")
        root = root / "tokenizer_3" if (root / "tokenizer_3").is_dir() else None
    if need_t5:
        if root is not None and root.is_dir():
            t5 = load_tokenizer(root)
        else:
            repo = str(tokenizer) if tokenizer is not None else HUB_T5_TOKENIZER
            t5 = load_tokenizer(hub_download(repo, token=token, allow_patterns=[
                "spiece.model", "tokenizer*.json", "special_tokens_map.json", "config.json"]))
    return SD3Tokenizer(clip, t5)


# --- the Hugging Face Hub ---------------------------------------------------------------------------
def _gated_message(repo: str) -> str:
    return (f"{repo} is a gated repository and this request was refused. To download it:\n"
            f"  1. log in at https://huggingface.co and accept the licence on https://huggingface.co/{repo}\n"
            "  2. create a read token at https://huggingface.co/settings/tokens\n"
            "  3. set it: export HF_TOKEN=hf_...  (or `huggingface-cli login`, or in a notebook\n"
            "     `from huggingface_hub import notebook_login; notebook_login()`)")


def hub_download(repo: str, filename: str | None = None, *, token=None, allow_patterns=None) -> Path:
    """Download one file (or, with ``allow_patterns``, a snapshot) from the Hub; a gated-repo refusal
    becomes a message that explains the licence and the token. Uses the Hub cache."""
    # huggingface_hub is imported at the first download: loading local files does not need its import time
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    token = token or os.environ.get("HF_TOKEN")
    what = f"{filename} from {repo}" if filename else repo
    try:
        if filename is None:
            return Path(snapshot_download(repo, allow_patterns=allow_patterns, token=token))
        return Path(hf_hub_download(repo, filename, token=token))
    except GatedRepoError as e:
        raise PermissionError(_gated_message(repo)) from e
    except RepositoryNotFoundError as e:                   # without a token, the Hub answers so for gated repos too
        login = "" if token else (" (or it is private or gated: without a token the Hub gives the same answer; "
                                  "set HF_TOKEN and accept its licence on its page)")
        raise FileNotFoundError(f"no repository {repo} on the Hugging Face Hub{login}; check the name") from e
    except LocalEntryNotFoundError as e:                   # offline (HF_HUB_OFFLINE=1 or no network), not cached
        raise ConnectionError(f"cannot download {what}: the Hugging Face Hub cannot be reached (offline, or "
                              "HF_HUB_OFFLINE=1) and it is not in the local cache; download it once online, "
                              "or pass a local path") from e
    except EntryNotFoundError as e:
        wanted = filename or "matching " + ", ".join(allow_patterns or ["*"])   # a snapshot: what it asked for
        raise FileNotFoundError(f"the Hub repository {repo} has no file {wanted}") from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise PermissionError(_gated_message(repo)) from e
        raise


def download(model: str = "sd3_medium", *, text_encoders=TEXT_ENCODERS, token=None) -> dict[str, Path]:
    """Download an official single file and its standalone text encoders -> {"model": path, "clip_l": ...}."""
    if model not in HUB_MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(HUB_MODELS)}")
    repo, filename = HUB_MODELS[model]
    paths = {"model": hub_download(repo, filename, token=token)}
    for kind in text_encoders:
        paths[kind] = hub_download(repo, HUB_TEXT_ENCODERS[kind], token=token)
    return paths
