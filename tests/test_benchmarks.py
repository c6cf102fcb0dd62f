"""The GPU benchmark scripts, run at a tiny size on the CPU so that they cannot rot."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import bench_memory  # noqa: E402
import bench_mmdit  # noqa: E402

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


def test_bench_memory_tiny(tmp_path):
    results = bench_memory.main(["--dir", str(tmp_path), "--tiny", "--modes", "none", "sequential"])
    assert [r["mode"] for r in results] == ["none", "sequential"]
    assert all("error" not in r and r["rss_peak_gib"] > 0 for r in results)
