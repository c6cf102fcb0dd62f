"""Command line: ``python -m sd3mini {info, generate} ...``."""

import argparse
import contextlib
import math
import os
import random
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .checkpoint import (CheckpointError, describe_checkpoint, file_metadata, open_state_dict, safetensors_files,
                         state_dict_of, written_whole)
from .checks import ArgumentError, Parser, check_cfg, check_denoise, check_int, check_seed, check_shift, output_size
from .loading import clip_shape, mmdit_state_dict, text_encoder_state_dict, vae_state_dict
from .mmdit import MMDiT, MMDiTConfig
from .pipeline import OFFLOAD_MODES, SD3Pipeline, detect_model, image_grid
from .sampling import SAMPLERS
from .sources import DIFFUSERS_FOLDERS, HUB_MODELS, diffusers_root, is_diffusers
from .text import CLIPTextEncoder, T5TextEncoder
from .toy.model import toy_pipeline
from .toy.train import main as train_main
from .vae import SDVAE, VAEConfig, rgb_image

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _meta_params(cls, config) -> int:
    """Parameters of ``cls(config)``, built on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return sum(p.numel() for p in cls(config).parameters())


def _mmdit_lines(sd, path) -> list[str]:
    cfg = MMDiTConfig.from_state_dict(mmdit_state_dict(sd))
    n = _meta_params(MMDiT, cfg)
    grid = cfg.pos_embed_max_size
    return [f"  MMDiT: {detect_model(cfg, path)}, {n / 1e9:.3f} B parameters (+ the pos_embed buffer)",
            f"    depth {cfg.depth}, hidden {cfg.hidden_size}, heads {cfg.num_heads}, patch {cfg.patch_size}, "
            f"position grid {grid}x{grid} (max {grid * cfg.patch_size * 8} px), qk_norm {cfg.qk_norm}, "
            f"dual attention in blocks {list(cfg.x_block_self_attn_layers) or 'none'}",
            f"    context {cfg.context_in_dim}, pooled {cfg.adm_in_channels}, latent channels {cfg.in_channels}"]


def _vae_lines(sd, path) -> list[str]:
    vcfg = VAEConfig.from_state_dict(vae_state_dict(sd))
    n = _meta_params(SDVAE, vcfg)
    return [f"  VAE: {n / 1e6:.1f} M parameters, ch {vcfg.ch}, ch_mult {list(vcfg.ch_mult)}, z {vcfg.z_channels}"]


def _text_lines(sd) -> list[str]:
    bundled = [k for k in ("clip_l", "clip_g", "t5xxl") if any(key.startswith(f"text_encoders.{k}.") for key in sd)]
    if not bundled and "text_model.embeddings.token_embedding.weight" in sd:    # a standalone CLIP file
        bundled = [clip_shape(sd)["kind"] or "clip"]      # another width than CLIP-L's or CLIP-G's: either
    if not bundled and "encoder.block.0.layer.0.SelfAttention.q.weight" in sd:
        bundled = ["t5xxl"]
    lines = []
    for kind in bundled:
        tsd = text_encoder_state_dict(sd, "clip_g" if kind == "clip" else kind)   # (clip_g: nothing added)
        if kind == "t5xxl":
            c = T5TextEncoder.config_from_state_dict(tsd)
            desc = f"{c.num_layers} layers, width {c.d_model}, {c.num_heads} heads, ff {c.d_ff}"
        else:
            c = CLIPTextEncoder.config_from_state_dict(tsd, kind)
            desc = f"{c.num_hidden_layers} layers, width {c.hidden_size}" + (
                " (neither CLIP-L's 768 nor CLIP-G's 1280)" if kind == "clip" else "")
        n = sum(math.prod(t.shape) for k, t in tsd.items() if k != "encoder.embed_tokens.weight")
        lines.append(f"  text encoder {kind}: {n / 1e6:,.1f} M parameters, {desc}")
    return lines


def info(path: str) -> str:
    """Describe a checkpoint from its header alone: detected model, configuration, parameters, dtypes.
    A diffusers folder: each of its components."""
    root = Path(path)
    if root.is_dir() and all((root / d).is_dir() for d in DIFFUSERS_FOLDERS):
        parts = sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob("*.safetensors")))
        return "\n".join([f"{path}: a diffusers folder"] + [info(str(d)) for d in parts])
    sd = open_state_dict(path)
    total = sum(math.prod(t.shape) for t in sd.values())
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in sd.values())
    files = "" if root.is_file() else f" ({', '.join(f.name for f in safetensors_files(root))})"
    lines = [f"{path}{files}", f"  {len(sd)} tensors, {total / 1e6:,.1f} M values; dtypes: "
             + ", ".join(f"{d} ({n})" for d, n in dtypes.most_common()),
             f"  contents: {describe_checkpoint(sd)}"]
    for part in (_mmdit_lines, _vae_lines):          # each part that the file holds
        try:
            lines += part(sd, path)
        except (CheckpointError, KeyError):
            pass
    return "\n".join(lines + _text_lines(sd))


def load_pipeline(args, init=None):
    """The pipeline ``generate`` runs: the shipped tiny model when no --ckpt is given. For an SD3 checkpoint,
    the options and the sizes its header settles are checked before anything is loaded."""
    ckpt = Path(args.ckpt) if args.ckpt is not None else None
    meta = file_metadata(ckpt) if ckpt is not None and ckpt.is_file() else {}
    if ckpt is None or "sd3mini_toy" in meta:
        check_toy_options(args)
        return toy_pipeline(args.ckpt, device=args.device or "cpu")
    if "sd3mini_train" in meta:
        raise ArgumentError(f"--ckpt {ckpt} is a train-toy training state (model, EMA and optimizer); generate "
                            f"from the weights it exported: --ckpt {ckpt.parent / 'toy_sd3.safetensors'}")
    kwargs = dict(device=args.device, dtype=DTYPES.get(args.dtype), offload=args.offload, no_t5=args.no_t5)
    diffusers = is_diffusers(args.ckpt)
    check_sd3_options(args, diffusers)
    if diffusers:
        root = diffusers_root(args.ckpt, no_t5=args.no_t5)              # a Hub repository is downloaded here
        check_size_from_header(args, init, root / "transformer", root / "vae")
        return SD3Pipeline.from_pretrained(root, **kwargs)
    check_size_from_header(args, init, args.ckpt, args.ckpt)
    return SD3Pipeline.from_single_file(args.ckpt, clip_l=args.clip_l, clip_g=args.clip_g, t5xxl=args.t5xxl,
                                        tokenizer=args.tokenizer, **kwargs)


def check_sd3_options(args, diffusers: bool):
    """Refuse, never ignore, the options that an SD3 checkpoint of this kind would not use."""
    given = [f"--{name.replace('_', '-')}" for name in ("clip_l", "clip_g", "t5xxl", "tokenizer")
             if getattr(args, name) is not None]
    if diffusers and given:
        raise ArgumentError(f"{', '.join(given)} do{'es' * (len(given) == 1)} not apply to a diffusers folder or "
                            "Hub repository: it has its own text encoders and tokenizers (pass an official single "
                            "file as --ckpt to choose them)")
    if args.no_t5 and args.t5xxl is not None:
        raise ArgumentError("--t5xxl and --no-t5 contradict each other: --no-t5 runs without T5; leave out one")
    if args.no_t5 and args.tokenizer is not None and not (Path(args.tokenizer) / "tokenizer").is_dir():
        raise ArgumentError("--tokenizer (the T5 tokenizer) does not apply with --no-t5, which runs without T5")


# The official models' MM-DiTs (in their Hub files): their size rules, before a download.
def _hub_configs():
    return {"sd3_medium": MMDiTConfig.sd3_medium(), "sd3.5_large": MMDiTConfig.sd3_5_large(),
            "sd3.5_large_turbo": MMDiTConfig.sd3_5_large(), "sd3.5_medium": MMDiTConfig.sd3_5_medium()}


def check_size_from_header(args, init, mmdit_src, vae_src):
    """The image and picture sizes, from the MM-DiT's and the VAE's headers (or the official model's
    configuration, by name), before anything is loaded: the same rules as ``SD3Pipeline.output_size``."""
    downscale = 8                                      # SD3's VAE
    if str(mmdit_src) in HUB_MODELS and not Path(str(mmdit_src)).exists():
        config = _hub_configs()[str(mmdit_src)]
    else:
        try:
            config = MMDiTConfig.from_state_dict(mmdit_state_dict(state_dict_of(mmdit_src)))
            downscale = 2 ** (len(VAEConfig.from_state_dict(vae_state_dict(state_dict_of(vae_src))).ch_mult) - 1)
        except (CheckpointError, KeyError, OSError):
            return                                     # not SD3 as it should be: the loader says what it is
    pixels = config.patch_size * downscale
    max_size = config.pos_embed_max_size * pixels
    width, height = output_size(args.width, args.height, None if init is None else init.size, multiple=pixels,
                                max_size=max_size, default=min(1024, max_size))
    picture_size(args, width, height, args.upscale or 1)


# The largest picture generate writes, per side: WebP's limit, and 0.8 GB as 8-bit RGB.
MAX_PICTURE = 16383


def picture_size(args, width: int, height: int, upscale: int) -> tuple[int, int]:
    """The saved picture's (width, height): --grid images with 2-pixel white lines, --upscale times."""
    side = lambda v: args.grid * v * upscale + (args.grid - 1) * 2 * upscale  # noqa: E731
    size = side(width), side(height)
    if max(size) > MAX_PICTURE:
        raise ArgumentError(f"the picture would be {size[0]}x{size[1]} pixels (--grid {args.grid} of {width}x{height}"
                            f", shown {upscale}x); the most generate writes is {MAX_PICTURE} a side: lower --grid "
                            "or --upscale")
    return size


