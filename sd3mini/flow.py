"""Rectified-flow math for SD3, as small pure functions.

SD3 moves along the straight line between an image latent ``x0`` and Gaussian noise:

    z = (1 - sigma) * x0 + sigma * noise,      sigma in [0, 1]   (0: data, 1: noise)

and the MM-DiT is trained to predict the constant velocity ``v = dz/dsigma = noise - x0``.
Sampling integrates that velocity field from sigma = 1 back to sigma = 0. The MM-DiT itself
receives ``timestep = sigma * 1000``.
"""

import math

import torch

from .checks import SHIFT_MAX, SHIFT_MIN, ArgumentError, check_int, check_shift

# --- Latent format -------------------------------------------------------------------------------
# The 16-channel VAE latents are shifted and scaled to roughly zero mean and unit variance before
# the MM-DiT sees them (values from the reference, sd3_impls.SD3LatentFormat).
LATENT_SCALE = 1.5305
LATENT_SHIFT = 0.0609


def process_in(z: torch.Tensor, latent_scale: float = LATENT_SCALE,
               latent_shift: float = LATENT_SHIFT) -> torch.Tensor:
    """VAE latent -> diffusion-model space. Apply after ``vae.encode``. (``latent_shift`` is the latent
    format's offset; the schedule's ``shift`` is ``time_shift``'s, another thing.)"""
    return (z - latent_shift) * latent_scale


def process_out(z: torch.Tensor, latent_scale: float = LATENT_SCALE,
                latent_shift: float = LATENT_SHIFT) -> torch.Tensor:
    """Diffusion-model space -> VAE latent. Apply before ``vae.decode``."""
    return z / latent_scale + latent_shift


# --- The noise schedule ----------------------------------------------------------------------------
def time_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Shift the noise level towards noise: ``shift*sigma / (1 + (shift-1)*sigma)``.

    Larger images keep more of their structure at a given noise level, so SD3 spends more of the
    schedule at high noise (paper section 5.3.2). sd3mini uses 3.0 for every official model (the SD3
    release reference; the sd3.5 repository lists 1.0 for SD3-medium).
    """
    if not SHIFT_MIN <= shift <= SHIFT_MAX:          # one comparison: training calls this every step
        check_shift("shift", shift)
    if shift == 1.0:
        return sigma
    return shift * sigma / (1 + (shift - 1) * sigma)


def get_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """The sampling schedule: ``steps + 1`` float32 sigmas from 1.0 down to 0.0.

    Exactly as the reference (``SD3Inferencer.get_sigmas``): timesteps are spaced linearly from
    1000 down to ``1000 * time_shift(1/1000)`` (the smallest *shifted* training sigma), and are then
    shifted again. So the last non-zero sigma is shifted twice: 0.008929 for shift 3, not 0.002994.
    """
    check_int("steps", steps, minimum=1)
    check_shift("shift", shift)
    sigma_min = time_shift(torch.tensor(1 / 1000, dtype=torch.float32), shift)
    timesteps = torch.linspace(1000.0, float(sigma_min * 1000), steps)
    sigmas = time_shift(timesteps / 1000.0, shift)
    return torch.cat([sigmas, torch.zeros(1)])


# --- Training: which sigma to train on (paper section 3.1) ----------------------------------------
def sample_t(n: int, kind: str = "logit_normal", *, m: float = 0.0, s: float = 1.0,
             mode_scale: float = 1.29, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n`` training noise levels sigma in (0, 1).

    - ``uniform``: sigma ~ U(0, 1).
    - ``logit_normal``: sigma = sigmoid(m + s * N(0, 1)); SD3's choice (m=0, s=1), which spends the
      training budget on the middle of the path, where predicting v is hardest.
    - ``mode``: sigma = 1 - u - mode_scale * (cos^2(pi u / 2) - 1 + u); heavier tails than logit-normal.
    - ``cosmap``: sigma = 1 - 1 / (tan(pi u / 2) + 1), the cosine schedule mapped to the straight path.
    """
    check_int("n", n, minimum=0)
    if kind == "logit_normal":
        return torch.sigmoid(m + s * torch.randn(n, generator=generator))
    u = torch.rand(n, generator=generator)
    if kind == "uniform":
        return u
    if kind == "mode":
        if not -1 <= mode_scale <= 2 / (math.pi - 2):   # outside, the map leaves [0, 1] / is not monotone
            raise ArgumentError(f"mode_scale must be in [-1, {2 / (math.pi - 2):.4f}], got {mode_scale}")
        return 1 - u - mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    if kind == "cosmap":
        return 1 - 1 / (torch.tan(math.pi / 2 * u) + 1)
    raise ArgumentError(f"unknown timestep sampler {kind!r}; use one of {TIMESTEP_SAMPLERS}")


TIMESTEP_SAMPLERS = ("uniform", "logit_normal", "mode", "cosmap")


def t_density(sigma: torch.Tensor, kind: str = "logit_normal", *, m: float = 0.0, s: float = 1.0) -> torch.Tensor:
    """Probability density of ``sample_t`` at ``sigma`` (for plots and tests; ``mode`` has no closed form)."""
    if kind == "uniform":
        return torch.ones_like(sigma)
    if kind == "logit_normal":
        inside = (sigma > 0) & (sigma < 1)
        sc = sigma.clamp(1e-12, 1 - 1e-12)
        logit = torch.log(sc / (1 - sc))
        density = torch.exp(-((logit - m) ** 2) / (2 * s**2)) / (s * math.sqrt(2 * math.pi) * sc * (1 - sc))
        return torch.where(inside, density, torch.zeros_like(sigma))   # -> 0 at both ends
    if kind == "cosmap":
        return 2 / (math.pi - 2 * math.pi * sigma + 2 * math.pi * sigma**2)
    raise ValueError(f"no closed-form density for {kind!r}")


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The point z on the straight path at noise level ``sigma``, one value per batch item, shape (B,)."""
    sigma = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict: v = dz / dsigma = noise - x0."""
    return noise - x0


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity (the paper's L_CFM)."""
    return torch.mean((v_pred.float() - velocity_target(x0, noise).float()) ** 2)
