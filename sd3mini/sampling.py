"""Sampling: integrate the MM-DiT's velocity field from noise (sigma = 1) to an image (sigma = 0).

As in the reference (``sd3_impls.py``), samplers work with the *denoised* prediction
``x0 = x - sigma * v``; classifier-free guidance mixes the x0 of a conditional and an
unconditional pass, and skip-layer guidance adds one more, conditional pass with blocks skipped.
"""

import torch
from tqdm import tqdm

from .checks import (check_denoise, check_guidance, check_inputs, check_int, check_sampling, check_seed,
                     check_slg)
from .flow import get_sigmas

SAMPLERS = ("euler", "dpmpp_2m")


def make_noise(seed: int, shape, batch: int = 1) -> torch.Tensor:
    """Gaussian noise (batch, *shape) drawn on the CPU in float32, item i from seed + i.

    Drawing on the CPU makes a seed give the same image on every device; item i of a batch is
    the same image as a single run with seed + i.
    """
    check_int("batch", batch, minimum=1)
    check_seed(seed, batch)
    return torch.cat([torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(batch)])


def model_x0(model, x, sigma, context, y, skip_layers=()):
    """The denoised prediction x0 = x - sigma * v(x, 1000 * sigma); inputs cast to the model's dtype."""
    dtype = next(model.parameters()).dtype
    timestep = (sigma * 1000).float().expand(x.shape[0]).to(x.device)
    v = model(x.to(dtype), timestep, y=y.to(dtype), context=context.to(dtype), skip_layers=skip_layers).float()
    return x - v * sigma


class CFGDenoiser:
    """x0 with classifier-free guidance: one batched call on [cond; uncond] (cond first, as the reference).

        x0 = x0_uncond + cfg_scale * (x0_cond - x0_uncond)

    With ``uncond=None`` there is no guidance: one conditional call (``sample`` allows it at cfg_scale 1 only).
    ``slg`` (skip-layer guidance): for calls strictly inside (start * steps, end * steps), one more
    conditional call with the blocks ``layers`` skipped, and ``x0 += scale * (x0_cond - x0_skip)``.
    """

    def __init__(self, model, cond, uncond, cfg_scale: float, slg: dict | None = None, steps: int = 0):
        self.model, self.cond, self.uncond, self.cfg_scale = model, cond, uncond, cfg_scale
        self.slg, self.steps = slg, steps
        self.step = 0   # counts calls: one per sampler step

    def __call__(self, x, sigma):
        context, y = self.cond
        if self.uncond is None:
            pos = out = model_x0(self.model, x, sigma, context, y)
        else:
            both = model_x0(self.model, torch.cat([x, x]), sigma, torch.cat([context, self.uncond[0]]),
                            torch.cat([y, self.uncond[1]]))
            pos, neg = both.chunk(2)
            out = neg + (pos - neg) * self.cfg_scale
        slg = self.slg
        if slg and slg["scale"] > 0 and slg["start"] * self.steps < self.step < slg["end"] * self.steps:
            skip = model_x0(self.model, x, sigma, context, y, skip_layers=tuple(slg["layers"]))
            out = out + (pos - skip) * slg["scale"]
        self.step += 1
        return out


def euler_step(x, denoised, sigma, sigma_next):
    """One Euler step along the velocity d = (x - x0) / sigma (the guided v). To sigma 0 it gives x0."""
    d = (x - denoised) / sigma
    return x + d * (sigma_next - sigma)


def dpmpp_2m_step(x, denoised, old_denoised, sigma, sigma_next, sigma_prev):
    """DPM-Solver++(2M): exact integration in log-sigma of an x0 that is linearly extrapolated from
    the last two steps. With h = log(sigma / sigma_next):  x' = (sigma_next / sigma) x - expm1(-h) x0."""
    lam, lam_next = -torch.log(sigma), -torch.log(sigma_next)      # lambda = -log sigma
    h = lam_next - lam
    if old_denoised is not None and sigma_next > 0:
        r = (lam + torch.log(sigma_prev)) / h                        # h_last / h
        denoised = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    if sigma_next == 0:
        return denoised
    return (sigma_next / sigma) * x - torch.expm1(-h) * denoised


@torch.no_grad()
def sample(model, noise, cond, uncond, *, steps: int, shift: float, cfg_scale: float, sampler: str = "euler",
           init_latent=None, denoise: float | None = None, slg: dict | None = None, progress: bool = True):
    """Run the sampler and return the final latent in model space (apply ``process_out`` before decoding).

    noise (B, C, h, w); cond / uncond = (context (B, L, 4096), pooled (B, 2048)); uncond may be None only
    at ``cfg_scale`` 1 (no guidance). ``init_latent`` (model space) for img2img: the first
    ``int(steps * (1 - denoise))`` sigmas are skipped and the start is ``sigma0 * noise + (1 - sigma0) *
    init_latent``. ``slg`` = dict(scale, start, end, layers). Every argument is checked before a step runs.
    """
    check_sampling(steps=steps, shift=shift, cfg_scale=cfg_scale, sampler=sampler, samplers=SAMPLERS)
    denoise = check_denoise(denoise, init_latent is not None, init="init_latent")
    check_guidance(cfg_scale, uncond)
    config = getattr(model, "config", None)
    slg = check_slg(slg, config.depth if config is not None else None)
    check_inputs(config, noise, cond, uncond, init_latent)
    return integrate(model, noise, cond, uncond, steps=steps, shift=shift, cfg_scale=cfg_scale, sampler=sampler,
                     init_latent=init_latent, denoise=denoise, slg=slg, progress=progress)


@torch.no_grad()
def integrate(model, noise, cond, uncond, *, steps, shift, cfg_scale, sampler, init_latent, denoise, slg,
              progress):
    """``sample`` on arguments checked already (the pipeline checks them once, before it loads anything)."""
    sigmas = get_sigmas(steps, shift).to(noise.device)
    latent = torch.zeros_like(noise)
    if init_latent is not None:
        sigmas = sigmas[int(steps * (1 - denoise)):]
        latent = init_latent.to(noise)
    x = sigmas[0] * noise + (1 - sigmas[0]) * latent   # at sigma 1 (text-to-image) this is the noise
    denoiser = CFGDenoiser(model, cond, uncond, cfg_scale, slg, steps)
    old_denoised = None
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc="sampling"):
        denoised = denoiser(x, sigmas[i])
        if sampler == "euler":
            x = euler_step(x, denoised, sigmas[i], sigmas[i + 1])
        else:
            x = dpmpp_2m_step(x, denoised, old_denoised, sigmas[i], sigmas[i + 1], sigmas[i - 1] if i > 0 else None)
        old_denoised = denoised
    return x
