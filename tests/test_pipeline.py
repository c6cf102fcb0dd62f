"""SD3Pipeline end to end on tiny random weights (CPU, float32)."""

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import GOLDEN, tiny_pipeline, tiny_t5_tokenizer, tiny_text_encoders
from PIL import Image

import sd3mini
from sd3mini.loading import save_single_file
from sd3mini.pipeline import detect_model

KW = dict(width=64, height=64, steps=3, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_same_seed_same_pixels(pipe):
    a, b = pipe("a red circle", seed=3, **KW), pipe("a red circle", seed=3, **KW)
    assert pipe.last_seed == 3
    assert a[0].size == (64, 64) and a[0].mode == "RGB"
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(pipe("a red circle", seed=4, **KW)))
    assert pixels(a).std() > 1                                              # not a constant image
    assert "seed: 3" in a[0].info["parameters"]


def test_model_offload_gives_the_same_pixels(pipe):
    """offload="model": each component visits the device for its own stage only (moved there before it runs,
    moved back after), and the pixels are those of the resident pipeline."""
    offloaded = tiny_pipeline(offload="model")
    events = []

    def record(obj, name, method, what):
        real = getattr(obj, method)
        setattr(obj, method, lambda *a, **k: events.append(f"{name} {what}") or real(*a, **k))

    for name, module, run in (("text", offloaded.text_encoder, "encode"), ("mmdit", offloaded.mmdit, "forward"),
                              ("vae", offloaded.vae, "decode")):
        record(module, name, "to", "moved")
        record(module, name, run, "runs")
    images = offloaded("a cat", seed=1, **KW)
    runs = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]          # 3 mmdit steps -> one entry
    assert runs == ["text moved", "text runs", "text moved", "mmdit moved", "mmdit runs", "mmdit moved",
                    "vae moved", "vae runs", "vae moved"]
    assert np.array_equal(pixels(pipe("a cat", seed=1, **KW)), pixels(images))


def test_batch_item_i_uses_seed_plus_i(pipe):
    batch = pipe(["a red circle", "a blue square"], seed=10, **KW)
    single = pipe("a blue square", seed=11, **KW)
    assert len(batch) == 2
    assert np.abs(pixels(batch[1:]).astype(int) - pixels(single).astype(int)).max() <= 1   # batch-size rounding


def test_random_seed_is_reported(pipe):
    images = pipe("a cat", **KW)
    seed = pipe.last_seed
    assert np.array_equal(pixels(images), pixels(pipe("a cat", seed=seed, **KW)))


class SkipBlock(torch.nn.Module):
    """A joint block that does nothing: (context, x) pass through, for a reference of skip-layer guidance."""

    def forward(self, context, x, c):
        return context, x


@torch.no_grad()
def reference(pipe, prompt, negative="", *, seed, steps=3, cfg=5.0, shift=3.0, sampler="euler", init=None,
              denoise=1.0, slg_scale=0.0, slg_block=0):
    """The pipeline's steps written out from its parts (not ``SD3Pipeline.__call__`` nor ``sample``): seeded
    noise, CFG on [cond; uncond], SLG with a copy of the MM-DiT whose block is removed, Euler or DPM++(2M)."""
    from test_sampling import reference_dpmpp_2m

    from sd3mini.vae import image_to_tensor, tensor_to_images

    context, pooled = pipe.text_encoder.encode([prompt, negative])
    skipped = copy.deepcopy(pipe.mmdit)
    skipped.joint_blocks[slg_block] = SkipBlock()

    def x0(model, x, sigma, ctx, y):
        return x - model(x, (sigma * 1000).expand(len(x)), y=y, context=ctx) * sigma

    step = [0]

    def denoised(x, sigma):
        pos, neg = x0(pipe.mmdit, torch.cat([x, x]), sigma, context, pooled).chunk(2)
        out = neg + cfg * (pos - neg)
        if slg_scale and 0 < step[0] < steps:                   # start 0, end 1: every step but the first
            out = out + slg_scale * (pos - x0(skipped, x, sigma, context[:1], pooled[:1]))
        step[0] += 1
        return out

    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    sigmas = sd3mini.get_sigmas(steps, shift)
    x = noise
    if init is not None:
        z = pipe.vae.encode(image_to_tensor(init, 64, 64), generator=torch.Generator().manual_seed(seed))
        sigmas = sigmas[int(steps * (1 - denoise)):]
        x = sigmas[0] * noise + (1 - sigmas[0]) * sd3mini.process_in(z)
    if sampler == "dpmpp_2m":
        x = reference_dpmpp_2m(denoised, x, sigmas)
    else:
        for i in range(len(sigmas) - 1):
            x = x + (x - denoised(x, sigmas[i])) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return pixels(tensor_to_images(pipe.vae.decode(sd3mini.process_out(x))))


