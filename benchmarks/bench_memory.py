"""Peak host RSS (and peak GPU memory) of one image in each memory mode, real loader.

    python benchmarks/bench_memory.py --dir /tmp/sd3  # full size, 1024^2, 28 steps
    python benchmarks/bench_memory.py --dir /tmp/sd3 --device cpu --size 256 --steps 1
    python benchmarks/bench_memory.py --dir /tmp/sd3 --read-only  # a GPU load's host
    python benchmarks/bench_memory.py --dir /tmp/sd3 --delete     # remove the files
    python benchmarks/bench_memory.py --dir /tmp/tiny --tiny  # tiny, CPU (a smoke test)

Writes random float16 weights in the official layout first (``sd3_medium.safetensors``
with the MM-DiT and the VAE, ``text_encoders/{clip_l,clip_g,t5xxl_fp16}.safetensors``;
15.5 GB at full size) with exactly the keys and shapes of tests/data/manifests, one
tensor at a time (the writer holds 16 MB, not the model). Then it runs every mode, with
and without T5, each in a fresh process, so that its peak RSS is its own:

    none        everything on the device (on the CPU: in host memory)
    model       everything in host memory; each component visits the device to run
    sequential  each component is read from its file right before its stage, freed after

Each run records, per phase (load, encode, denoise, decode), the peak RSS inside the
phase (Linux: VmHWM, reset at the phase's start through /proc/self/clear_refs) and the
RSS at its end; in ``sequential`` mode also the seconds spent reading weights during the
image. A watchdog kills a run whose RSS passes ``--max-rss`` GB or that leaves the
machine less than ``--min-available`` GB, and each run asks the kernel's OOM killer to
pick it first (oom_score_adj 1000): a run too big for the machine ends itself, not a
neighbour. T5's tokenizer is not needed for memory: a stand-in with T5's ids makes the
same 154-token context. The last lines printed are a markdown table.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

MODES = ("none", "model", "sequential")
PHASES = ("load", "encode", "denoise", "decode")
MANIFESTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "manifests"
FILES = {                                       # file in the Hub layout: its manifest
    "sd3_medium.safetensors": "sd3_medium",
    "text_encoders/clip_l.safetensors": "text_encoder_clip_l",
    "text_encoders/clip_g.safetensors": "text_encoder_clip_g",
    "text_encoders/t5xxl_fp16.safetensors": "text_encoder_t5xxl",
}
GB = 1e9        # decimal, as sizes are quoted (fp16: T5-XXL 9.5 GB, MM-DiT 4.2 GB)
PROMPT = "a photo of an astronaut riding a horse on mars"


def stand_in_tokenizer():
    """A word-level tokenizer with T5's special ids (pad 0, eos 1): enough to run T5."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = dict.fromkeys(["<pad>", "</s>", "<unk>"] + PROMPT.split())
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>")