def check_toy_options(args):
    """Refuse, never ignore, the options that do not apply to the tiny model."""
    given = [(f"--{name.replace('_', '-')}", "it has one text encoder of its own")
             for name in ("clip_l", "clip_g", "t5xxl", "tokenizer") if getattr(args, name) is not None]
    given += [("--no-t5", "it has no T5")] * args.no_t5
    if args.dtype not in (None, "fp32"):
        given.append((f"--dtype {args.dtype}", "it runs in float32"))
    if args.offload != "none":
        given.append((f"--offload {args.offload}", "it is a few MB"))
    if args.slg:
        given.append(("--slg", "the reference's skip-layer guidance skips blocks 7-9 of SD3.5-medium, and the "
                               "tiny model has 4 (sd3mini.sample(slg=...) takes any blocks)"))
    if given:
        raise ArgumentError("; ".join(f"{option} does not apply to the tiny model: {why}" for option, why in given)
                            + ". Use it with --ckpt and an SD3 checkpoint")


def check_output(path: Path, force: bool):
    """The output can be written, before anything is sampled: an existing, writable folder, an image
    extension PIL can write, not a folder itself, and not an existing file unless --force."""
    if path.is_dir():
        raise ArgumentError(f"--output {path} is a folder; give a file name such as {path / 'out.png'}")
    if not path.parent.is_dir():
        raise ArgumentError(f"--output {path}: the folder {path.parent} does not exist")
    Image.init()                                       # every plugin: its extensions and its writer
    kind = Image.registered_extensions().get(path.suffix.lower())
    if kind is None:
        raise ArgumentError(f"--output {path}: unknown image extension {path.suffix or '(none)'!r}; use .png, "
                            ".jpg or .webp")
    if kind not in Image.SAVE:
        raise ArgumentError(f"--output {path}: PIL reads {path.suffix} ({kind}) images but cannot write them; use "
                            ".png, .jpg or .webp")
    if path.exists() and not force:
        raise ArgumentError(f"--output {path} exists; pass --force to overwrite it, or choose another name")
    try:                                               # a probe, not os.access: root passes that on /sys
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ArgumentError(f"--output {path}: cannot write in {path.parent} ({e.strerror})") from None


