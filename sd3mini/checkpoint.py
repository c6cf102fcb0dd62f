"""Reading and writing checkpoint files: safetensors only, one tensor at a time.

``open_state_dict(path)`` reads only the header: it returns ``{key: LazyTensor}``, where each
LazyTensor knows its shape and dtype and reads its data when ``load()`` is called. Loaders build
the model on the meta device and fill it tensor by tensor, so the host never holds two copies.
"""

import contextlib
import json
import os
import re
import sys
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .keys import CheckpointError  # noqa: F401  (raised here; sd3mini.checkpoint.CheckpointError)

try:
    import fcntl
except ImportError:                                   # Windows: no flock, folders are not locked
    fcntl = None

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class LazyTensor:
    """A tensor not read yet: ``shape`` and ``dtype`` are known, ``load()`` reads (or computes) it."""

    def __init__(self, shape, dtype, load):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self._load = load

    def load(self) -> torch.Tensor:
        return self._load()

    def __repr__(self):
        return f"LazyTensor(shape={tuple(self.shape)}, dtype={self.dtype})"


def materialize(t) -> torch.Tensor:
    """The tensor itself: a LazyTensor is read, anything else is returned as it is."""
    return t.load() if isinstance(t, LazyTensor) else t


def read_header(path) -> dict:
    """The JSON header of a safetensors file, after checking that the file is one and is complete."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        # A safetensors file starts with its header's length (8 bytes, little-endian), then "{".
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        plausible = 1 < n <= min(size - 8, 100_000_000) and f.read(1) == b"{"
        if not plausible:
            if head[:2] == b"PK" or head[:1] == b"\x80":
                raise CheckpointError(
                    f"{path} is a PyTorch pickle (.ckpt/.pt/.bin), not safetensors. sd3mini reads only .safetensors "
                    "files, because unpickling can run arbitrary code. Download the .safetensors version of the model.")
            if head[:4] == b"GGUF":
                raise CheckpointError(f"{path} is a GGUF (quantized) file; sd3mini reads only .safetensors files.")
            raise CheckpointError(f"{path} is not a safetensors file ({size} bytes; no valid header).")
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header: {e}).") from None
    end = max((_data_end(path, k, v) for k, v in _entries(path, header)), default=0)
    if size < 8 + n + end:
        advice = ("The download was probably interrupted; delete the file and download it again." if
                  "sd3mini_train" not in (header.get("__metadata__") or {}) else
                  "It is a train-toy training state cut short (sd3mini writes them whole: a copy or a disk that "
                  "failed?); resume from an earlier copy of it, or start the run over with --force.")
        raise CheckpointError(f"{path} is truncated: it has {size:,} bytes but its header describes "
                              f"{8 + n + end:,}. {advice}")
    return header


def _entries(path, header) -> list:
    """The header's (key, entry) pairs of tensors, after checking it is a JSON object."""
    for what, value in (("header", header), ("__metadata__", header.get("__metadata__") or {} if
                                               isinstance(header, dict) else {})):
        if not isinstance(value, dict):
            raise CheckpointError(f"{path} is not a safetensors file: its {what} is a JSON {type(value).__name__}, "
                                  "not an object")
    return [(k, v) for k, v in header.items() if k != "__metadata__"]


