"""The embedded tiny SD3: SD3's own MM-DiT at toy size, a small text encoder, and pixel space.

Nothing here re-implements SD3: the denoiser is ``sd3mini.MMDiT`` with a small ``MMDiTConfig``, trained
with ``sd3mini.flow`` and sampled with ``sd3mini.sample`` through ``SD3Pipeline``. What is new is the
text encoder (SD3's CLIP/T5 are 5 B parameters; this one is trained jointly, from scratch, on the
caption vocabulary) and ``PixelSpace``, the identity "autoencoder" used in place of the VAE.
"""

import json
import math
import warnings
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import describe_checkpoint, file_metadata, open_state_dict, state_dict_of
from ..checks import ArgumentError, check_cfg, check_choice, check_int, check_number, check_shift
from ..keys import CheckpointError
from ..loading import build
from ..mmdit import Mlp, MMDiT, MMDiTConfig
from ..pipeline import SD3Pipeline
from ..sampling import SAMPLERS
from .data import CELLS, COLOURS, IMAGE_SIZE, RELATIONS, SHAPES, SIZES

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
WORDS = sorted({"a", "in", "the"} | set(COLOURS) | set(SHAPES) | set(SIZES)
               | {w for cell in CELLS for w in cell.split()} | {w for rel in RELATIONS for w in rel.split()})
VOCAB = SPECIALS + WORDS
MAX_TOKENS = 16


class TextBlock(nn.Module):
    """A pre-LayerNorm transformer block; every token attends to every real (non-pad) token."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads                       # of width // heads channels each
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, 4 * width)

    def forward(self, x, keep):                  # x (B, L, W); keep (B, 1, 1, L) bool
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


class ToyTextEncoder(nn.Module):
    """Word-level tokens -> (per-token states (B, 16, W), pooled (B, W)), SD3's (context, y) in miniature.

    Like CLIP it is a transformer over ``<bos> words <eos> <pad>...``, and the pooled vector is the
    final state at ``<eos>``; unlike CLIP it is bidirectional, and it is trained together with the
    MM-DiT. The empty caption is the unconditional input of classifier-free guidance.
    """

    def __init__(self, width: int = 128, layers: int = 2, heads: int = 2):
        super().__init__()
        # Word and position vectors on the same scale, N(0, 1): with much smaller position vectors the
        # trained encoder came out order-blind ("red above blue" = "blue above red"; chapter 15).
        self.token_embedding = nn.Embedding(len(VOCAB), width)
        self.position_embedding = nn.Parameter(torch.randn(MAX_TOKENS, width))
        self.blocks = nn.ModuleList([TextBlock(width, heads) for _ in range(layers)])
        self.final_norm = nn.LayerNorm(width)
        self.config = dict(width=width, layers=layers, heads=heads)

    def tokenize(self, prompts: str | list[str], names: list[str] | None = None) -> torch.Tensor:
        """Prompts -> (B, 16) ids; unknown words become <unk> with a warning that names them. ``names``:
        what each text is, for the warnings ("prompt", "negative prompt"; default "prompt")."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        names = names or ["prompt"] * len(prompts)
        index = {w: i for i, w in enumerate(VOCAB) if w not in SPECIALS}   # "<eos>" typed is a word like any
        rows, unknown = [], set()
        for p, name in zip(prompts, names):
            words = p.lower().replace(",", " ").split()
            unknown |= {w for w in words if w not in index}
            if len(words) > MAX_TOKENS - 2:         # as the real encoders: truncate, and say what was dropped
                warnings.warn(f"{name} is longer than the tiny model's {MAX_TOKENS - 2} words and was truncated; "
                              f"dropped: {' '.join(words[MAX_TOKENS - 2:])!r}", stacklevel=3)
            ids = [1] + [index.get(w, 3) for w in words][: MAX_TOKENS - 2] + [2]
            rows.append(ids + [0] * (MAX_TOKENS - len(ids)))
        if unknown:
            warnings.warn(f"words outside the tiny model's vocabulary are ignored: {sorted(unknown)}. "
                          f"It knows: {' '.join(WORDS)}", stacklevel=3)
        return torch.tensor(rows, device=self.token_embedding.weight.device)

    def forward(self, tokens: torch.Tensor):
        keep = (tokens != 0)[:, None, None, :]
        x = self.token_embedding(tokens) + self.position_embedding[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x, keep)
        x = self.final_norm(x)
        return x, x[torch.arange(len(tokens), device=tokens.device), (tokens == 2).int().argmax(dim=1)]

    def encode(self, prompts: str | list[str], names: list[str] | None = None):
        """The pipeline's interface: prompts -> (context (B, 16, W), pooled (B, W))."""
        return self(self.tokenize(prompts, names))