def check_generate_args(args):
    """Every option of ``generate`` that can be checked without the model, before it is loaded."""
    for name in ("width", "height", "steps", "upscale"):
        if getattr(args, name) is not None:
            check_int(f"--{name}", getattr(args, name), minimum=1)
    check_int("--grid", args.grid, minimum=1)
    if args.cfg is not None:
        check_cfg("--cfg", args.cfg)
    if args.shift is not None:
        check_shift("--shift", args.shift)
    if args.seed is not None:
        check_seed(args.seed, args.grid**2, name="--seed")
    check_denoise(args.denoise, args.init_image is not None, name="--denoise", init="--init-image")
    if args.init_image is not None and not Path(args.init_image).is_file():
        raise ArgumentError(f"--init-image {args.init_image}: no such file")
    check_output(Path(args.output), args.force)


def open_image(path):
    """The --init-image as 8-bit RGB (16-bit and float images scaled, not clipped)."""
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ArgumentError(f"--init-image {path} is not an image that PIL can read ({e})") from None
    return rgb_image(image, f"--init-image {path}")


# Images per batch in a grid: as many as fit in four 1024 x 1024 images (what SD3 handles at once), at most 64.
GRID_BATCH_PIXELS, GRID_BATCH_MAX = 4 * 1024 * 1024, 64