def _data_end(path, key: str, entry) -> int:
    """Where a tensor's data ends; a CheckpointError naming the file, the tensor and the field if malformed."""
    ok = isinstance(entry, dict) and all(f in entry for f in ("dtype", "shape", "data_offsets"))
    offsets, shape = (entry.get("data_offsets"), entry.get("shape")) if ok else (None, None)
    ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets) \
        and offsets[0] <= offsets[1] and isinstance(shape, list) and all(_count(d) for d in shape)
    if not ok:
        raise CheckpointError(f"{path} has a malformed header: tensor {key!r} needs dtype, shape (a list of sizes) "
                              f"and data_offsets (begin <= end), got {entry!r:.120}")
    return offsets[1]


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def safetensors_files(path: Path) -> list[Path]:
    """A file, or the safetensors weights in a folder (sharded via *.index.json, or a single file)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or folder: {path}")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    indexes = [p for p in indexes if ".fp16." not in p.name] or indexes
    if indexes:
        return [path / s for s in _shards(indexes[0])]
    files = sorted(path.glob("*.safetensors"))
    plain = [p for p in files if p.name.count(".") == 1]          # prefer "model.safetensors" to variants
    if len(plain) > 1:                                             # unrelated files: which one is meant?
        raise CheckpointError(f"{path} holds several .safetensors files ({', '.join(p.name for p in plain[:4])}"
                              f"{', ...' if len(plain) > 4 else ''}) and no index; pass one of them")
    if plain or files:
        return (plain or files)[:1]
    if any(path.glob("*.bin")) or any(path.glob("*.ckpt")) or any(path.glob("*.pt")):
        raise CheckpointError(f"{path} holds only PyTorch pickles; sd3mini reads only .safetensors files.")
    parts = sorted(d.name + "/" for d in path.iterdir() if d.is_dir() and any(d.glob("*.safetensors")))
    if parts:
        raise CheckpointError(f"no .safetensors file in {path} itself; its folders {', '.join(parts)} hold some "
                              "(a diffusers folder?): pass one of them")
    raise CheckpointError(f"no .safetensors file in {path}")


def _shards(index: Path) -> list[str]:
    """The shard files a ``*.safetensors.index.json`` names, or a CheckpointError that names the file."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a safetensors index: it needs a JSON object with a "
                              f"\"weight_map\" of tensor name -> file ({type(e).__name__}: {e})") from None
    bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s]
    if bad:
        raise CheckpointError(f"{index}: its weight_map names {bad[0]!r}, not a file beside it")
    return shards