ORDER_PAIR = ("a red circle above a blue square", "a blue square above a red circle")   # same words, other order


@torch.no_grad()
def same_word_cosines(encoder: ToyTextEncoder, captions=ORDER_PAIR, words=("red", "circle", "blue", "square")) -> dict:
    """Cosine between each word's state in ``captions[0]`` and the same word's state in ``captions[1]``,
    and between the pooled vectors ("pooled"). 1.0: to the MM-DiT the two word orders are the same caption."""
    ctx, pooled = encoder.encode(list(captions))                     # (2, 16, W), (2, W)
    where = [["<bos>"] + c.split() for c in captions]

    def cos(a, b):
        return F.cosine_similarity(a, b, dim=0).item()

    return {w: cos(ctx[0, where[0].index(w)], ctx[1, where[1].index(w)]) for w in words} | {"pooled": cos(*pooled)}


class PixelSpace(nn.Module):
    """The identity in place of the VAE: the tiny model denoises pixels directly (``downscale`` 1)."""

    downscale = 1

    def encode(self, image, generator=None):
        return image

    def decode(self, z):
        return z


def toy_mmdit_config(width: int = 128, depth: int = 4, patch: int = 4, text_width: int = 128,
                     image_size: int = 32, channels: int = 3, heads: int = 2) -> MMDiTConfig:
    """SD3's architecture at toy size: QK-norm (as SD3.5), a position grid for up to 64 x 64 images."""
    return MMDiTConfig(depth=depth, hidden_size=width, num_heads=heads, patch_size=patch,
                       in_channels=channels, pos_embed_max_size=2 * image_size // patch,
                       adm_in_channels=text_width, context_in_dim=text_width, qk_norm=True)


class ToySD3(nn.Module):
    """The trainable pair: text encoder + MM-DiT, of the sizes a ``recipe.Recipe`` ``r`` gives. forward ->
    the predicted velocity."""

    def __init__(self, r):
        super().__init__()
        self.text = ToyTextEncoder(width=r.text_width, layers=r.text_layers, heads=r.heads)
        self.mmdit = MMDiT(toy_mmdit_config(r.width, r.depth, r.patch, r.text_width, heads=r.heads)).initialize_weights()

    def forward(self, zt, sigma, tokens):
        """zt (B, 3, H, W) at noise levels sigma (B,), tokens (B, 16) -> the velocity (B, 3, H, W)."""
        context, pooled = self.text(tokens)
        return self.mmdit(zt, 1000 * sigma, y=pooled, context=context)


SHIPPED = "assets/toy_sd3.safetensors"


def shipped_path() -> Path:
    return Path(str(resources.files("sd3mini").joinpath(SHIPPED)))