def grid_batches(n: int, pixels: int) -> list[tuple[int, int]]:
    """(first, count) of each batch of an ``n``-image grid: memory does not grow with n. The batches are
    even (64 + 1 would be 33 + 32): a batch's size changes a CPU kernel's rounding, and a grid drawn in
    batches of 8 or more came out byte-identical to one batch (a batch of 1 did not)."""
    per = max(1, min(GRID_BATCH_MAX, GRID_BATCH_PIXELS // pixels))
    batches = -(-n // per)
    counts = [n // batches + (i < n % batches) for i in range(batches)]
    return [(sum(counts[:i]), c) for i, c in enumerate(counts)]


def generate(args) -> Path:
    check_generate_args(args)
    init = open_image(args.init_image) if args.init_image else None
    pipe = load_pipeline(args, init)
    n = args.grid**2
    width, height = pipe.output_size(args.width, args.height, init)
    upscale = args.upscale or pipe.upscale
    picture = Image.new("RGB", picture_size(args, width, height, upscale), "white")   # white lines between images
    steps = args.steps if args.steps is not None else pipe.defaults["steps"]
    long_run = n * steps >= pipe.quiet_evaluations
    seed = args.seed if args.seed is not None else random.randrange(2**31)           # image i: seed + i
    for first, count in grid_batches(n, width * height):
        images = pipe([args.prompt] * count, args.negative, width=args.width, height=args.height, steps=args.steps,
                      cfg_scale=args.cfg, shift=args.shift, sampler=args.sampler, seed=seed + first,
                      init_image=init, denoise=args.denoise, slg=True if args.slg else None, progress=long_run)
        image_grid(images, args.grid, upscale=upscale, gap=2 * upscale, canvas=picture, first=first)
        if first == 0:
            parameters = images[0].info["parameters"]
    out = Path(args.output)
    save_picture(picture, out, parameters + (f"; grid {args.grid}x{args.grid}, seeds {seed}..{seed + n - 1}"
                                             if n > 1 else ""))
    size = f"{width}x{height}" + (f", shown {upscale}x" if upscale > 1 else "")
    print(f"wrote {out}: {n} image{'s' * (n > 1)} of {size} ({pipe.model} model, seed {seed})")
    return out


def save_picture(picture, out: Path, parameters: str):
    """Written whole under a unique temporary name, then renamed: never half an image, even with two runs
    writing the same file. The parameters go in a PNG text chunk, or for JPEG and WebP in the EXIF
    UserComment (UTF-16, as other tools write it)."""
    kind = Image.registered_extensions()[out.suffix.lower()]
    options = {}
    if kind in ("JPEG", "WEBP"):
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + parameters.encode("utf-16-be")   # Exif IFD: UserComment
        options["exif"] = exif
    else:
        options["pnginfo"] = PngImagePlugin.PngInfo()
        options["pnginfo"].add_text("parameters", parameters)
    with written_whole(out) as tmp:
        picture.save(tmp, format=kind, **options)


EPILOG = """Errors print one line, "error: ...", and exit with 2 for a bad option (usage) or 1 when a run fails
(a file that cannot be loaded, the Hub, numerics); --debug shows the traceback before it."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m sd3mini", description=__doc__, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    sub.add_parser("train-toy", help="train the tiny SD3 from scratch (see: train-toy --help)")

    p = sub.add_parser("info", help="describe a checkpoint (reads only its header)")
    p.add_argument("file")

    p = sub.add_parser("generate", help="text (or image) to image", epilog=EPILOG)
    p.add_argument("prompt")
    p.add_argument("--ckpt", help="official single file, diffusers folder, Hub repository (owner/name), or "
                                  "sd3_medium / sd3.5_large / ... (default: the tiny model shipped with sd3mini)")
    p.add_argument("--negative", default="")
    p.add_argument("--clip-l"), p.add_argument("--clip-g"), p.add_argument("--t5xxl")
    p.add_argument("--tokenizer", help="T5 tokenizer folder or Hub repo (default google/t5-v1_1-xxl)")
    p.add_argument("--no-t5", action="store_true", help="run without T5-XXL (zeros in its place)")
    p.add_argument("--width", type=int), p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int), p.add_argument("--cfg", type=float), p.add_argument("--shift", type=float)
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--seed", type=int)
    p.add_argument("--init-image"), p.add_argument("--denoise", type=float, help="with --init-image (default 0.8)")
    p.add_argument("--slg", action="store_true", help="skip-layer guidance (SD3.5-medium)")
    p.add_argument("--device"), p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--offload", choices=OFFLOAD_MODES, default="none",
                   help="none: all on the GPU; model: each component visits it; sequential: each is read from its "
                        "file onto the GPU for its stage (a 16 GB T4)")
    p.add_argument("--grid", type=int, default=1, help="an N x N grid of images, seeds SEED ... SEED + N*N - 1")
    p.add_argument("--upscale", type=int, help="enlarge the saved picture (nearest neighbour); default 4 for the tiny model")
    p.add_argument("-o", "--output", default="out.png", help="the picture to write (.png, .jpg, ...; default out.png)")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists (without it, an existing "
                                                        "file is an error and nothing is sampled)")
    return parser


def main(argv=None):
    """Run the command line; errors become one line on stderr and the exit status (2 usage, 1 failure)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        with one_line_warnings():
            return run(argv)
    except SystemExit as e:                             # argparse: --help (0) or a bad option (2), already printed
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:                              # noqa: BLE001  (the CLI's one place for every failure)
        if debug:                                       # the traceback, and still the status of the error
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, ArgumentError) else 1


def run(argv) -> int:
    if argv[:1] == ["train-toy"]:                       # its own parser: every recipe field is an option
        return train_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    if args.command == "info":
        print(info(args.file))
    elif args.command == "generate":
        generate(args)
    return 0


def one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


@contextlib.contextmanager
def one_line_warnings():
    """Warnings as "warning: ..." lines (not file:line and the source line)."""
    previous = warnings.showwarning
    warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)
    try:
        yield
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
