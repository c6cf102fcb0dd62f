"""Samplers beyond the golden cases: DPM++(2M) against a transcription of the reference, input checks."""

import pytest
import torch
from helpers import Golden

import sd3mini
from sd3mini.checks import ArgumentError
from sd3mini.sampling import CFGDenoiser


def reference_dpmpp_2m(model, x, sigmas):
    """``sd3_impls.sample_dpmpp_2m`` transcribed line by line."""
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@pytest.fixture(scope="module")
def case():
    g = Golden("mmdit_sd3")
    i = lambda n: g.input("t2i", n)  # noqa: E731
    return dict(model=sd3mini.load_mmdit(g.state_dict), noise=i("noise"),
                cond=(i("cond_context"), i("cond_y")), uncond=(i("uncond_context"), i("uncond_y")))


@pytest.mark.parametrize("steps", [1, 4, 9])
def test_dpmpp_2m_matches_reference(case, steps):
    ours = sd3mini.sample(case["model"], case["noise"], case["cond"], case["uncond"], steps=steps, shift=3.0,
                          cfg_scale=5.0, sampler="dpmpp_2m", progress=False)
    denoiser = CFGDenoiser(case["model"], case["cond"], case["uncond"], 5.0)
    with torch.no_grad():
        ref = reference_dpmpp_2m(denoiser, case["noise"], sd3mini.get_sigmas(steps, 3.0))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_no_guidance_and_cfg_one(case):
    """uncond=None is one conditional pass; it equals CFG at scale 1 up to rounding."""
    kw = dict(steps=3, shift=3.0, progress=False)
    a = sd3mini.sample(case["model"], case["noise"], case["cond"], None, cfg_scale=1.0, **kw)
    b = sd3mini.sample(case["model"], case["noise"], case["cond"], case["uncond"], cfg_scale=1.0, **kw)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(steps=0), "steps must be at least 1"),
    (dict(cfg_scale=-1.0), "cfg_scale must be >= 0"),
    (dict(denoise=0.0), r"denoise must be in \(0, 1\]"),
    (dict(denoise=1.5), r"denoise must be in \(0, 1\]"),
    (dict(sampler="ddim"), "unknown sampler"),
])
def test_bad_arguments(case, kwargs, message):
    args = dict(steps=2, shift=3.0, cfg_scale=5.0, progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        sd3mini.sample(case["model"], case["noise"], case["cond"], case["uncond"], **args)


def test_noise_per_item_seed():
    batch = sd3mini.make_noise(7, (4, 2, 2), batch=3)
    for i in range(3):
        assert torch.equal(batch[i], sd3mini.make_noise(7 + i, (4, 2, 2))[0])
    torch.manual_seed(7)
    assert torch.equal(batch[0], torch.randn(1, 4, 2, 2)[0])                 # the reference's global-RNG draw


def test_progress_bar(case, capsys):
    sd3mini.sample(case["model"], case["noise"], case["cond"], case["uncond"], steps=3, shift=3.0, cfg_scale=5.0,
                   progress=True)
    assert "3/3" in capsys.readouterr().err


def test_denoise_takes_any_real_number(case):
    """numpy floats pass as they do for cfg_scale and shift (a bare isinstance(float) check refused them)."""
    np = pytest.importorskip("numpy")
    args = dict(steps=2, shift=3.0, cfg_scale=5.0, progress=False, init_latent=torch.zeros_like(case["noise"]))
    a = sd3mini.sample(case["model"], case["noise"], case["cond"], case["uncond"], denoise=np.float32(0.5), **args)
    b = sd3mini.sample(case["model"], case["noise"], case["cond"], case["uncond"], denoise=0.5, **args)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_guidance_without_uncond_is_refused(case):
    """cfg_scale 5 with uncond=None used to run unguided without a word: it is refused, on one line."""
    with pytest.raises(ArgumentError, match=r"^cfg_scale=5.0 asks for guidance, which needs uncond [^\n]*$"):
        sd3mini.sample(case["model"], case["noise"], case["cond"], None, steps=2, shift=3.0, cfg_scale=5.0,
                       progress=False)
