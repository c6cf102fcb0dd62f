"""Every case of the golden files made with the official reference implementation (float32, CPU)."""

import pytest
import torch
from helpers import Golden, close

import sd3mini
from sd3mini.flow import time_shift
from sd3mini.vae import sample_latent


# --- embeddings and schedules ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def emb():
    return Golden("embeddings")


def test_timestep_embedding(emb):
    t = emb.input("temb", "t")
    close(sd3mini.timestep_embedding(t, 256), emb.output("temb", "emb256"))
    close(sd3mini.timestep_embedding(t, 33), emb.output("temb", "emb33"))     # odd: a zero column


def test_2d_sincos_pos_embed(emb):
    dim, grid = emb.input("pos", "embed_dim").item(), emb.input("pos", "grid_size").item()
    ours = sd3mini.get_2d_sincos_pos_embed(dim, grid)
    close(ours, emb.output("pos", "grid"))
    rows = emb.input("pos", "real1536_192_rows")
    close(sd3mini.get_2d_sincos_pos_embed(1536, 192)[rows], emb.output("pos", "real1536_192"))


def test_cropped_pos_embed(emb):
    grid = emb.output("pos", "grid").unsqueeze(0)
    hw = tuple(emb.input("pos", "crop_latent_hw").tolist())
    out = sd3mini.cropped_pos_embed(grid, hw, emb.input("pos", "crop_patch_size").item())
    close(out, emb.output("pos", "cropped"))


@pytest.mark.parametrize("shift", [1, 3])
def test_schedule_tables(emb, shift):
    table = time_shift(torch.arange(1, 1001) / 1000.0, float(shift))
    close(table, emb.output("schedule", f"table_shift{shift}"), atol=1e-7)
    for steps in (1, 4, 5, 28, 40, 50):
        sig = sd3mini.get_sigmas(steps, float(shift))
        close(sig, emb.output("schedule", f"sigmas_shift{shift}_steps{steps}"), atol=1e-7)


def test_latent_format(emb):
    z = emb.input("latent_format", "z")
    close(sd3mini.process_in(z), emb.output("latent_format", "process_in"))
    close(sd3mini.process_out(z), emb.output("latent_format", "process_out"))


def test_noise(emb):
    close(sd3mini.make_noise(42, (16, 4, 6)), emb.output("noise", "seed42_1x16x4x6"), atol=0)


# --- MM-DiT ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,case", [("mmdit_sd3", "forward"), ("mmdit_sd35m", "forward"),
                                       ("mmdit_sd35m", "forward_skip")])
def test_mmdit_forward(name, case):
    g = Golden(name)
    model = sd3mini.load_mmdit(g.state_dict)
    x, t, sigma = g.input(case, "x"), g.input(case, "t"), g.input(case, "sigma")
    with torch.no_grad():
        out = model(x, t, y=g.input(case, "y"), context=g.input(case, "context"),
                    skip_layers=tuple(g.input(case, "skip_layers").tolist()))
    close(out, g.output(case, "out"))
    close(x - out * sigma, g.output(case, "denoised"))


def test_mmdit_intermediates():
    """The debug tensors: embeddings, each block's outputs, the final layer (found with hooks)."""
    g = Golden("mmdit_sd3")
    model = sd3mini.load_mmdit(g.state_dict)
    seen = {}
    hook = lambda name: lambda mod, args, out: seen.__setitem__(name, out)  # noqa: E731
    model.x_embedder.register_forward_hook(hook("x_embed"))
    model.t_embedder.register_forward_hook(hook("t_emb"))
    model.y_embedder.register_forward_hook(hook("y_emb"))
    model.context_embedder.register_forward_hook(hook("context_embedded"))
    model.final_layer.register_forward_hook(hook("final_layer"))
    for i, block in enumerate(model.joint_blocks):
        block.register_forward_hook(hook(f"block{i}"))
    with torch.no_grad():
        model(g.input("forward", "x"), g.input("forward", "t"), y=g.input("forward", "y"),
              context=g.input("forward", "context"))
    for name in ("x_embed", "t_emb", "y_emb", "context_embedded", "final_layer"):
        close(seen[name], g.debug("forward", name))
    close(seen["t_emb"] + seen["y_emb"], g.debug("forward", "c"))
    close(seen["block0"][0], g.debug("forward", "block0.context"))
    close(seen["block0"][1], g.debug("forward", "block0.x"))
    assert seen["block1"][0] is None                     # the last context block is pre-only
    close(seen["block1"][1], g.debug("forward", "block1.x"))
    t_freq = sd3mini.timestep_embedding(g.input("forward", "t"), 256)
    close(t_freq, g.debug("forward", "t_freq"))
    close(sd3mini.cropped_pos_embed(model.pos_embed, (8, 8), 2), g.debug("forward", "pos_embed_cropped"))


