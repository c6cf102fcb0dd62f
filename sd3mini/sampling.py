"""Sampling: integrate the MM-DiT's velocity field from noise (sigma = 1) to an image (sigma = 0).

As in the reference (``sd3_impls.py``), samplers work with the *denoised* prediction
``x0 = x - sigma * v``; classifier-free guidance mixes the x0 of a conditional and an
unconditional pass, and skip-layer guidance adds one more, conditional pass with blocks skipped.
"""

import torch
from tqdm import tqdm

from .checks import ArgumentError, check_cfg, check_finite_tensor, check_int, check_number, check_seed, check_shift
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
    t = (sigma * 1000).float().expand(x.shape[0]).to(x.device)
    v = model(x.to(dtype), t, y=y.to(dtype), context=context.to(dtype), skip_layers=skip_layers).float()
    return x - v * sigma


class CFGDenoiser:
    """x0 with classifier-free guidance: one batched call on [cond; uncond] (cond first, as the reference).

        x0 = x0_uncond + cfg_scale * (x0_cond - x0_uncond)

    With ``uncond=None`` there is no guidance (one conditional call). ``slg`` (skip-layer guidance):
    for calls strictly inside (start * steps, end * steps), one more conditional call with the blocks
    ``layers`` skipped, and ``x0 += scale * (x0_cond - x0_skip)``.
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
           init_latent=None, denoise: float = 1.0, slg: dict | None = None, progress: bool = True):
    """Run the sampler and return the final latent in model space (apply ``process_out`` before decoding).

    noise (B, C, h, w); cond / uncond = (context (B, L, 4096), pooled (B, 2048)), uncond may be None;
    ``init_latent`` (model space) for img2img: the first ``int(steps * (1 - denoise))`` sigmas are skipped
    and the start is ``sigma0 * noise + (1 - sigma0) * init_latent``. ``slg`` = dict(scale, start, end, layers).
    """
    check_sampling(steps=steps, shift=shift, cfg_scale=cfg_scale, sampler=sampler, denoise=denoise)
    if init_latent is None and denoise != 1.0:
        raise ArgumentError(f"denoise={denoise!r} applies to image-to-image only: pass init_latent too")
    config = getattr(model, "config", None)
    slg = check_slg(slg, config.depth if config is not None else None)
    check_inputs(config, noise, cond, uncond, init_latent)
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


# --- argument checks (before any step runs) ---------------------------------------------------------
def check_sampling(*, steps, shift, cfg_scale, sampler, denoise=1.0):
    """The scalar arguments of ``sample``: a message that names the argument, its value, what is allowed."""
    check_int("steps", steps, minimum=1)
    check_shift("shift", shift)
    check_cfg("cfg_scale", cfg_scale)
    check_number("denoise", denoise)                    # a finite real number (numpy's included)
    if not 0 < denoise <= 1:
        raise ArgumentError(f"denoise must be in (0, 1], got {denoise!r}")
    if sampler not in SAMPLERS:
        raise ArgumentError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")


SLG_KEYS = ("scale", "start", "end", "layers")


def check_slg(slg, depth: int | None):
    """None, or dict(scale >= 0, 0 <= start <= end <= 1, layers: indices of this model's joint blocks)."""
    if slg is None:
        return None
    if not isinstance(slg, dict) or set(slg) != set(SLG_KEYS):
        raise ArgumentError(f"slg must be a dict with the keys {', '.join(SLG_KEYS)} (or True in the pipeline), got {slg!r}")
    check_number("slg scale", slg["scale"], minimum=0)
    check_number("slg start", slg["start"], minimum=0, maximum=1)
    check_number("slg end", slg["end"], minimum=slg["start"], maximum=1)
    layers = slg["layers"]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ArgumentError(f"slg layers must be a non-empty list of joint-block indices, got {layers!r}")
    for layer in layers:
        check_int("slg layer", layer)
        if depth is not None and not 0 <= layer < depth:
            raise ArgumentError(f"slg layer {layer} is out of range: this model has {depth} joint blocks "
                                f"(0-{depth - 1})")
    return slg


def check_inputs(config, noise, cond, uncond, init_latent=None):
    """Shapes that fit the model and each other, and no NaN or inf in any input."""
    check_finite_tensor("noise", noise)
    if noise.ndim != 4:
        raise ArgumentError(f"noise must be (batch, channels, height, width), got shape {tuple(noise.shape)}")
    batch = noise.shape[0]
    for name, pair in (("cond", cond), ("uncond", uncond)):
        if pair is None and name == "uncond":
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ArgumentError(f"{name} must be (context, pooled), got {type(pair).__name__}")
        context, pooled = pair
        check_finite_tensor(f"{name} context", context)
        check_finite_tensor(f"{name} pooled", pooled)
        if context.ndim != 3 or pooled.ndim != 2 or context.shape[0] != batch or pooled.shape[0] != batch:
            raise ArgumentError(f"{name} has context {tuple(context.shape)} and pooled {tuple(pooled.shape)}; "
                                f"for noise of batch {batch} they must be ({batch}, L, C) and ({batch}, C)")
    if uncond is not None and uncond[0].shape != cond[0].shape:
        raise ArgumentError(f"uncond context {tuple(uncond[0].shape)} and cond context {tuple(cond[0].shape)} "
                            "must have the same shape")
    if init_latent is not None:
        check_finite_tensor("init_latent", init_latent)
        if init_latent.shape != noise.shape:
            raise ArgumentError(f"init_latent has shape {tuple(init_latent.shape)}; it must match noise "
                                f"{tuple(noise.shape)}")
    if config is not None:
        _check_fits_model(config, noise, cond)


def _check_fits_model(config, noise, cond):
    channels, h, w = noise.shape[1:]
    largest = config.pos_embed_max_size * config.patch_size
    if channels != config.in_channels:
        raise ArgumentError(f"noise has {channels} channels; this model takes {config.in_channels}")
    if h % config.patch_size or w % config.patch_size:
        raise ArgumentError(f"noise is {h}x{w}; this model needs sizes divisible by its patch size "
                            f"{config.patch_size}")
    if h > largest or w > largest:
        raise ArgumentError(f"noise is {h}x{w}, larger than this model takes: at most {largest}x{largest} "
                            f"(its {config.pos_embed_max_size}x{config.pos_embed_max_size} position grid of "
                            f"{config.patch_size}x{config.patch_size} patches)")
    context, pooled = cond
    if context.shape[-1] != config.context_in_dim or pooled.shape[-1] != config.adm_in_channels:
        raise ArgumentError(f"cond has context width {context.shape[-1]} and pooled width {pooled.shape[-1]}; "
                            f"this model takes {config.context_in_dim} and {config.adm_in_channels}")
