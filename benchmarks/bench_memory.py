"""Peak GPU memory and peak host RSS of one image in each memory mode, with the real loader.

    python benchmarks/bench_memory.py --dir /tmp/sd3_random            # SD3-medium size, 1024^2, 28 steps, fp16
    python benchmarks/bench_memory.py --dir /tmp/tiny --tiny           # tiny, on the CPU (a smoke test)

Writes full-size random weights in the official layout first (``sd3_medium.safetensors`` with the MM-DiT
and the VAE, ``text_encoders/{clip_l,clip_g,t5xxl_fp16}.safetensors``; ~15 GB), then runs every mode in
a fresh process so that its peak RSS is its own:

    none        everything on the GPU
    model       everything in host memory; each component visits the GPU while it runs
    sequential  each component is read from its memory-mapped file right before its stage, freed after
    no_t5       everything on the GPU, without T5 (77 zero rows in its place)

T5's tokenizer is not needed for memory: a stand-in with T5's ids makes the same 154-token context.
The last lines printed are a table.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

MODES = ("none", "model", "sequential", "no_t5")


def stand_in_tokenizer():
    """A word-level tokenizer with T5's special ids (pad 0, eos 1): enough to make T5 run."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + "a photo of an astronaut riding a horse on mars".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def write_checkpoints(folder: Path, tiny: bool, device):
    """Random weights in the official single-file and standalone text-encoder layouts (fp16)."""
    from transformers import CLIPTextConfig, T5Config

    import sd3mini
    from sd3mini.loading import save_single_file
    from sd3mini.text import CLIPTextEncoder, T5TextEncoder

    main = folder / "sd3_medium.safetensors"
    if main.exists():
        return main
    torch.manual_seed(0)
    if tiny:
        mmdit_cfg = sd3mini.MMDiTConfig(depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=16,
                                        adm_in_channels=192, context_in_dim=256)
        vae_cfg = sd3mini.VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
        clip = {"clip_l": (64, 3, "quick_gelu"), "clip_g": (128, 3, "gelu")}
        t5_cfg = dict(d_model=256, d_kv=64, d_ff=512, num_layers=2, num_heads=4)
    else:
        mmdit_cfg, vae_cfg = sd3mini.MMDiTConfig.sd3_medium(), sd3mini.VAEConfig()
        clip = {"clip_l": (768, 12, "quick_gelu"), "clip_g": (1280, 32, "gelu")}
        t5_cfg = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
    with torch.device(device):
        save_single_file(main, mmdit=sd3mini.MMDiT(mmdit_cfg), vae=sd3mini.SDVAE(vae_cfg), dtype=torch.float16)
    for kind, (width, layers, act) in clip.items():
        with torch.device(device):
            enc = CLIPTextEncoder(CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                                                 projection_dim=width, num_hidden_layers=layers,
                                                 num_attention_heads=width // 64, hidden_act=act), kind == "clip_g")
        sd = {k: v.half() for k, v in enc.transformer.state_dict().items()}
        sd3mini.checkpoint.save_state_dict(sd, folder / "text_encoders" / f"{kind}.safetensors")
        del enc, sd
    with torch.device(device):
        t5 = T5TextEncoder(T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                    use_cache=False, **t5_cfg))
    sd = {k: v.half() for k, v in t5.transformer.state_dict().items() if k != "encoder.embed_tokens.weight"}
    sd3mini.checkpoint.save_state_dict(sd, folder / "text_encoders" / "t5xxl_fp16.safetensors")
    return main


def run_mode(folder: Path, mode: str, size: int, steps: int, dtype: str, device: str) -> dict:
    """One image in one mode; returns peaks. Runs in its own process (see main)."""
    import sd3mini

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    t0 = time.perf_counter()
    pipe = sd3mini.SD3Pipeline.from_single_file(
        folder / "sd3_medium.safetensors", tokenizer=sd3mini.SD3Tokenizer(t5=stand_in_tokenizer()),
        no_t5=mode == "no_t5", device=device, dtype=dt, offload=mode if mode in ("model", "sequential") else "none")
    t1 = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
    pipe("a photo of an astronaut riding a horse on mars", seed=0, width=size, height=size, steps=steps,
         cfg_scale=5.0, sampler="euler", progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    gib = 2**30
    return {"mode": mode, "load_s": t1 - t0, "generate_s": t2 - t1,
            "gpu_peak_gib": torch.cuda.max_memory_allocated() / gib if device == "cuda" else None,
            "gpu_reserved_gib": torch.cuda.max_memory_reserved() / gib if device == "cuda" else None,
            "rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="where the random checkpoints are written (reused if present)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--tiny", action="store_true", help="tiny components on the CPU (a smoke test)")
    p.add_argument("--run", choices=MODES, help=argparse.SUPPRESS)   # internal: one mode, in this process
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        args.size, args.steps, args.dtype = min(args.size, 128), min(args.steps, 2), "fp32"
    folder = Path(args.dir)
    if args.run:
        print(json.dumps(run_mode(folder, args.run, args.size, args.steps, args.dtype, device)))
        return None
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_checkpoints(folder, args.tiny, device)
    print(f"checkpoints ready in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{f.relative_to(folder)} {f.stat().st_size / 2**30:.2f} GiB" for f in sorted(folder.rglob("*.safetensors"))))
    results = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--dir", str(folder), "--run", mode, "--size", str(args.size),
               "--steps", str(args.steps), "--dtype", args.dtype] + (["--tiny"] if args.tiny else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if done.returncode != 0:
            print(f"{mode}: failed\n{done.stderr[-2000:]}")
            results.append({"mode": mode, "error": done.stderr.strip().splitlines()[-1]})
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n{card}, torch {torch.__version__}, {'tiny' if args.tiny else 'SD3-medium size'}, {args.dtype}, "
          f"{args.size}x{args.size}, {args.steps} steps, batch 1 with CFG")
    print(f"{'mode':11s} {'GPU peak':>9s} {'reserved':>9s} {'host RSS':>9s} {'load s':>7s} {'image s':>8s}")
    for r in results:
        if "error" in r:
            print(f"{r['mode']:11s} error: {r['error']}")
            continue
        gpu = f"{r['gpu_peak_gib']:.2f}" if r["gpu_peak_gib"] is not None else "-"
        res = f"{r['gpu_reserved_gib']:.2f}" if r["gpu_reserved_gib"] is not None else "-"
        print(f"{r['mode']:11s} {gpu:>9s} {res:>9s} {r['rss_peak_gib']:9.2f} {r['load_s']:7.1f} {r['generate_s']:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "torch": torch.__version__, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