# --------------------------------------------------------------------------------------
# Random weights in the official layout, written one tensor at a time
# --------------------------------------------------------------------------------------
def write_random_safetensors(path: Path, shapes: dict, seed: int = 0):
    """A float16 safetensors file with ``shapes`` {key: [dims]}: normalisation weights
    1, the rest N(0, 0.02^2), so that the forward passes stay finite and far from
    subnormals. The data are slices of one 16 MB pool of random values: memory stays
    flat."""
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(2**23, dtype=np.float32) * 0.02).astype("<f2")
    ones = np.ones(2**23, dtype="<f2")
    header, offset = {}, 0
    for key in sorted(shapes):
        nbytes = 2 * int(np.prod(shapes[key], dtype=np.int64))
        header[key] = {"dtype": "F16", "shape": list(shapes[key]),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)         # padded to 8 bytes, as safetensors does
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for i, key in enumerate(sorted(shapes)):
            begin, end = header[key]["data_offsets"]
            norm = re.search(r"norm[^.]*\.weight$", key)
            src = memoryview(ones if norm else pool).cast("B")
            start, left = (i * 4096) % (len(src) // 2), end - begin  # a slice per key
            while left:
                chunk = src[start:start + min(left, len(src) - start)]
                f.write(chunk)
                left -= len(chunk)
                start = 0
    tmp.replace(path)


def full_size_shapes() -> dict:
    """{file: {key: shape}} of the official SD3-medium files (tests/data/manifests)."""
    return {file: json.loads((MANIFESTS / f"{name}.json").read_text())
            for file, name in FILES.items()}


def tiny_shapes() -> dict:
    """The same four files for tiny components: shapes of modules on the meta device."""
    from transformers import CLIPTextConfig, T5Config

    import sd3mini
    from sd3mini.text import CLIPTextEncoder, T5TextEncoder

    def clip(width, act):
        return CLIPTextConfig(vocab_size=49408, hidden_size=width,
                              intermediate_size=4 * width, projection_dim=width,
                              num_hidden_layers=3, num_attention_heads=width // 64,
                              hidden_act=act)

    def shape(module, prefix=""):
        return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}

    with torch.device("meta"):
        mmdit = sd3mini.MMDiT(sd3mini.MMDiTConfig(
            depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=16,
            adm_in_channels=192, context_in_dim=256))
        vae_config = sd3mini.VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
        vae = sd3mini.SDVAE(vae_config)
        clip_l = CLIPTextEncoder(clip(64, "quick_gelu"), projected=False)
        clip_g = CLIPTextEncoder(clip(128, "gelu"), projected=True)
        t5 = T5TextEncoder(T5Config(
            vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
            use_cache=False, d_model=256, d_kv=64, d_ff=512, num_layers=2, num_heads=4))
    # T5's embedding is stored once, as encoder.embed_tokens.weight (as officially)
    t5_shapes = {k: v for k, v in shape(t5.transformer).items() if k != "shared.weight"}
    return {"sd3_medium.safetensors": {**shape(mmdit, "model.diffusion_model."),
                                       **shape(vae, "first_stage_model.")},
            "text_encoders/clip_l.safetensors": shape(clip_l.transformer),
            "text_encoders/clip_g.safetensors": shape(clip_g.transformer),
            "text_encoders/t5xxl_fp16.safetensors": t5_shapes}


def write_checkpoints(folder: Path, tiny: bool) -> Path:
    """The four files (each written once: an existing one is kept)."""
    for file, shapes in (tiny_shapes() if tiny else full_size_shapes()).items():
        if not (folder / file).exists():
            write_random_safetensors(folder / file, shapes)
    return folder / "sd3_medium.safetensors"


# --------------------------------------------------------------------------------------
# One run, in its own process
# --------------------------------------------------------------------------------------
def memory_now() -> dict:
    """In bytes: this process's RSS now, its peak since the last ``reset_peak``, and the
    anonymous and file-backed parts of the RSS now (Linux /proc/self/status, else {})"""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    names = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}
    fields = (line.split(":", 1) for line in lines)
    return {names[k]: int(v.split()[0]) * 1024 for k, v in fields if k in names}


