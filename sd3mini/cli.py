"""Command line: ``python -m sd3mini {info, generate} ...``."""

import argparse
import contextlib
import math
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

from .checks import ArgumentError, Parser, check_int, check_number, check_seed
from .pipeline import OFFLOAD_MODES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _meta_params(cls, config) -> int:
    """Parameters of ``cls(config)``, built on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return sum(p.numel() for p in cls(config).parameters())


def _mmdit_lines(sd, path) -> list[str]:
    from .loading import mmdit_state_dict
    from .mmdit import MMDiT, MMDiTConfig
    from .pipeline import detect_model

    cfg = MMDiTConfig.from_state_dict(mmdit_state_dict(sd))
    n = _meta_params(MMDiT, cfg)
    grid = cfg.pos_embed_max_size
    return [f"  MMDiT: {detect_model(cfg, path)}, {n / 1e9:.3f} B parameters (+ the pos_embed buffer)",
            f"    depth {cfg.depth}, hidden {cfg.hidden_size}, heads {cfg.num_heads}, patch {cfg.patch_size}, "
            f"position grid {grid}x{grid} (max {grid * cfg.patch_size * 8} px), qk_norm {cfg.qk_norm}, "
            f"dual attention in blocks {list(cfg.x_block_self_attn_layers) or 'none'}",
            f"    context {cfg.context_in_dim}, pooled {cfg.adm_in_channels}, latent channels {cfg.in_channels}"]


def _vae_lines(sd, path) -> list[str]:
    from .loading import vae_state_dict
    from .vae import SDVAE, VAEConfig

    vcfg = VAEConfig.from_state_dict(vae_state_dict(sd))
    n = _meta_params(SDVAE, vcfg)
    return [f"  VAE: {n / 1e6:.1f} M parameters, ch {vcfg.ch}, ch_mult {list(vcfg.ch_mult)}, z {vcfg.z_channels}"]


def _text_lines(sd) -> list[str]:
    from .loading import clip_shape, text_encoder_state_dict
    from .text import CLIPTextEncoder, T5TextEncoder

    bundled = [k for k in ("clip_l", "clip_g", "t5xxl") if any(key.startswith(f"text_encoders.{k}.") for key in sd)]
    if not bundled and "text_model.embeddings.token_embedding.weight" in sd:    # a standalone CLIP file
        bundled = [clip_shape(sd)["kind"] or "clip_l"]
    if not bundled and "encoder.block.0.layer.0.SelfAttention.q.weight" in sd:
        bundled = ["t5xxl"]
    lines = []
    for kind in bundled:
        tsd = text_encoder_state_dict(sd, kind)
        if kind == "t5xxl":
            c = T5TextEncoder.config_from_state_dict(tsd)
            desc = f"{c.num_layers} layers, width {c.d_model}, {c.num_heads} heads, ff {c.d_ff}"
        else:
            c = CLIPTextEncoder.config_from_state_dict(tsd, kind)
            desc = f"{c.num_hidden_layers} layers, width {c.hidden_size}"
        n = sum(math.prod(t.shape) for k, t in tsd.items() if k != "encoder.embed_tokens.weight")
        lines.append(f"  text encoder {kind}: {n / 1e6:,.1f} M parameters, {desc}")
    return lines


def info(path: str) -> str:
    """Describe a checkpoint from its header alone: detected model, configuration, parameters, dtypes."""
    from .checkpoint import CheckpointError, describe_checkpoint, open_state_dict

    sd = open_state_dict(path)
    total = sum(math.prod(t.shape) for t in sd.values())
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in sd.values())
    lines = [f"{path}", f"  {len(sd)} tensors, {total / 1e6:,.1f} M values; dtypes: "
             + ", ".join(f"{d} ({n})" for d, n in dtypes.most_common()),
             f"  contents: {describe_checkpoint(sd)}"]
    for part in (_mmdit_lines, _vae_lines):          # each part that the file holds
        try:
            lines += part(sd, path)
        except (CheckpointError, KeyError):
            pass
    return "\n".join(lines + _text_lines(sd))


def load_pipeline(args):
    """The pipeline ``generate`` runs: the shipped tiny model when no --ckpt is given."""
    from .checkpoint import file_metadata
    from .loading import HUB_MODELS
    from .pipeline import SD3Pipeline, looks_like_repo
    from .toy.model import toy_pipeline

    ckpt = Path(args.ckpt) if args.ckpt is not None else None
    meta = file_metadata(ckpt) if ckpt is not None and ckpt.is_file() else {}
    if ckpt is None or "sd3mini_toy" in meta:
        check_toy_options(args)
        return toy_pipeline(args.ckpt, device=args.device or "cpu")
    if "sd3mini_train" in meta:
        raise ArgumentError(f"--ckpt {ckpt} is a train-toy training state (model, EMA and optimizer); generate "
                            f"from the weights it exported: --ckpt {ckpt.parent / 'toy_sd3.safetensors'}")
    kwargs = dict(device=args.device, dtype=DTYPES.get(args.dtype), offload=args.offload, no_t5=args.no_t5)
    # owner/name is a Hub repository unless a folder "owner" is here: then it is a mistyped local path
    hub_id = not ckpt.exists() and not ckpt.parent.is_dir() and looks_like_repo(args.ckpt)
    if ckpt.is_dir() or (args.ckpt not in HUB_MODELS and hub_id):
        return SD3Pipeline.from_pretrained(args.ckpt, **kwargs)
    return SD3Pipeline.from_single_file(args.ckpt, clip_l=args.clip_l, clip_g=args.clip_g, t5xxl=args.t5xxl,
                                        tokenizer=args.tokenizer, **kwargs)


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
    """The output can be written, before anything is sampled: an existing folder, a known image extension,
    not a folder itself, and not an existing file unless --force."""
    from PIL import Image

    if path.is_dir():
        raise ArgumentError(f"--output {path} is a folder; give a file name such as {path / 'out.png'}")
    if not path.parent.is_dir():
        raise ArgumentError(f"--output {path}: the folder {path.parent} does not exist")
    if path.suffix.lower() not in Image.registered_extensions():
        raise ArgumentError(f"--output {path}: unknown image extension {path.suffix or '(none)'!r}; use .png, "
                            ".jpg or .webp")
    if path.exists() and not force:
        raise ArgumentError(f"--output {path} exists; pass --force to overwrite it, or choose another name")


def check_generate_args(args):
    """Every option of ``generate`` that can be checked without the model, before it is loaded."""
    for name in ("width", "height", "steps", "upscale"):
        if getattr(args, name) is not None:
            check_int(f"--{name}", getattr(args, name), minimum=1)
    check_int("--grid", args.grid, minimum=1)
    if args.cfg is not None:
        check_number("--cfg", args.cfg, minimum=0)
    if args.shift is not None:
        check_number("--shift", args.shift, above=0)
    if args.seed is not None:
        check_seed(args.seed, args.grid**2, name="--seed")
    if args.denoise is not None:
        if args.init_image is None:
            raise ArgumentError("--denoise applies to image-to-image only: pass --init-image too")
        if not 0 < args.denoise <= 1:
            raise ArgumentError(f"--denoise must be in (0, 1], got {args.denoise}")
    if args.init_image is not None and not Path(args.init_image).is_file():
        raise ArgumentError(f"--init-image {args.init_image}: no such file")
    check_output(Path(args.output), args.force)


def open_image(path):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ArgumentError(f"--init-image {path} is not an image that PIL can read ({e})") from None
    return image


def generate(args) -> Path:
    from PIL import Image, PngImagePlugin

    from .pipeline import image_grid

    check_generate_args(args)
    init = open_image(args.init_image) if args.init_image else None
    pipe = load_pipeline(args)
    n = args.grid**2
    steps = args.steps if args.steps is not None else pipe.defaults["steps"]
    long_run = pipe.model != "toy" or n * steps >= TOY_QUIET_EVALUATIONS
    images = pipe([args.prompt] * n, args.negative, width=args.width, height=args.height, steps=args.steps,
                  cfg_scale=args.cfg, shift=args.shift, sampler=args.sampler, seed=args.seed, init_image=init,
                  denoise=args.denoise, slg=True if args.slg else None, progress=long_run)
    upscale = args.upscale or (4 if pipe.model == "toy" else 1)
    picture = image_grid(images, args.grid, upscale=upscale, gap=2 * upscale)   # white lines between images
    out = Path(args.output)
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", images[0].info["parameters"] + (f"; grid {args.grid}x{args.grid}, seeds "
                                                                  f"{pipe.last_seed}..{pipe.last_seed + n - 1}" if n > 1 else ""))
    tmp = out.with_name(f".{out.name}.tmp")             # written whole, then renamed: never half an image
    try:
        picture.save(tmp, format=Image.registered_extensions()[out.suffix.lower()], pnginfo=meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    size = f"{images[0].width}x{images[0].height}" + (f", shown {upscale}x" if upscale > 1 else "")
    print(f"wrote {out}: {n} image{'s' * (n > 1)} of {size} ({pipe.model} model, seed {pipe.last_seed})")
    return out


# The tiny model runs ~100 model evaluations a second on one core: below this many, no progress bar.
TOY_QUIET_EVALUATIONS = 2000

EPILOG = """Errors print one line, "error: ...", and exit with 2 for a bad option (usage) or 1 when a run fails
(a file that cannot be loaded, the Hub, numerics); --debug shows the traceback instead."""


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
    p.add_argument("--sampler", choices=["euler", "dpmpp_2m"])
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
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:                              # noqa: BLE001  (the CLI's one place for every failure)
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, ArgumentError) else 1


def run(argv) -> int:
    if argv[:1] == ["train-toy"]:                       # its own parser: every recipe field is an option
        from .toy.train import main as train_main

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
