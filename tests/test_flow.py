"""Rectified-flow math: the path, the target, the timestep samplers and their densities."""

import math

import pytest
import torch

from sd3mini import flow


def test_path_and_target():
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.0, 0.5, 1.0])
    z = flow.interpolate(x0, noise, t)
    assert torch.equal(z[0], x0[0]) and torch.equal(z[2], noise[2])
    torch.testing.assert_close(z[1], (x0[1] + noise[1]) / 2)
    # the velocity is the derivative of the path: a finite difference recovers it exactly (a line)
    h = 1e-3
    dz = (flow.interpolate(x0, noise, t[1:2] + h) - flow.interpolate(x0, noise, t[1:2])) / h
    torch.testing.assert_close(dz, flow.velocity_target(x0, noise), atol=2e-3, rtol=1e-3)
    assert flow.flow_matching_loss(noise - x0, x0, noise) == 0


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "cosmap"])
def test_sample_t_matches_density(kind):
    t = flow.sample_t(200_000, kind, generator=torch.Generator().manual_seed(0))
    assert 0 <= t.min() and t.max() <= 1
    counts, _ = torch.histogram(t, bins=20, range=(0.0, 1.0))
    # the probability of each bin: the density integrated over it (midpoint rule, 1000 points a bin)
    fine = (torch.arange(20_000, dtype=torch.float64) + 0.5) / 20_000
    expected = flow.t_density(fine, kind).reshape(20, 1000).mean(1) * 0.05 * len(t)
    assert torch.allclose(counts.double(), expected, rtol=0.05, atol=30), (counts, expected)


def test_mode_sampler():
    u = torch.linspace(0, 1, 11)
    gen = torch.Generator().manual_seed(0)
    t = flow.sample_t(100_000, "mode", mode_scale=0.0, generator=gen)
    assert abs(t.mean().item() - 0.5) < 0.01                               # scale 0: uniform
    t = flow.sample_t(100_000, "mode", mode_scale=1.29, generator=torch.Generator().manual_seed(0))
    middle = ((t > 0.3) & (t < 0.7)).float().mean().item()
    assert middle > 0.5                                                     # mass moved to the middle
    assert u.shape == (11,)
    with pytest.raises(ValueError, match="unknown timestep sampler"):
        flow.sample_t(3, "beta")
    with pytest.raises(ValueError, match="mode_scale must be in"):
        flow.sample_t(3, "mode", mode_scale=-2.0)
    assert flow.t_density(torch.tensor([0.0, 1.0])).tolist() == [0.0, 0.0]        # logit-normal vanishes at the ends


def test_time_shift():
    t = torch.linspace(0, 1, 5)
    assert torch.equal(flow.time_shift(t, 1.0), t)
    shifted = flow.time_shift(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()
    assert math.isclose(flow.time_shift(torch.tensor(0.5), 3.0).item(), 0.75)


def test_sigmas_endpoint_is_shifted_twice():
    sig = flow.get_sigmas(4, 3.0)
    once = flow.time_shift(torch.tensor(0.001), 3.0)
    assert math.isclose(sig[-2].item(), flow.time_shift(once, 3.0).item(), rel_tol=1e-6)
    assert math.isclose(sig[-2].item(), 0.0089286, rel_tol=1e-4)
    assert sig[0] == 1 and sig[-1] == 0 and len(sig) == 5
    with pytest.raises(ValueError, match="steps must be at least 1"):
        flow.get_sigmas(0)