def reset_peak():
    """Make VmHWM (the peak RSS) the current RSS: the next peak read is the next
    phase's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_mode(folder: Path, mode: str, t5: bool, size: int, steps: int, dtype: str,
             device: str) -> dict:
    """One image in one mode; returns the peaks. Runs in its own process (see main)."""
    try:            # if the machine runs out of memory, the kernel ends this one first
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    import sd3mini
    from sd3mini.pipeline import OnDisk

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    phases = {}

    def measured(name, fn, *args, **kwargs):
        """Run fn; note the phase's peak RSS, its RSS at the end, and its seconds."""
        reset_peak()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        phases[name] = {"s": time.perf_counter() - t0, **memory_now()}
        return out

    tokenizer = sd3mini.SD3Tokenizer(t5=stand_in_tokenizer() if t5 else None)
    pipe = measured("load", sd3mini.SD3Pipeline.from_single_file,
                    folder / "sd3_medium.safetensors", tokenizer=tokenizer,
                    no_t5=not t5, device=device, dtype=dt, offload=mode)
    # The pipeline's own stages, each measured as the call runs it.
    for name, attr in zip(PHASES[1:], ("_encode_text", "_denoise", "_decode")):
        stage = getattr(pipe, attr)
        setattr(pipe, attr,
                lambda *a, _n=name, _s=stage, **k: measured(_n, _s, *a, **k))
    reads = []      # sequential: (component, seconds) of each read in the image
    te = pipe.text_encoder
    for holder, attr in ((pipe, "mmdit"), (pipe, "vae"), (te, "clip_l"), (te, "clip_g"),
                         (te, "t5")):
        component = getattr(holder, attr)
        if isinstance(component, OnDisk):
            def timed(_load=component.load, _name=attr):
                t0 = time.perf_counter()
                module = _load()
                reads.append((_name, time.perf_counter() - t0))
                return module
            component.load = timed
    t0 = time.perf_counter()
    image = pipe(PROMPT, seed=0, width=size, height=size, steps=steps, cfg_scale=5.0,
                 sampler="euler", progress=False)[0]
    total = time.perf_counter() - t0
    peak_phase = max(phases, key=lambda p: phases[p].get("peak", 0))
    cuda = device == "cuda"
    return {"mode": mode, "t5": t5, "phases": phases,
            "peak": phases[peak_phase].get("peak"), "peak_phase": peak_phase,
            "load_s": phases["load"]["s"], "image_s": total,
            "read_s": sum(s for _, s in reads) if mode == "sequential" else None,
            "reads": reads, "image_size": image.size,
            "gpu_peak": torch.cuda.max_memory_allocated() if cuda else None,
            "gpu_reserved": torch.cuda.max_memory_reserved() if cuda else None}


def read_only(folder: Path) -> dict:
    """The host side of loading onto a GPU, without one: read every tensor of each file
    while its state dict is open (as a loader does), keep none. -> peak RSS per file."""
    from sd3mini.checkpoint import open_state_dict

    peaks = {}
    for file in FILES:
        reset_peak()
        sd = open_state_dict(folder / file)
        for key in sd:
            sd[key].load().sum()       # every page touched, as a copy to a GPU does
        peaks[file] = memory_now().get("peak")
        del sd                         # (with a memory map: closes it)
    return peaks


