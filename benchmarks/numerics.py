"""bf16 and fp16 against fp32 for the full-size SD3-medium MM-DiT, loaded through sd3mini's meta-device loader.

    python benchmarks/numerics.py --dir /tmp/sd3_random        # on a GPU: ~4 GB file, 1024^2, batch 2
    python benchmarks/numerics.py --dir /tmp/tiny --tiny       # on the CPU (a smoke test)

Writes random SD3-medium MM-DiT weights as an official single file (fp16, as released) unless present,
then for each dtype loads it with ``sd3mini.load_mmdit(path, device, dtype)`` (built on the meta device and
filled tensor by tensor) and records the peak memory of loading, and runs one forward on fixed inputs.
Reported: relative error ||v - v_fp32|| / ||v_fp32|| and max |v - v_fp32| per dtype, and load peaks.
"""

import argparse
import json
import time
from pathlib import Path

import torch

import sd3mini
from sd3mini.loading import save_single_file


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cfg = sd3mini.MMDiTConfig(depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=16) if args.tiny \
        else sd3mini.MMDiTConfig.sd3_medium()
    size = 128 if args.tiny else args.size
    path = Path(args.dir) / "mmdit.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        with torch.device(device):
            save_single_file(path, mmdit=sd3mini.MMDiT(cfg), dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    h = size // 8
    x, y, ctx = torch.randn(2, 16, h, h, generator=g), torch.randn(2, 2048 if not args.tiny else 2048, generator=g), \
        torch.randn(2, 154, cfg.context_in_dim, generator=g)
    y = y[:, : cfg.adm_in_channels]
    t = torch.tensor([900.0, 300.0])
    outputs, rows = {}, []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model = sd3mini.load_mmdit(path, device=device, dtype=dtype)
        load_s = time.perf_counter() - t0
        load_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        weights = sum(q.numel() * q.element_size() for q in list(model.parameters()) + list(model.buffers())) / 2**30
        with torch.no_grad():
            v = model(*(a.to(device, dtype) for a in (x,)), t.to(device), y=y.to(device, dtype),
                      context=ctx.to(device, dtype)).float().cpu()
        outputs[dtype] = v
        ref = outputs[torch.float32]
        rows.append({"dtype": str(dtype)[6:], "weights_gib": weights, "load_peak_gib": load_peak, "load_s": load_s,
                     "rel_error": ((v - ref).norm() / ref.norm()).item(), "max_abs_error": (v - ref).abs().max().item(),
                     "finite": bool(v.isfinite().all())})
        del model
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{card}, torch {torch.__version__}, {'tiny' if args.tiny else 'SD3-medium'} MM-DiT, random weights, "
          f"{size}x{size}, batch 2")
    print(f"{'dtype':9s} {'weights':>8s} {'load peak':>10s} {'load s':>7s} {'rel err':>9s} {'max err':>9s} finite")
    for r in rows:
        peak = f"{r['load_peak_gib']:.2f}" if r["load_peak_gib"] is not None else "-"
        print(f"{r['dtype']:9s} {r['weights_gib']:8.2f} {peak:>10s} {r['load_s']:7.1f} {r['rel_error']:9.2e} "
              f"{r['max_abs_error']:9.2e} {r['finite']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "torch": torch.__version__, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