def assert_same(images, expected):
    assert np.abs(pixels(images).astype(int) - expected.astype(int)).max() <= 1    # at most float rounding


def test_negative_prompt_and_guidance_change_the_image(pipe):
    with_negative = pipe("a cat", "a dog", seed=0, **KW)
    assert_same(with_negative, reference(pipe, "a cat", "a dog", seed=0))
    assert np.abs(pixels(with_negative).astype(int) - reference(pipe, "a cat", "", seed=0)).max() > 10   # it is used
    assert_same(pipe("a cat", seed=0, cfg_scale=1.0, **KW), reference(pipe, "a cat", seed=0, cfg=1.0))


def test_img2img_and_slg_and_samplers(pipe):
    init = Image.fromarray((np.arange(64 * 64 * 3) % 255).astype(np.uint8).reshape(64, 64, 3))
    out = pipe("a cat", seed=0, init_image=init, denoise=0.5, steps=4, progress=False)
    assert out[0].size == (64, 64)
    assert_same(out, reference(pipe, "a cat", seed=0, steps=4, init=init, denoise=0.5))
    slg = dict(scale=2.5, start=0.0, end=1.0, layers=[0])
    assert_same(pipe("a cat", seed=0, slg=slg, **KW), reference(pipe, "a cat", seed=0, slg_scale=2.5))
    assert_same(pipe("a cat", seed=0, sampler="dpmpp_2m", **KW), reference(pipe, "a cat", seed=0, sampler="dpmpp_2m"))
    plain = reference(pipe, "a cat", seed=0)                               # and each of them changes the image
    for images in (out, pipe("a cat", seed=0, slg=slg, **KW), pipe("a cat", seed=0, sampler="dpmpp_2m", **KW)):
        assert np.abs(pixels(images).astype(int) - plain).max() > 10


@pytest.mark.parametrize("kwargs,message", [
    (dict(width=100), "width 100 is not a multiple of 16; the nearest valid sizes are 96 and 112"),
    (dict(height=72), "height 72 is not a multiple of 16; the nearest valid sizes are 64 and 80"),
    (dict(width=256), "larger than this model supports: the maximum is 128 pixels"),
    (dict(steps=0), "steps must be at least 1"),
    (dict(cfg_scale=-2.0), "cfg_scale must be >= 0"),
])
def test_bad_arguments(pipe, kwargs, message):
    args = dict(KW) | kwargs
    with pytest.raises(ValueError, match=message):
        pipe("a cat", **args)


def test_bad_denoise(pipe):
    init = Image.new("RGB", (64, 64))
    for denoise in (0.0, 1.2):
        with pytest.raises(ValueError, match=r"denoise must be in \(0, 1\]"):
            pipe("a cat", init_image=init, denoise=denoise, **KW)


def test_long_prompt_warns(pipe):
    with pytest.warns(UserWarning) as caught:          # CLIP truncates at 77 tokens, T5 at 226 characters
        pipe(" ".join(["cat"] * 90), seed=0, **KW)
    messages = [str(w.message) for w in caught]
    assert any("truncated" in m for m in messages) and any("226 characters" in m for m in messages), messages


def test_non_finite_component_is_named(pipe, monkeypatch):
    def overflow(prompts):
        return torch.full((len(prompts), 154, 256), float("inf")), torch.zeros(len(prompts), 192)

    monkeypatch.setattr(pipe.text_encoder, "encode", overflow)
    with pytest.raises(FloatingPointError, match="text encoder.*T5-XXL overflows in float16"):
        pipe("a cat", seed=0, **KW)


def test_from_single_file_with_bundled_text_encoders(pipe, tmp_path):
    encs = tiny_text_encoders()
    path = tmp_path / "tiny_incl_clips_t5.safetensors"
    save_single_file(path, mmdit=pipe.mmdit, vae=pipe.vae, clip_l=encs["clip_l"], clip_g=encs["clip_g"],
                     t5xxl=encs["t5xxl"])
    tokenizer = sd3mini.SD3Tokenizer(t5=tiny_t5_tokenizer())
    loaded = sd3mini.SD3Pipeline.from_single_file(path, tokenizer=tokenizer, device="cpu")
    assert loaded.model == "custom" and loaded.text_encoder.t5 is not None
    assert np.array_equal(pixels(pipe("a red circle", seed=5, **KW)), pixels(loaded("a red circle", seed=5, **KW)))


