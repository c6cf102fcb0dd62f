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
    assert {r["impl"] for r in rows} >= {"sd3mini"} and all(0 < r["min_ms"] <= r["ms"] <= r["max_ms"] for r in rows)
    out = capsys.readouterr().out
    assert "vs diffusers" in out and ("max |diff|" in out) == any(r["impl"] == "diffusers" for r in rows)


def test_bench_memory_tiny(tmp_path):
    results = bench_memory.main(["--dir", str(tmp_path), "--tiny", "--modes", "none", "sequential",
                                 "--t5", "with"])
    assert [(r["mode"], r["t5"]) for r in results] == [("none", True), ("sequential", True)]
    assert all("error" not in r and r["peak"] > 0 and set(r["phases"]) == set(bench_memory.PHASES)
               for r in results)
    assert [name for name, _ in results[1]["reads"]] == ["clip_l", "clip_g", "t5", "mmdit", "vae"]


def test_random_checkpoints_have_the_official_layout(tmp_path):
    """The full-size writer's files carry the manifests' keys and shapes; checked here on the VAE."""
    import json

    shapes = bench_memory.full_size_shapes()["sd3_medium.safetensors"]
    vae = {k: v for k, v in shapes.items() if k.startswith("first_stage_model.decoder.up.0.")}
    bench_memory.write_random_safetensors(tmp_path / "vae.safetensors", vae)
    sd = sd3mini.open_state_dict(tmp_path / "vae.safetensors")
    assert {k: list(v.shape) for k, v in sd.items()} == vae and len(vae) > 10
    for key, lazy in sd.items():
        t = lazy.load()
        assert t.dtype == torch.float16 and t.isfinite().all()
        assert (t == 1).all() if "norm" in key and key.endswith(".weight") else t.float().std() < 0.05
    assert json.loads((bench_memory.MANIFESTS / "text_encoder_t5xxl.json").read_text()) == \
        bench_memory.full_size_shapes()["text_encoders/t5xxl_fp16.safetensors"]
