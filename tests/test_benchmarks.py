"""The GPU benchmark scripts, run at a tiny size on the CPU so that they cannot rot."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import bench_memory  # noqa: E402
import bench_mmdit  # noqa: E402
import bench_vae  # noqa: E402

import sd3mini  # noqa: E402


@pytest.mark.parametrize("name", ["sd3_medium", "sd3_5_large", "sd3_5_medium"])
def test_analytic_flops_equal_the_flop_counter(name):
    cfg = getattr(sd3mini.MMDiTConfig, name)()
    with torch.device("meta"):
        model = sd3mini.MMDiT(cfg)
    for px in (512, 1024):
        assert bench_mmdit.mmdit_flops(cfg, (px // 8, px // 8)) == bench_mmdit.counted_flops(model, (px // 8, px // 8))
    if name == "sd3_medium":
        assert round(bench_mmdit.mmdit_flops(cfg, (128, 128)) / 1e12, 3) == 16.875     # the anchor's figure


def test_bench_mmdit_tiny(capsys):
    rows = bench_mmdit.main(["--tiny"])
    assert {r["impl"] for r in rows} >= {"sd3mini"} and all(r["ms"] > 0 for r in rows)
    assert "vs diffusers" in capsys.readouterr().out


def test_bench_vae_tiny(capsys):
    rows = bench_vae.main(["--tiny"])
    assert {r["impl"] for r in rows} >= {"sd3mini"}
    assert all(0 < r["min_ms"] <= r["ms"] <= r["max_ms"] for r in rows)
    out = capsys.readouterr().out
    with_diffusers = any(r["impl"] == "diffusers" for r in rows)
    assert "vs diffusers" in out and ("max |diff|" in out) == with_diffusers


def test_bench_memory_tiny(tmp_path):
    results = bench_memory.main(["--dir", str(tmp_path), "--tiny", "--modes", "none",
                                 "sequential", "--t5", "with"])
    runs = [(r["mode"], r["t5"]) for r in results]
    assert runs == [("none", True), ("sequential", True)]
    assert all("error" not in r and r["peak"] > 0 for r in results)
    assert all(set(r["phases"]) == set(bench_memory.PHASES) for r in results)
    read = [name for name, _ in results[1]["reads"]]
    assert read == ["clip_l", "clip_g", "t5", "mmdit", "vae"]


def test_random_checkpoints_have_the_official_layout(tmp_path):
    """The full-size writer's files have the manifests' keys and shapes (written here:
    part of the VAE)."""
    import json

    shapes = bench_memory.full_size_shapes()["sd3_medium.safetensors"]
    up0 = "first_stage_model.decoder.up.0."
    vae = {k: v for k, v in shapes.items() if k.startswith(up0)}
    bench_memory.write_random_safetensors(tmp_path / "vae.safetensors", vae)
    sd = sd3mini.open_state_dict(tmp_path / "vae.safetensors")
    assert {k: list(v.shape) for k, v in sd.items()} == vae and len(vae) > 10
    for key, lazy in sd.items():
        t = lazy.load()
        assert t.dtype == torch.float16 and t.isfinite().all()
        if "norm" in key and key.endswith(".weight"):
            assert (t == 1).all()
        else:
            assert t.float().std() < 0.05
    t5 = json.loads((bench_memory.MANIFESTS / "text_encoder_t5xxl.json").read_text())
    assert bench_memory.full_size_shapes()["text_encoders/t5xxl_fp16.safetensors"] == t5