def load_toy(path=None, device="cpu"):
    """(mmdit, text_encoder, metadata) from a toy checkpoint (default: the one shipped with sd3mini)."""
    path = Path(path) if path is not None else shipped_path()
    if not path.exists():
        raise FileNotFoundError(f"no tiny-model weights at {path}; train them with `python -m sd3mini train-toy`")
    meta = toy_metadata(path)
    sd = state_dict_of(path)
    mmdit_sd = {k[6:]: v for k, v in sd.items() if k.startswith("mmdit.")}
    text_sd = {k[5:]: v for k, v in sd.items() if k.startswith("text.")}
    mmdit_cfg = _check_mmdit_shapes(path, meta, mmdit_sd)     # from the header alone: nothing is allocated yet
    _check_text_shapes(path, meta, text_sd)
    _check_values(path, meta, mmdit_cfg)
    _check_size(path, mmdit_sd | text_sd)
    # Built on the CPU (the meta device's initializers import torch._dynamo: +1.3 s a run); ``build`` then
    # copies the file into it tensor by tensor, so the initial and the loaded weights never coexist.
    mmdit = build(lambda: MMDiT(mmdit_cfg), mmdit_sd,
                  what="tiny MM-DiT", device=device, dtype=torch.float32, meta=False)
    text = build(lambda: ToyTextEncoder(**_text_config(path, meta)), text_sd,
                 what="tiny text encoder", device=device, dtype=torch.float32, meta=False)
    return mmdit, text, meta


def _text_config(path, meta: dict) -> dict:
    """The text encoder's settings. Shim, dropped in sd3mini 0.2.0: files before 2026-12 also stored
    ``pool``, always "eos" (the only one now)."""

    config = dict(meta["text"])
    if config.pop("pool", "eos") != "eos":
        raise CheckpointError(f"{path}: its text encoder pools by the mean, which sd3mini no longer supports")
    return config


TOY_META_KEYS = ("mmdit", "text", "latent_scale", "latent_shift", "image_size", "defaults")


