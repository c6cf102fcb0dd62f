"""Speed of the VAE decoder: sd3mini against diffusers' AutoencoderKL, same weights.

    python benchmarks/bench_vae.py     # SD3's VAE, bf16, 1024^2 + 512^2, eager, compile
    python benchmarks/bench_vae.py --dtype fp32 --no-compile --sizes 1024   # a T4, fp16
    python benchmarks/bench_vae.py --tiny      # a tiny config on the CPU (a smoke test)

One decode of a random latent (batch ``--batch``, 16 channels, side / 8) per call, with
random weights (speed does not depend on their values), both models in one process.
diffusers gets the same weights through ``vae_to_diffusers`` and must give the same
image. Each figure is the median of ``--iters`` timed calls after ``--warmup`` untimed
ones (CUDA events on a GPU), with their spread, (slowest - fastest) / median. A spread
above ``--max-spread`` is flagged: the machine was not quiet, and the figures should not
be recorded. On a GPU the peak memory of each decode is printed too. The last lines
printed are a compact table.
"""

import argparse
import json
import statistics

import torch

import sd3mini
from sd3mini.convert import vae_diffusers_config, vae_to_diffusers
from timing import timings

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def diffusers_vae(ours: sd3mini.SDVAE, device, dtype):
    """diffusers' AutoencoderKL with the weights of ``ours`` (None without diffusers)"""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        return None
    config = vae_diffusers_config(ours.config)
    with torch.device("meta"):
        theirs = AutoencoderKL(**{k: v for k, v in config.items() if k[0] != "_"})
    sd = vae_to_diffusers(ours.state_dict(), ours.config)
    theirs.load_state_dict(sd, assign=True, strict=True)
    return theirs.to(device, dtype).eval().requires_grad_(False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 512],
                   help="image sides in pixels")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--max-spread", type=float, default=0.10,
                   help="flag timings whose (slowest - fastest) / median is above it")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny config on the CPU (a smoke test)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype]
    if args.tiny:
        cfg = sd3mini.VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
        args.sizes, args.warmup, args.iters, args.no_compile = [64], 1, 3, True
        dtype = torch.float32
    else:
        cfg = sd3mini.VAEConfig()
    torch.manual_seed(0)
    with torch.device(device):
        ours = sd3mini.SDVAE(cfg).to(dtype).eval().requires_grad_(False)
    theirs = None if args.no_diffusers else diffusers_vae(ours, device, dtype)
    if theirs is None and not args.no_diffusers:
        print("diffusers is not importable: timing sd3mini only")

    rows = []
    for px in args.sizes:
        g = torch.Generator().manual_seed(0)
        z = torch.randn(args.batch, cfg.z_channels, px // 8, px // 8, generator=g)
        z = z.to(device, dtype)                                 # (B, 16, px/8, px/8)
        runs = [("sd3mini", "eager", lambda: ours.decode(z))]
        if theirs is not None:      # same weights, same latent: the images must agree
            with torch.no_grad():
                a, b = ours.decode(z).float(), theirs.decode(z).sample.float()
            diff, top = (a - b).abs().max().item(), a.abs().max().item()
            print(f"{px}px: sd3mini vs diffusers image, max |diff| = {diff:.3g} "
                  f"(max |x| = {top:.3g})")
            runs.append(("diffusers", "eager", lambda: theirs.decode(z).sample))
        if not args.no_compile:
            ours_c = torch.compile(ours.decoder)
            runs.append(("sd3mini", "compile", lambda: ours_c(z)))
            if theirs is not None:
                theirs_c = torch.compile(theirs.decoder)
                runs.append(("diffusers", "compile", lambda: theirs_c(z)))
        for impl, mode, fn in runs:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                ms = timings(fn, args.warmup, args.iters, device)
            median = statistics.median(ms)
            gpu_peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
            rows.append({"impl": impl, "mode": mode, "px": px, "ms": median,
                         "min_ms": min(ms), "max_ms": max(ms),
                         "spread": (max(ms) - min(ms)) / median, "times_ms": ms,
                         "gpu_peak_gb": gpu_peak})

    for r in rows:
        ref = next((q for q in rows if q["impl"] == "diffusers"
                    and (q["mode"], q["px"]) == (r["mode"], r["px"])), None)
        r["ratio_to_diffusers"] = r["ms"] / ref["ms"] if ref else None
    card = torch.cuda.get_device_name() if cuda else "CPU"
    which = "tiny" if args.tiny else "SD3"
    print(f"\n{card}, torch {torch.__version__}, {which} VAE decoder, "
          f"{str(dtype)[6:]}, batch {args.batch}, "
          f"{args.warmup} warm-up + {args.iters} timed calls")
    print(f"{'impl':10s} {'mode':8s} {'px':>5s} {'median ms':>10s} {'min-max ms':>17s} "
          f"{'spread':>7s} {'GPU GB':>7s} {'vs diffusers':>12s}")
    for r in rows:
        ratio = f"{r['ratio_to_diffusers']:.2f}x" if r["ratio_to_diffusers"] else "-"
        gpu = f"{r['gpu_peak_gb']:.2f}" if r["gpu_peak_gb"] is not None else "-"
        flag = " (noisy)" if r["spread"] > args.max_spread else ""
        span = f"{r['min_ms']:8.2f}-{r['max_ms']:<8.2f}"
        print(f"{r['impl']:10s} {r['mode']:8s} {r['px']:5d} {r['ms']:10.2f} {span} "
              f"{100 * r['spread']:6.1f}% {gpu:>7s} {ratio:>12s}{flag}")
    if any(r["spread"] > args.max_spread for r in rows):
        print(f"some spreads are above {100 * args.max_spread:.0f}%: "
              "measure again on a quiet machine")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "args": vars(args),
                       "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