# --- sampling -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,case", [("mmdit_sd3", "t2i"), ("mmdit_sd3", "img2img"), ("mmdit_sd35m", "slg")])
def test_sampling(name, case):
    g = Golden(name)
    model = sd3mini.load_mmdit(g.state_dict)
    i = lambda n: g.input(case, n)  # noqa: E731
    steps, shift = int(i("steps")), i("shift").item()
    noise = sd3mini.make_noise(int(i("noise_seed")), i("noise").shape[1:])
    close(noise, i("noise"), atol=0)
    init = g.tensors.get(f"__input__.{case}.init_latent")
    denoise = i("denoise").item()
    sigmas = sd3mini.get_sigmas(steps, shift)
    close(sigmas, g.output(case, "sigmas_full"), atol=1e-7)
    if init is not None:
        close(sigmas[int(steps * (1 - denoise)):], g.output(case, "sigmas"), atol=1e-7)
    slg = None
    if case == "slg":
        slg = dict(scale=i("slg_scale").item(), start=i("slg_start").item(), end=i("slg_end").item(),
                   layers=i("slg_layers").tolist())
    x = sd3mini.sample(model, noise, (i("cond_context"), i("cond_y")), (i("uncond_context"), i("uncond_y")),
                       steps=steps, shift=shift, cfg_scale=i("cfg_scale").item(), init_latent=init, denoise=denoise,
                       slg=slg, progress=False)
    close(x, g.output(case, "x_final"), atol=5e-4)
    close(sd3mini.process_out(x), g.output(case, "latent_out"), atol=5e-4)


def test_slg_window():
    """SLG fires at exactly the steps the reference applied it (strict inequalities)."""
    g = Golden("mmdit_sd35m")
    applied = g.debug("slg", "slg_applied").tolist()
    steps, start, end = int(g.input("slg", "steps")), g.input("slg", "slg_start").item(), g.input("slg", "slg_end").item()
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args, skip_layers=(), **kw):
            calls.append(bool(skip_layers))
            return self.model(*args, skip_layers=skip_layers, **kw)

    model = Counting(sd3mini.load_mmdit(g.state_dict))
    i = lambda n: g.input("slg", n)  # noqa: E731
    sd3mini.sample(model, i("noise"), (i("cond_context"), i("cond_y")), (i("uncond_context"), i("uncond_y")),
                   steps=steps, shift=3.0, cfg_scale=4.0, slg=dict(scale=2.5, start=start, end=end, layers=[1]),
                   progress=False)
    # per step: one batched CFG call, plus one skip call where SLG applies
    per_step = []
    for skipped in calls:
        if not skipped:
            per_step.append(0)
        else:
            per_step[-1] = 1
    assert per_step == applied


# --- VAE ------------------------------------------------------------------------------------------
def test_vae():
    g = Golden("vae")
    vae = sd3mini.load_vae(g.state_dict)
    with torch.no_grad():
        moments = vae.encoder(g.input("encode", "image"))
        close(moments, g.output("encode", "moments"))
        mean, logvar = moments.chunk(2, dim=1)
        close(mean, g.output("encode", "mean"))
        close(logvar.clamp(-30, 20), g.output("encode", "logvar_clamped"))
        sample = sample_latent(moments, g.input("encode", "eps"))
        close(sample, g.output("encode", "sample"))
        close(sd3mini.process_in(sample), g.output("encode", "sample_process_in"))
        close(vae.decode(g.input("decode", "z")), g.output("decode", "image"))


def test_vae_encode_is_seeded_reparameterization():
    g = Golden("vae")
    vae = sd3mini.load_vae(g.state_dict)
    image = g.input("encode", "image")
    with torch.no_grad():
        a = vae.encode(image, generator=torch.Generator().manual_seed(5))
        b = vae.encode(image, generator=torch.Generator().manual_seed(5))
        c = vae.encode(image, generator=torch.Generator().manual_seed(6))
        eps = torch.randn(a.shape, generator=torch.Generator().manual_seed(5))
        expected = sample_latent(vae.encoder(image), eps)
    assert torch.equal(a, b) and not torch.equal(a, c)
    close(a, expected, atol=0)


# --- text encoders --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["clip_l", "clip_g"])
def test_clip(kind):
    g = Golden(kind)
    enc = sd3mini.load_text_encoder(g.state_dict, kind, num_heads=g.meta["clip_config"]["num_attention_heads"])
    with torch.no_grad():
        hidden, pooled = enc(g.input("encode", "tokens"))
    close(hidden, g.output("encode", "hidden"))
    close(pooled, g.output("encode", "pooled"))


def test_clip_l_is_unprojected_and_g_projected():
    """The golden text_projection is random: projecting L's pooled vector would not match."""
    for kind, projected in (("clip_l", "pooled_unprojected"), ("clip_g", "pooled_projected")):
        g = Golden(kind)
        close(g.output("encode", "pooled"), g.debug("encode", projected), atol=0)
    g = Golden("clip_l")
    assert not torch.allclose(g.debug("encode", "pooled_unprojected"), g.debug("encode", "pooled_projected"))


def test_t5():
    g = Golden("t5")
    enc = sd3mini.load_text_encoder(g.state_dict, "t5xxl")
    with torch.no_grad():
        hidden, pooled = enc(g.input("encode", "tokens"))
    assert pooled is None
    close(hidden, g.output("encode", "hidden"))
