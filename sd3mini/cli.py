"""Command line: ``python -m sd3mini {info, generate} ...``."""

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def info(path: str) -> str:
    """Describe a checkpoint from its header alone: detected model, configuration, parameters, dtypes."""
    from .checkpoint import CheckpointError, describe_checkpoint, open_state_dict
    from .loading import clip_shape, mmdit_state_dict, text_encoder_state_dict, vae_state_dict
    from .mmdit import MMDiT, MMDiTConfig
    from .pipeline import detect_model
    from .text import CLIPTextEncoder, T5TextEncoder
    from .vae import SDVAE, VAEConfig

    sd = open_state_dict(path)
    total = sum(math.prod(t.shape) for t in sd.values())
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in sd.values())
    lines = [f"{path}", f"  {len(sd)} tensors, {total / 1e6:,.1f} M values; dtypes: "
             + ", ".join(f"{d} ({n})" for d, n in dtypes.most_common()),
             f"  contents: {describe_checkpoint(sd)}"]
    try:
        cfg = MMDiTConfig.from_state_dict(mmdit_state_dict(sd))
        with torch.device("meta"):
            n = _params(MMDiT(cfg))
        lines += [f"  MMDiT: {detect_model(cfg, path)}, {n / 1e9:.3f} B parameters (+ the pos_embed buffer)",
                  f"    depth {cfg.depth}, hidden {cfg.hidden_size}, heads {cfg.num_heads}, patch {cfg.patch_size}, "
                  f"position grid {cfg.pos_embed_max_size}x{cfg.pos_embed_max_size} (max "
                  f"{cfg.pos_embed_max_size * cfg.patch_size * 8} px), qk_norm {cfg.qk_norm}, "
                  f"dual attention in blocks {list(cfg.x_block_self_attn_layers) or 'none'}",
                  f"    context {cfg.context_in_dim}, pooled {cfg.adm_in_channels}, latent channels {cfg.in_channels}"]
    except (CheckpointError, KeyError):
        pass
    try:
        vcfg = VAEConfig.from_state_dict(vae_state_dict(sd))
        with torch.device("meta"):
            n = _params(SDVAE(vcfg))
        lines.append(f"  VAE: {n / 1e6:.1f} M parameters, ch {vcfg.ch}, ch_mult {list(vcfg.ch_mult)}, "
                     f"z {vcfg.z_channels}")
    except (CheckpointError, KeyError):
        pass
    bundled = [k for k in ("clip_l", "clip_g", "t5xxl") if any(key.startswith(f"text_encoders.{k}.") for key in sd)]
    if not bundled and "text_model.embeddings.token_embedding.weight" in sd:    # a standalone CLIP file
        bundled = [clip_shape(sd)["kind"] or "clip_l"]
    if not bundled and "encoder.block.0.layer.0.SelfAttention.q.weight" in sd:
        bundled = ["t5xxl"]
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
    return "\n".join(lines)


def load_pipeline(args):
    """The pipeline ``generate`` runs: the shipped tiny model when no --ckpt is given."""
    from .checkpoint import file_metadata
    from .pipeline import SD3Pipeline
    from .toy.model import toy_pipeline

    if args.ckpt is None or (Path(args.ckpt).is_file() and "sd3mini_toy" in file_metadata(args.ckpt)):
        return toy_pipeline(args.ckpt, device=args.device or "cpu")
    kwargs = dict(device=args.device, dtype=DTYPES.get(args.dtype), offload=args.offload, no_t5=args.no_t5)
    if Path(args.ckpt).is_dir():
        return SD3Pipeline.from_pretrained(args.ckpt, **kwargs)
    return SD3Pipeline.from_single_file(args.ckpt, clip_l=args.clip_l, clip_g=args.clip_g, t5xxl=args.t5xxl,
                                        tokenizer=args.tokenizer, **kwargs)


def generate(args) -> Path:
    from PIL import Image, PngImagePlugin

    from .pipeline import image_grid

    pipe = load_pipeline(args)
    init = Image.open(args.init_image) if args.init_image else None
    n = args.grid**2
    images = pipe([args.prompt] * n, args.negative, width=args.width, height=args.height, steps=args.steps,
                  cfg_scale=args.cfg, shift=args.shift, sampler=args.sampler, seed=args.seed, init_image=init,
                  denoise=args.denoise, slg=True if args.slg else None, progress=n == 1 and pipe.model != "toy")
    upscale = args.upscale or (4 if pipe.model == "toy" else 1)
    picture = image_grid(images, args.grid, upscale=upscale, gap=2 * upscale)   # white lines between images
    out = Path(args.output)
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", images[0].info["parameters"] + (f"; grid {args.grid}x{args.grid}, seeds "
                                                                  f"{pipe.last_seed}..{pipe.last_seed + n - 1}" if n > 1 else ""))
    picture.save(out, pnginfo=meta)
    size = f"{images[0].width}x{images[0].height}" + (f", shown {upscale}x" if upscale > 1 else "")
    print(f"wrote {out}: {n} image{'s' * (n > 1)} of {size} ({pipe.model} model, seed {pipe.last_seed})")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-toy"]:                       # its own parser: every recipe field is an option
        from .toy.train import main as train_main

        return train_main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="python -m sd3mini", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train-toy", help="train the tiny SD3 from scratch (see: train-toy --help)")

    p = sub.add_parser("info", help="describe a checkpoint (reads only its header)")
    p.add_argument("file")

    p = sub.add_parser("generate", help="text (or image) to image")
    p.add_argument("prompt")
    p.add_argument("--ckpt", help="official single file, diffusers folder, or sd3_medium / sd3.5_large / ... "
                                  "(default: the tiny model shipped with sd3mini)")
    p.add_argument("--negative", default="")
    p.add_argument("--clip-l"), p.add_argument("--clip-g"), p.add_argument("--t5xxl")
    p.add_argument("--tokenizer", help="T5 tokenizer folder or Hub repo (default google/t5-v1_1-xxl)")
    p.add_argument("--no-t5", action="store_true", help="run without T5-XXL (zeros in its place)")
    p.add_argument("--width", type=int), p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int), p.add_argument("--cfg", type=float), p.add_argument("--shift", type=float)
    p.add_argument("--sampler", choices=["euler", "dpmpp_2m"])
    p.add_argument("--seed", type=int)
    p.add_argument("--init-image"), p.add_argument("--denoise", type=float, default=0.8)
    p.add_argument("--slg", action="store_true", help="skip-layer guidance (SD3.5-medium)")
    p.add_argument("--device"), p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--offload", choices=["none", "model"], default="none")
    p.add_argument("--grid", type=int, default=1, help="an N x N grid of images, seeds SEED ... SEED + N*N - 1")
    p.add_argument("--upscale", type=int, help="enlarge the saved picture (nearest neighbour); default 4 for the tiny model")
    p.add_argument("-o", "--output", default="out.png")

    args = parser.parse_args(argv)
    if args.command == "info":
        print(info(args.file))
    elif args.command == "generate":
        generate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