def open_state_dict(path) -> dict[str, LazyTensor]:
    """``{key: LazyTensor}`` for a safetensors file or a folder of them; reads headers only."""
    sd = {}
    for file in safetensors_files(Path(path)):
        header = read_header(file)
        with open(file, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")   # where the data begin
        handle = None
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = _DTYPES.get(info["dtype"], info["dtype"])
            if isinstance(dtype, torch.dtype) and sys.byteorder == "little":
                begin, end = info["data_offsets"]
                load = partial(_read, file, start + begin, end - begin, info["shape"],
                               dtype)
            else:   # a dtype torch has no name for (U16, ...), or a big-endian host
                handle = handle or safe_open(str(file), framework="pt", device="cpu")
                load = partial(handle.get_tensor, key)
            sd[key] = LazyTensor(info["shape"], dtype, load)
    return sd


def _read(file: Path, begin: int, nbytes: int, shape, dtype: torch.dtype):
    """One tensor, read with plain reads into memory of its own (torch's allocator:
    64-byte aligned).

    Not through a memory map, as safetensors' ``get_tensor`` does: every page of a map
    that a loader touches stays in the process's RSS until the map is closed, after the
    whole model is read, so ``offload="sequential"`` held each component twice and a load
    onto a GPU held the whole file in host RSS (measured: benchmarks/RESULTS.md). A read
    leaves the file in the page cache, which the kernel reclaims and which is not RSS.
    """
    raw = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(raw.numpy()).cast("B")
    with open(file, "rb", buffering=0) as f:
        f.seek(begin)
        done = 0
        while done < nbytes:                # one read() returns at most ~2 GB on Linux
            n = f.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{file} is truncated: a tensor runs past its end")
            done += n
    return raw.view(dtype).reshape(shape)


def file_metadata(path) -> dict:
    return read_header(path).get("__metadata__", {}) or {}


def state_dict_of(src) -> dict:
    """A path (file or folder) -> lazy state dict; a dict is returned as it is."""
    if isinstance(src, dict):               # first: a sources.Source is a state dict that has a path
        return src
    if isinstance(src, (str, os.PathLike)):
        return open_state_dict(src)
    raise TypeError(f"expected a path or a state dict, got {type(src).__name__}")


_UNET = r"model\.diffusion_model\.input_blocks\.|input_blocks\.\d+\."
_SDXL = r"conditioner\.embedders\.1\.|(model\.diffusion_model\.)?label_emb\."
# What a file holds, for error messages: from each group, the first description whose patterns all
# match the start of some key.
_DESCRIPTIONS = [
    [((r"model\.diffusion_model\.joint_blocks\.",), "an SD3 MMDiT under 'model.diffusion_model.'"),
     ((r"joint_blocks\.",), "an SD3 MMDiT without prefix"),
     ((r"(model\.diffusion_model\.)?double_blocks\.",), "a FLUX transformer ('double_blocks.*'), not SD3"),
     ((r"transformer_blocks\.\d+\.attn\.add_q_proj", r"pos_embed\.proj"),
      "a diffusers SD3Transformer2DModel (the 'transformer/' folder of a diffusers repo)"),
     ((_UNET, _SDXL), "an SDXL UNet ('input_blocks.*'), not SD3"),
     ((_UNET,), "an SD 1.x/2.x UNet ('input_blocks.*'), not SD3"),
     ((r"down_blocks\.\d+\.attentions",), "a diffusers UNet, not SD3"),
     ((r"conv_in\.weight", r"time_embedding\."), "a diffusers UNet, not SD3")],
    [((r"ema\.mmdit\.joint_blocks\.", r"opt\."),
      "a train-toy training state (model, EMA and optimizer; its toy_sd3.safetensors has the weights)"),
     ((r"mmdit\.joint_blocks\.", r"text\.token_embedding\."), "a tiny-model checkpoint (sd3mini.toy)")],
    [((r"(first_stage_model\.)?encoder\.down\.\d+\.block",), "an LDM-layout VAE"),
     ((r"encoder\.down_blocks\.\d+\.resnets",), "a diffusers VAE (AutoencoderKL)")],
    *([((rf"text_encoders\.{name}\.",), f"a bundled {name} text encoder")] for name in ("clip_l", "clip_g", "t5xxl")),
    [((r"text_model\.encoder\.layers\.",), "a CLIP text encoder")],
    [((r"encoder\.block\.\d+\.layer\.0\.SelfAttention",), "a T5 text encoder")],
]


def describe_checkpoint(keys) -> str:
    """A short guess of what a set of keys is, for error messages."""
    keys = list(keys)
    has = lambda pattern: any(re.match(pattern, k) for k in keys)  # noqa: E731
    found = (next((text for patterns, text in group if all(map(has, patterns))), None) for group in _DESCRIPTIONS)
    parts = [text for text in found if text]
    if not parts:
        parts.append(f"an unrecognised model ({len(keys)} keys, e.g. {', '.join(sorted(keys)[:3])})")
    return "; ".join(parts)


def save_state_dict(sd: dict[str, torch.Tensor], path, metadata: dict | None = None):
    """Write a safetensors file. Tensors must not share storage (pass tied weights once).

    The file is written under a temporary name and then renamed, so ``path`` is never half-written
    (whatever the safetensors version does)."""
    tensors = {k: v.detach().contiguous() for k, v in sd.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


@contextlib.contextmanager
def written_whole(path):
    """A new, empty file beside ``path`` to write: renamed to ``path`` when the block ends, removed if it
    fails. Its name is unique, so two writers of one ``path`` never write into each other's file, and it
    ends with the usual mode, 0666 less the umask (safetensors creates its files 0600)."""
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # the kernel applies the umask
            break
        except FileExistsError:
            continue
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class FolderLock:
    """An exclusive lock on a folder while held: flock on the folder itself, so nothing is written in it,
    and the kernel releases it when the process ends, however it ends (no stale lock file to delete).
    ``acquire()`` is False while another process holds it (always True where there is no flock)."""

    def __init__(self, folder):
        self.folder, self.fd = Path(folder), None

    def acquire(self) -> bool:
        if self.fd is not None or fcntl is None:
            return True
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self):
        if self.fd is not None:
            os.close(self.fd)                         # closing the descriptor releases the lock
            self.fd = None