def test_from_single_file_with_text_encoders_beside_it(pipe, tmp_path):
    """The Hub layout: sd3_medium.safetensors with text_encoders/clip_l.safetensors ... next to it."""
    encs = tiny_text_encoders()
    save_single_file(tmp_path / "model.safetensors", mmdit=pipe.mmdit, vae=pipe.vae)
    for kind, name in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5xxl", "t5xxl_fp16")):
        sd = {k: v for k, v in encs[kind].transformer.state_dict().items() if k != "encoder.embed_tokens.weight"}
        sd3mini.checkpoint.save_state_dict(sd, tmp_path / "text_encoders" / f"{name}.safetensors")
    no_t5 = sd3mini.SD3Pipeline.from_single_file(tmp_path / "model.safetensors", no_t5=True, device="cpu")
    assert no_t5.text_encoder.t5 is None
    no_t5("a cat", seed=0, **KW)
    with pytest.raises(FileNotFoundError, match="no t5xxl text encoder"):
        (tmp_path / "text_encoders" / "t5xxl_fp16.safetensors").unlink()
        sd3mini.SD3Pipeline.from_single_file(tmp_path / "model.safetensors",
                                             tokenizer=sd3mini.SD3Tokenizer(t5=tiny_t5_tokenizer()), device="cpu")


def test_sequential_offload_loads_each_stage_and_frees_it(pipe, tmp_path):
    """offload="sequential": nothing is loaded up front; each component is read from its file for its stage
    and released after it, and the pixels are the same as with everything resident."""
    import weakref

    from sd3mini.pipeline import LoadOnCall, OnDisk

    encs = tiny_text_encoders()
    path = tmp_path / "tiny_incl_clips_t5.safetensors"
    save_single_file(path, mmdit=pipe.mmdit, vae=pipe.vae, clip_l=encs["clip_l"], clip_g=encs["clip_g"],
                     t5xxl=encs["t5xxl"])
    seq = sd3mini.SD3Pipeline.from_single_file(path, tokenizer=sd3mini.SD3Tokenizer(t5=tiny_t5_tokenizer()),
                                               device="cpu", offload="sequential")
    components = [seq.mmdit, seq.vae, seq.text_encoder.clip_l, seq.text_encoder.clip_g, seq.text_encoder.t5]
    assert isinstance(seq.mmdit, OnDisk) and isinstance(seq.text_encoder.t5, LoadOnCall)
    loaded = []
    for comp in components:
        comp.load = (lambda load: lambda: loaded.append(weakref.ref(m := load())) or m)(comp.load)
    images = seq("a red circle", seed=5, **KW)
    assert np.array_equal(pixels(images), pixels(pipe("a red circle", seed=5, **KW)))
    assert len(loaded) == 5                                     # each component read exactly once
    assert all(ref() is None for ref in loaded)                 # and none of them is still alive


def test_from_pretrained_diffusers_folder(pipe, tmp_path):
    from sd3mini.convert import save_diffusers

    encs = tiny_text_encoders()
    tokenizer = sd3mini.SD3Tokenizer(t5=tiny_t5_tokenizer())
    save_diffusers(tmp_path, mmdit=pipe.mmdit, vae=pipe.vae, clip_l=encs["clip_l"], clip_g=encs["clip_g"],
                   t5=encs["t5xxl"], tokenizer=tokenizer)
    loaded = sd3mini.SD3Pipeline.from_pretrained(tmp_path, device="cpu")
    assert np.array_equal(pixels(pipe("a red circle", seed=2, **KW)), pixels(loaded("a red circle", seed=2, **KW)))


def test_detect_model():
    assert detect_model(sd3mini.MMDiTConfig.sd3_medium()) == "sd3_medium"
    assert detect_model(sd3mini.MMDiTConfig.sd3_5_large(), "sd3.5_large_turbo.safetensors") == "sd3.5_large_turbo"
    assert detect_model(sd3mini.MMDiTConfig.sd3_5_large(), "sd3.5_large.safetensors") == "sd3.5_large"
    assert detect_model(sd3mini.MMDiTConfig.sd3_5_medium()) == "sd3.5_medium"
    assert detect_model(sd3mini.load_mmdit(GOLDEN / "mmdit_sd3.safetensors").config) == "custom"


STATUS = Path("/proc/self/status")


@pytest.mark.skipif(sd3mini.loading._malloc_trim() is None or not STATUS.exists(),
                    reason="glibc's malloc_trim and Linux's /proc/self/status")
def test_free_memory_gives_freed_host_memory_back():
    """Memory a dropped component held in small blocks leaves the RSS between stages:
    glibc keeps it otherwise (0.5 GB of CLIP-G's stayed through T5's stage in sequential
    mode)."""
    def anonymous():
        return int(re.search(r"RssAnon:\s+(\d+)", STATUS.read_text()).group(1)) * 1024

    blocks = [torch.ones(25_000) for _ in range(2_000)]   # 2 000 x 100 kB, on the heap
    kept = blocks[::20]                     # a few kept: the heap cannot shrink itself
    del blocks
    before = anonymous()
    sd3mini.loading.free_memory("cpu")
    assert before - anonymous() > 100e6                    # of the 190 MB freed
    assert len(kept) == 100
