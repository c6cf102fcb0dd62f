"""The diffusion formulations SD3's paper compares, as small pure functions beside ``flow.py``.

The paper ("Scaling Rectified Flow Transformers", section "Improving Rectified Flows" and its
appendix) writes every formulation as a path between data x0 and noise eps,

    z = a * x0 + b * eps,

a training distribution over that path, and what the network predicts. SD3 keeps one of them,
rectified flow (``flow.py``); the others are here so that the toy experiments can train the same
network with each and compare (chapter 16). Each path is indexed here by one number:

    t = b / (a + b)  in [0, 1]      (the rectified-flow time with the same signal-to-noise ratio a/b)

so that every formulation places its noise levels on one axis, the network hears the same
``timestep = 1000 t`` whatever the formulation, and the resolution shift ``flow.time_shift(t, alpha)``
(which multiplies the noise-to-signal ratio b/a by alpha) applies to all of them alike.

    name          path (a, b)                   trained on                     network predicts
    rf/lognorm    (1 - t, t)          rf        t = sigmoid(N(0, 1))           v = eps - x0
    rf/uniform    (1 - t, t)          rf        t ~ U(0, 1)                    v = eps - x0
    eps/linear    (sqrt(ab), sqrt(1 - ab)) vp   LDM's 1000 discrete steps      eps
    v/cos         (cos(pi r/2), sin(pi r/2)) vp r ~ U(0, 1)                    psi = a eps - b x0
    edm           (1, sigma)          ve        ln sigma ~ N(-1.2 + ln 2, 1.2^2) F (EDM's preconditioning)

``ab`` is LDM's alpha-bar: betas evenly spaced in sqrt from 0.00085 to 0.012 ("scaled linear").
EDM's numbers (P_mean -1.2, P_std 1.2, sigma from 0.002 to 80) are for data of standard deviation
sigma_data = 0.5; the toy's data have unit variance, so every sigma is doubled (ln 2 added). EDM's
sigma is the noise-to-signal ratio b/a (``flow.py``'s sigma is the noise level t).
(psi is v-prediction's target, which its authors call v; the book keeps v for the velocity eps - x0.)
Each loss is the plain mean squared error of the network's output against its own target, which is
that formulation's weighting of the common eps-loss (EDM's lambda(sigma) is folded into F's target).
"""

import math

import torch

from .flow import get_sigmas, time_shift

FORMULATIONS = ("rf/lognorm", "rf/uniform", "eps/linear", "v/cos", "edm")
PATHS = {"rf/lognorm": "rf", "rf/uniform": "rf", "eps/linear": "vp", "v/cos": "vp", "edm": "ve"}
EDM_P_MEAN, EDM_P_STD = -1.2 + math.log(2), 1.2           # sigma_data 0.5 -> 1: sigmas doubled
EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 2 * 0.002, 2 * 80.0, 7.0


def check_formulation(name: str) -> str:
    if name not in FORMULATIONS:
        raise ValueError(f"unknown formulation {name!r}; use one of {', '.join(FORMULATIONS)}")
    return name


def ldm_alphas_cumprod(n: int = 1000) -> torch.Tensor:
    """LDM's "scaled linear" schedule: (n,) alpha-bar, from 0.99915 down to 0.0047 (float64)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def path(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of ``z = a x0 + b eps`` at the noise levels t (any shape); for ``ve`` paths b is
    infinite at t = 1 (EDM never goes there)."""
    kind = PATHS[check_formulation(name)]
    if kind == "rf":
        return 1 - t, t
    if kind == "vp":                                   # a^2 + b^2 = 1 with the ratio b/a = t/(1-t)
        norm = torch.sqrt((1 - t) ** 2 + t**2)
        return (1 - t) / norm, t / norm
    return torch.ones_like(t), t / (1 - t)             # ve: a = 1, b = EDM's sigma