def watch(cmd, max_rss: float, min_available: float):
    """Run cmd; kill it if its RSS passes max_rss bytes or the machine's MemAvailable
    falls below min_available bytes. -> (the finished process, the largest RSS seen, why
    it was killed or "")."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ)
    seen, why = 0, ""
    status, meminfo = Path(f"/proc/{proc.pid}/status"), Path("/proc/meminfo")
    while proc.poll() is None:
        try:
            rss = int(re.search(r"VmRSS:\s+(\d+)", status.read_text()).group(1)) * 1024
            free = re.search(r"MemAvailable:\s+(\d+)", meminfo.read_text())
            available = int(free.group(1)) * 1024
        except (OSError, AttributeError):      # not Linux, or the process is ending
            time.sleep(0.1)
            continue
        seen = max(seen, rss)
        if rss > max_rss or available < min_available:
            why = (f"killed by the watchdog: RSS {rss / GB:.2f} GB, MemAvailable "
                   f"{available / GB:.2f} GB (limits {max_rss / GB:.1f} / "
                   f"{min_available / GB:.1f} GB)")
            proc.kill()
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), seen, why


def table(results, header: str) -> str:
    """The results as a markdown table, one row per run."""
    rows = [header, "",
            "| mode | T5 | peak RSS (GB) | phase of the peak | peak RSS in load / "
            "encode / denoise / decode (GB) | RSS at the end of each (GB) | load s | "
            "image s | reading weights during the image s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t5 = "with" if r["t5"] else "without"
        if "error" in r:
            rows.append(f"| {r['mode']} | {t5} | > {r['watch_peak'] / GB:.1f} | "
                        f"{r['error']} | | | | | |")
            continue
        ph = r["phases"]
        peaks = " / ".join(f"{ph[p].get('peak', 0) / GB:.2f}" for p in PHASES)
        ends = " / ".join(f"{ph[p].get('rss', 0) / GB:.2f}" for p in PHASES)
        read = f"{r['read_s']:.1f}" if r["read_s"] is not None else "-"
        peak = f"**{r['peak'] / GB:.2f}**" if r["peak"] else "-"
        rows.append(f"| {r['mode']} | {t5} | {peak} | {r['peak_phase']} | {peaks} | "
                    f"{ends} | {r['load_s']:.1f} | {r['image_s']:.1f} | {read} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True,
                   help="where the random checkpoints are written (reused if present)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--t5", nargs="+", default=["with", "without"],
                   choices=["with", "without"])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--device", choices=["cuda", "cpu"],
                   help="default: cuda if there is one")
    p.add_argument("--tiny", action="store_true",
                   help="tiny components on the CPU (a smoke test)")
    p.add_argument("--max-rss", type=float, default=1e9,
                   help="GB: kill a run whose RSS passes this")
    p.add_argument("--min-available", type=float, default=1.5,
                   help="GB: kill a run that leaves less MemAvailable than this")
    p.add_argument("--write-only", action="store_true",
                   help="write the files, run nothing")
    p.add_argument("--delete", action="store_true",
                   help="delete the random files in --dir, run nothing")
    p.add_argument("--read-only", action="store_true",
                   help="only read each file's tensors, keeping none (a GPU load)")
    p.add_argument("--run", choices=MODES, help=argparse.SUPPRESS)   # internal: one run
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    folder = Path(args.dir)
    if args.delete:
        for file in FILES:
            (folder / file).unlink(missing_ok=True)
        print(f"deleted the random files in {folder}")
        return None
    cuda = torch.cuda.is_available() and not args.tiny
    device = args.device or ("cuda" if cuda else "cpu")
    if args.tiny:
        args.size, args.steps = min(args.size, 128), min(args.steps, 2)
        args.dtype = "fp32"
    if args.read_only:
        peaks = read_only(folder)
        for file, peak in peaks.items():
            print(f"{file}: {(folder / file).stat().st_size / GB:.2f} GB, "
                  f"peak RSS while reading {peak / GB:.2f} GB")
        return peaks
    if args.run:
        result = run_mode(folder, args.run, args.t5 == ["with"], args.size, args.steps,
                          args.dtype, device)
        print(json.dumps(result))
        return None
    t0 = time.perf_counter()
    write_checkpoints(folder, args.tiny)
    print(f"checkpoints ready in {time.perf_counter() - t0:.0f} s: " + ", ".join(
        f"{file} {(folder / file).stat().st_size / GB:.2f} GB" for file in FILES))
    if args.write_only:
        return None
    results = []
    for mode in args.modes:
        for t5 in args.t5:
            cmd = [sys.executable, __file__, "--dir", str(folder), "--run", mode,
                   "--t5", t5, "--size", str(args.size), "--steps", str(args.steps),
                   "--dtype", args.dtype, "--device", device] + ["--tiny"] * args.tiny
            done, seen, why = watch(cmd, args.max_rss * GB, args.min_available * GB)
            if done.returncode != 0:
                last = (done.stderr.strip() or "no output").splitlines()[-1]
                print(f"{mode}, {t5} T5: failed\n{done.stderr[-2000:]}")
                results.append({"mode": mode, "t5": t5 == "with", "error": why or last,
                                "watch_peak": seen})
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append({**result, "watch_peak": seen})
            print(table(results[-1:], f"{mode}, {t5} T5 done"), flush=True)
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    size = "tiny" if args.tiny else "SD3-medium size"
    header = (f"{card}, torch {torch.__version__}, {size}, {args.dtype}, "
              f"{args.size}x{args.size}, {args.steps} steps, batch 1 with CFG")
    print("\n" + table(results, header))
    for r in results:
        if device == "cuda" and "error" not in r:
            t5 = "with" if r["t5"] else "without"
            print(f"{r['mode']:11s} T5 {t5:7s} GPU peak {r['gpu_peak'] / GB:.2f} GB, "
                  f"reserved {r['gpu_reserved'] / GB:.2f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "torch": torch.__version__,
                                               "args": vars(args), "results": results},
                                              indent=2))
    return results


if __name__ == "__main__":
    main()