def toy_metadata(path) -> dict:
    """The ``sd3mini_toy`` metadata of a tiny-model checkpoint, or a CheckpointError that says what is wrong."""

    raw = file_metadata(path).get("sd3mini_toy")
    if raw is None:
        looks = describe_checkpoint(open_state_dict(path))
        raise CheckpointError(f"{path} is not a tiny-model checkpoint (no sd3mini_toy metadata); it looks like {looks}")
    if not isinstance(raw, str):                  # safetensors metadata maps strings to strings
        raise CheckpointError(f"{path}: its sd3mini_toy metadata is a JSON {type(raw).__name__}, not a string "
                              "holding JSON (as safetensors metadata must be)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its sd3mini_toy metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its sd3mini_toy metadata is a JSON {type(meta).__name__}, not an object")
    missing = [k for k in TOY_META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: its sd3mini_toy metadata lacks {', '.join(missing)}")
    return meta


def _check_mmdit_shapes(path, meta: dict, sd: dict) -> MMDiTConfig:
    """The MM-DiT the metadata describes must be the one the tensors hold (checked on their shapes, so a
    small file whose metadata describes a huge model is refused before anything is allocated)."""

    try:
        described = MMDiTConfig(**{**meta["mmdit"], "x_block_self_attn_layers":
                                   tuple(meta["mmdit"].get("x_block_self_attn_layers", ()))})
        held = MMDiTConfig.from_state_dict(sd)
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        described = meta["mmdit"] if isinstance(meta["mmdit"], dict) else {}
        size = ", ".join(f"{k} {described[k]}" for k in ("depth", "hidden_size") if k in described)
        raise CheckpointError(f"{path}: its metadata describes an MM-DiT ({size or 'unreadable'}) that its "
                              f"tensors do not hold ({str(e).strip(chr(34) + chr(39))})") from None
    if described != held:
        diff = ", ".join(f"{k} {getattr(described, k)} (tensors: {getattr(held, k)})"
                         for k in described.__dataclass_fields__ if getattr(described, k) != getattr(held, k))
        raise CheckpointError(f"{path}: its metadata does not match its tensors: {diff}")
    qkv = (3 * held.hidden_size, held.hidden_size)
    for i in range(held.depth):                   # every block is there, at full size
        key = f"joint_blocks.{i}.x_block.attn.qkv.weight"
        if key not in sd or tuple(sd[key].shape) != qkv:
            raise CheckpointError(f"{path}: joint block {i} is missing or has the wrong size ({key})")
    return described


def _check_text_shapes(path, meta: dict, sd: dict):

    text = meta["text"]
    try:
        width, layers, heads = text["width"], text["layers"], text.get("heads", 2)
        emb = tuple(sd["token_embedding.weight"].shape)
        blocks = [tuple(sd[f"blocks.{i}.qkv.weight"].shape) for i in range(layers)]
        ok = emb == (len(VOCAB), width) and blocks == [(3 * width, width)] * layers and f"blocks.{layers}.qkv.weight" \
            not in sd and width % heads == 0 and text.get("pool", "eos") in ("eos", "mean")
    except (TypeError, KeyError, ZeroDivisionError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: its metadata describes a text encoder ({text!r:.120}) that its tensors "
                              "do not hold")


# The shipped model has 2.7 M parameters; train-toy refuses recipes above this, and load_toy files above
# it, so that a small file cannot make sd3mini allocate gigabytes (200 MB in float32 at the cap).
TOY_MAX_PARAMS = 50_000_000


def _check_size(path, sd: dict):

    n = sum(math.prod(t.shape) for t in sd.values())
    if n > TOY_MAX_PARAMS:
        raise CheckpointError(f"{path} holds a tiny model of {n / 1e6:,.1f} M parameters; sd3mini loads tiny models "
                              f"of at most {TOY_MAX_PARAMS / 1e6:.0f} M (the shipped one has 2.7 M)")


def _check_values(path, meta: dict, cfg: MMDiTConfig):
    """Every value the pipeline uses, each with a message that names the file: shapes are not enough."""

    text, defaults = meta["text"], meta["defaults"]
    try:
        if not isinstance(defaults, dict):
            raise ArgumentError(f"defaults must be an object (steps, cfg_scale, shift, sampler), got {defaults!r:.60}")
        missing = [k for k in ("steps", "cfg_scale", "shift", "sampler") if k not in defaults]
        if missing:
            raise ArgumentError(f"defaults lacks {', '.join(missing)}")
        check_int("defaults steps", defaults["steps"], minimum=1)
        check_cfg("defaults cfg_scale", defaults["cfg_scale"])
        check_shift("defaults shift", defaults["shift"])
        check_choice("defaults sampler", defaults["sampler"], SAMPLERS)
        for name in ("width", "layers", "heads"):
            check_int(f"text {name}", text.get(name, 2), minimum=1)
        if set(text) - {"width", "layers", "heads", "pool"}:
            raise ArgumentError(f"text has unknown settings {sorted(set(text) - {'width', 'layers', 'heads', 'pool'})}")
        check_number("latent_scale", meta["latent_scale"], above=0)      # 0 would divide the output by zero
        check_number("latent_shift", meta["latent_shift"])
        check_int("image_size", meta["image_size"], minimum=cfg.patch_size, maximum=cfg.pos_embed_max_size
                  * cfg.patch_size)
        if meta["image_size"] % cfg.patch_size:
            raise ArgumentError(f"image_size {meta['image_size']} is not a multiple of the patch size {cfg.patch_size}")
    except ArgumentError as e:
        raise CheckpointError(f"{path}: its sd3mini_toy metadata is invalid: {e}") from None


# The tiny model runs ~100 model evaluations a second on one core: below this many, no progress bar.
QUIET_EVALUATIONS = 2000


def pipeline_of(mmdit, text, latent_scale: float, latent_shift: float, defaults: dict, device="cpu",
                image_size: int = IMAGE_SIZE):
    """An ``SD3Pipeline`` around a tiny MM-DiT and its text encoder: loaded, or in the middle of training."""

    pipe = SD3Pipeline(mmdit, PixelSpace(), text, model="toy", device=device, latent_scale=latent_scale,
                       latent_shift=latent_shift, defaults=defaults, default_size=image_size)
    pipe.upscale, pipe.quiet_evaluations = 4, QUIET_EVALUATIONS     # 32 x 32 images; fast
    return pipe


def toy_pipeline(path=None, device="cpu"):
    """An ``SD3Pipeline`` of the tiny model: text -> 32 x 32 image on a CPU in a fraction of a second."""
    mmdit, text, meta = load_toy(path, device)
    return pipeline_of(mmdit, text, meta["latent_scale"], meta["latent_shift"], meta["defaults"], device,
                       meta["image_size"])