def train_t(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n`` training noise levels t in (0, 1), each formulation by its own rule (shift not applied)."""
    if check_formulation(name) == "rf/lognorm":
        return torch.sigmoid(torch.randn(n, generator=generator))
    if name == "rf/uniform":
        return torch.rand(n, generator=generator)
    if name == "eps/linear":                           # a uniformly drawn discrete step of LDM's schedule
        ab = ldm_alphas_cumprod()[torch.randint(0, 1000, (n,), generator=generator)]
        a, b = ab.sqrt(), (1 - ab).sqrt()
        return (b / (a + b)).float()
    if name == "v/cos":
        r = torch.rand(n, generator=generator)          # the cosine schedule's own time
        a, b = torch.cos(math.pi / 2 * r), torch.sin(math.pi / 2 * r)
        return b / (a + b)
    sigma = torch.exp(EDM_P_MEAN + EDM_P_STD * torch.randn(n, generator=generator))
    return sigma / (1 + sigma)


def sampling_t(name: str, steps: int, shift: float = 1.0) -> torch.Tensor:
    """The sampler's ``steps + 1`` noise levels t, from the highest down to 0, shifted by ``shift``.

    rf: SD3's own schedule (``flow.get_sigmas``); eps/linear: DDIM over ``steps`` of LDM's 1000 discrete
    steps, evenly spaced from the last; v/cos: its time r evenly spaced from 1 to 0; edm: Karras et al.'s
    sigma schedule with rho = 7.
    """
    if PATHS[check_formulation(name)] == "rf":
        return get_sigmas(steps, shift)
    if name == "eps/linear":
        ab = ldm_alphas_cumprod()[torch.linspace(999, 0, steps).round().long()]
        t = ((1 - ab).sqrt() / (ab.sqrt() + (1 - ab).sqrt())).float()
    elif name == "v/cos":
        r = torch.linspace(1, 0, steps + 1)[:-1]
        t = torch.sin(math.pi / 2 * r) / (torch.cos(math.pi / 2 * r) + torch.sin(math.pi / 2 * r))
    else:
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        lo, hi = EDM_SIGMA_MIN ** (1 / EDM_RHO), EDM_SIGMA_MAX ** (1 / EDM_RHO)
        sigma = (hi + ramp * (lo - hi)) ** EDM_RHO
        t = (sigma / (1 + sigma)).float()
    return torch.cat([time_shift(t, shift), torch.zeros(1)])


def _expand(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *([1] * (like.ndim - 1)))


def noisy(name: str, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z = a(t) x0 + b(t) eps, one t per batch item (B,)."""
    a, b = path(name, _expand(t, x0))
    return a * x0 + b * eps


def network_input(name: str, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network reads: z itself, or for EDM z / sqrt(1 + sigma^2) (its c_in: unit variance)."""
    if PATHS[check_formulation(name)] != "ve":
        return z
    a, b = path(name, _expand(t, z))
    return z / torch.sqrt(a**2 + b**2)


def _edm_c(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM's c_skip = 1 / (sigma^2 + 1) and c_out = sigma / sqrt(sigma^2 + 1), for sigma_data = 1."""
    return 1 / (b**2 + 1), b / torch.sqrt(b**2 + 1)


def target(name: str, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network learns to output at z = noisy(x0, eps, t)."""
    a, b = path(name, _expand(t, x0))
    if PATHS[name] == "rf":
        return eps - x0
    if name == "eps/linear":
        return eps
    if name == "v/cos":
        return a * eps - b * x0
    c_skip, c_out = _edm_c(b)                        # F = (x0 - c_skip z) / c_out
    return (x0 - c_skip * (a * x0 + b * eps)) / c_out


def loss(name: str, out: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The formulation's own training loss: mean squared error against ``target``."""
    return torch.mean((out.float() - target(name, x0, eps, t).float()) ** 2)


def predict_x0_eps(name: str, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor):
    """The network's output at (z, t) read as a clean image and a noise: (x0_hat, eps_hat), both (B, ...)."""
    a, b = path(name, _expand(t, z))
    if PATHS[name] == "rf":                          # a + b = 1: z - b v = x0, z + a v = eps
        return z - b * out, z + a * out
    if name == "eps/linear":
        return (z - b * out) / a, out
    if name == "v/cos":                              # a^2 + b^2 = 1
        return a * z - b * out, b * z + a * out
    c_skip, c_out = _edm_c(b)
    x0 = c_skip * z + c_out * out
    return x0, (z - x0) / b


def rf_velocity_error(name: str, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor, x0, eps) -> torch.Tensor:
    """The common yardstick: || (eps_hat - x0_hat) - (eps - x0) ||^2 per item (B,), i.e. rectified flow's
    loss at the same signal-to-noise ratio, whatever the network was trained to predict."""
    x0_hat, eps_hat = predict_x0_eps(name, out.float(), z, t)
    return ((eps_hat - x0_hat) - (eps - x0)).pow(2).flatten(1).mean(1)


def ddim_step(name: str, x0_hat: torch.Tensor, eps_hat: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """Move to the noise level t_next keeping the predicted clean image and noise: a' x0 + b' eps.

    This deterministic step is DDIM for the vp paths, exactly SD3's Euler step for rf, and the Euler
    step of EDM's probability-flow ODE for ve. At t_next = 0 it returns x0_hat.
    """
    if float(t_next) == 0:
        return x0_hat
    a, b = path(name, t_next)
    return a * x0_hat + b * eps_hat


def heun_step(name: str, x0_hat: torch.Tensor, eps_hat: torch.Tensor, eps_hat_next: torch.Tensor,
              t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """EDM's own sampler (Karras et al. 2022, Algorithm 1): Heun's second-order step of the ODE
    dx/dsigma = eps_hat in x = z / a, sigma = b / a. ``ddim_step`` is its Euler step; this one averages
    that slope with ``eps_hat_next``, predicted at the point the Euler step reached (t_next > 0).
    Written as a ``ddim_step`` from (x0_hat + sigma (eps_hat - eps_hat_next) / 2, the mean slope); for
    the ve path only (on the others sigma is infinite at the samplers' first level, t = 1)."""
    if PATHS[check_formulation(name)] != "ve":
        raise ValueError(f"Heun's step is EDM's sampler; {name!r} samples with ddim_step")
    a, b = path(name, t)
    slope = (eps_hat + eps_hat_next) / 2
    return ddim_step(name, x0_hat + b / a * (eps_hat - eps_hat_next) / 2, slope, t_next)
