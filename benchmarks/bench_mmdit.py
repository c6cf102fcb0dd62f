"""Speed of one MM-DiT forward (one CFG sampling step), sd3mini against diffusers, same weights.

    python benchmarks/bench_mmdit.py                      # SD3-medium, bf16, 1024^2 and 512^2, eager + compile
    python benchmarks/bench_mmdit.py --no-compile --sizes 1024
    python benchmarks/bench_mmdit.py --tiny               # a tiny config on the CPU, to keep the script working

Batch 2 (conditional + unconditional), 154 context tokens, random weights (speed does not depend on
their values). Each timing is the median of CUDA-event timings after warm-up. FLOPs are counted
analytically (``mmdit_flops``) and cross-checked with ``torch.utils.flop_counter`` on the meta device;
MFU is against ``--peak`` TFLOP/s (H100 SXM dense bf16: 989; the anchors in the notes use 800).
When diffusers is importable its ``SD3Transformer2DModel`` is loaded with the same weights and timed in
the same process. The last lines printed are a compact table.
"""

import argparse
import json
import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode

import sd3mini
from sd3mini.convert import mmdit_diffusers_config, mmdit_to_diffusers
from timing import timings


def mmdit_flops(cfg: sd3mini.MMDiTConfig, latent_hw, batch=2, n_ctx=154) -> int:
    """Multiply-adds x 2 of one forward: linear layers, joint attention, MMDiT-X's second attention,
    adaLN on c, and the embedders (the same terms PyTorch's FLOP counter records)."""
    D, L = cfg.hidden_size, cfg.depth
    n_x = (latent_hw[0] // cfg.patch_size) * (latent_hw[1] // cfg.patch_size)
    n = n_x + n_ctx
    n_dual = len(cfg.x_block_self_attn_layers)
    p2c = cfg.patch_size**2 * cfg.in_channels
    f = L * 24 * n * D**2 - 18 * n_ctx * D**2                  # qkv, proj, MLP of both streams; last text: qkv only
    f += n_dual * 8 * n_x * D**2 + L * 4 * n**2 * D + n_dual * 4 * n_x**2 * D
    f += 2 * (n_ctx * cfg.context_in_dim * D + 2 * n_x * p2c * D + cfg.adm_in_channels * D + 256 * D + 2 * D * D)
    mods = sum(2 * 6 * D + (3 * D if i in cfg.x_block_self_attn_layers else 0) for i in range(L)) - 4 * D
    f += 2 * D * (mods + 2 * D)                                 # adaLN of every block and of the final layer
    return batch * f


def counted_flops(model, latent_hw, batch=2, n_ctx=154, device="meta") -> int:
    cfg = model.config
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(*inputs(cfg, latent_hw, batch, n_ctx, device, torch.float32))
    return counter.get_total_flops()


def inputs(cfg, latent_hw, batch, n_ctx, device, dtype):
    g = torch.Generator().manual_seed(0)
    make = (lambda *s: torch.empty(*s, device="meta")) if device == "meta" else \
        (lambda *s: torch.randn(*s, generator=g).to(device, dtype))  # noqa: E731
    t = torch.full((batch,), 500.0, device=device) if device != "meta" else torch.empty(batch, device="meta")
    return make(batch, cfg.in_channels, *latent_hw), t, make(batch, cfg.adm_in_channels), make(batch, n_ctx, cfg.context_in_dim)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd3_medium", choices=["sd3_medium", "sd3_5_large", "sd3_5_medium"])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 512], help="image sides in pixels")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--peak", type=float, default=989.0, help="peak dense TFLOP/s of the card, for MFU")
    p.add_argument("--tiny", action="store_true", help="a tiny config on the CPU (a smoke test)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.tiny:
        cfg = sd3mini.MMDiTConfig(depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=16)
        args.sizes, args.warmup, args.iters, dtype, args.no_compile = [128], 1, 2, torch.float32, True
    else:
        cfg = getattr(sd3mini.MMDiTConfig, args.model)()
    torch.manual_seed(0)
    with torch.device(device):
        model = sd3mini.MMDiT(cfg).to(dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        meta_model = sd3mini.MMDiT(cfg)
    theirs = None
    if not args.no_diffusers:
        try:
            from diffusers import SD3Transformer2DModel

            with torch.device("meta"):
                theirs = SD3Transformer2DModel(**{k: v for k, v in mmdit_diffusers_config(cfg).items() if k != "_class_name"})
            theirs.load_state_dict(mmdit_to_diffusers(model.state_dict(), cfg), assign=True, strict=True)
            theirs = theirs.to(device, dtype).eval().requires_grad_(False)
        except ImportError:
            print("diffusers is not importable: timing sd3mini only")

    rows = []
    for px in args.sizes:
        hw = (px // 8, px // 8)
        flops = mmdit_flops(cfg, hw)
        counted = counted_flops(meta_model, hw)
        x, t, y, ctx = inputs(cfg, hw, 2, 154, device, dtype)
        if theirs is not None:       # same weights, same inputs: the outputs must agree
            with torch.no_grad():
                a = model(x, t, y=y, context=ctx).float()
                b = theirs(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample.float()
            print(f"{px}px: sd3mini vs diffusers output, max |diff| = {(a - b).abs().max().item():.3g} "
                  f"(max |v| = {a.abs().max().item():.3g})")
        runs = [("sd3mini", "eager", lambda m=model: m(x, t, y=y, context=ctx))]
        if theirs is not None:
            runs.append(("diffusers", "eager", lambda m=theirs: m(hidden_states=x, encoder_hidden_states=ctx,
                                                                    pooled_projections=y, timestep=t)))
        if not args.no_compile:
            compiled = torch.compile(model)
            runs.append(("sd3mini", "compile", lambda m=compiled: m(x, t, y=y, context=ctx)))
            if theirs is not None:
                compiled_theirs = torch.compile(theirs)
                runs.append(("diffusers", "compile", lambda m=compiled_theirs: m(
                    hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t)))
        for impl, mode, fn in runs:
            with torch.no_grad():
                first = timings(fn, 0, 1, device)[0]      # compiled: includes the compilation
                times = timings(fn, max(args.warmup - 1, 0), args.iters, device)
            ms = statistics.median(times)
            rows.append({"impl": impl, "mode": mode, "px": px, "ms": ms, "min_ms": min(times),
                         "max_ms": max(times), "first_call_s": first / 1000, "tflops": flops / ms / 1e9,
                         "mfu": flops / ms / 1e9 / args.peak, "flops_analytic": flops, "flops_counted": counted})
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for r in rows:
        ref = next((q for q in rows if q["impl"] == "diffusers" and q["mode"] == r["mode"] and q["px"] == r["px"]), None)
        r["ratio_to_diffusers"] = r["ms"] / ref["ms"] if ref else None
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{card}, torch {torch.__version__}, {args.model if not args.tiny else 'tiny'}, {str(dtype)[6:]}, batch 2, 154 context tokens")
    print(f"{'impl':10s} {'mode':8s} {'px':>5s} {'TFLOP':>7s} {'ms':>9s} {'min-max ms':>17s} {'first s':>8s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s} {'vs diffusers':>12s}")
    for r in rows:
        ratio = f"{r['ratio_to_diffusers']:.2f}x" if r["ratio_to_diffusers"] else "-"
        spread = f"{r['min_ms']:.0f}-{r['max_ms']:.0f}"
        print(f"{r['impl']:10s} {r['mode']:8s} {r['px']:5d} {r['flops_analytic'] / 1e12:7.3f} {r['ms']:9.2f} "
              f"{spread:>17s} {r['first_call_s']:8.1f} {r['tflops']:8.1f} {100 * r['mfu']:5.1f}% {ratio:>12s}")
    check = {(r["px"]): (r["flops_analytic"], r["flops_counted"]) for r in rows}
    print("FLOPs, analytic vs torch.utils.flop_counter: " +
          ", ".join(f"{px}px {a / 1e12:.4f} / {c / 1e12:.4f} TF" for px, (a, c) in check.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
