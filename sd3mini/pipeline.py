"""``SD3Pipeline``: prompt -> image with an MM-DiT, a VAE and a text encoder.

    pipe = SD3Pipeline.from_single_file("sd3_medium.safetensors")      # + text_encoders/ beside it
    image = pipe("a photo of a cat", seed=1)[0]

The steps are the reference's (``sd3_infer.SD3Inferencer.gen_image``): encode the prompt and the
negative prompt, draw seeded noise on the CPU, sample with CFG, ``process_out``, decode, and turn
[-1, 1] into 8-bit pixels.
"""

import inspect
import random
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from .checks import (ArgumentError, check_choice, check_denoise, check_dtype, check_inputs, check_prompts,
                     check_sampling, check_seed, check_slg, needs_uncond, output_size)
from .checks import check_size  # noqa: F401  (chapter 4 calls sd3mini.pipeline.check_size)
from .flow import LATENT_SCALE, LATENT_SHIFT, process_in, process_out
from .loading import (TEXT_ENCODERS, check_text_encoders, free_memory, load_mmdit, load_text_encoder, load_vae,
                      mmdit_state_dict, vae_state_dict)
from .mmdit import MMDiTConfig
from .sampling import SAMPLERS, integrate, make_noise
from .sources import diffusers_sources, single_file_sources, tokenizer_for
from .text import SD3TextEncoder
from .vae import VAEConfig, image_to_tensor, rgb_image, tensor_to_images

# Defaults per model, from the reference's sd3_infer.CONFIGS. SD3-medium: shift 3.0, not the 1.0 of
# the sd3.5 repository's CONFIGS: the SD3 release reference (sd3-ref) says "publicly released models
# use 3.0", its README runs sd3_medium with --shift 3, and diffusers' SD3-medium scheduler uses 3.0.
# 28 steps: sd3-ref notes "sd3_medium is quite decent at 28 steps" (and diffusers defaults to 28).
MODEL_DEFAULTS = {
    "sd3_medium": dict(shift=3.0, steps=28, cfg_scale=5.0, sampler="dpmpp_2m"),
    "sd3.5_large": dict(shift=3.0, steps=40, cfg_scale=4.5, sampler="dpmpp_2m"),
    "sd3.5_large_turbo": dict(shift=3.0, steps=4, cfg_scale=1.0, sampler="euler"),
    "sd3.5_medium": dict(shift=3.0, steps=50, cfg_scale=5.0, sampler="dpmpp_2m"),
    "custom": dict(shift=3.0, steps=28, cfg_scale=5.0, sampler="euler"),
}
# Skip-layer guidance of the reference (only SD3.5-medium defines it); enable with slg=True.
DEFAULT_SLG = dict(scale=2.5, start=0.01, end=0.20, layers=(7, 8, 9))
OFFLOAD_MODES = ("none", "model", "sequential")


def detect_model(config: MMDiTConfig, filename: str = "") -> str:
    """The official model a configuration belongs to ("custom" for anything else)."""
    if config == MMDiTConfig.sd3_medium():
        return "sd3_medium"
    if config == MMDiTConfig.sd3_5_large():
        return "sd3.5_large_turbo" if "turbo" in Path(str(filename)).name.lower() else "sd3.5_large"
    if config == MMDiTConfig.sd3_5_medium():
        return "sd3.5_medium"
    return "custom"


def default_dtype(device) -> torch.dtype:
    """bf16 on GPUs that compute it natively (compute capability 8 and up: Ampere and newer), fp16 on
    older ones (a Colab T4 is 7.5), fp32 on the CPU. Asked by capability: recent torch's
    ``torch.cuda.is_bf16_supported()`` also says yes on a T4, where bf16 is only emulated, and slow."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return torch.float32


def check_finite(name: str, t: torch.Tensor, hint: str):
    if not torch.isfinite(t).all():
        raise FloatingPointError(f"{name} produced inf/NaN values ({t.dtype}). {hint}")


def overflow_hint(dtype: torch.dtype, device) -> str:
    """What to try when the MM-DiT overflows: another dtype only helps a run in float16."""
    if dtype == torch.float16:
        return "Use bf16 (an Ampere or newer GPU) or float32."
    return (f"It ran in {str(dtype).replace('torch.', '')} on {torch.device(device).type}, which does not overflow "
            "on sensible inputs: lower cfg_scale, or check the weights.")


class SD3Pipeline:
    """Holds the three components and runs text -> image (and image -> image)."""

    # How a front end shows this model's pictures: enlarged ``upscale`` times, and without a progress bar
    # for runs of fewer model evaluations than ``quiet_evaluations`` (the tiny model sets both).
    upscale = 1
    quiet_evaluations = 0

    def __init__(self, mmdit, vae, text_encoder, *, model: str = "custom", device=None, offload: str = "none",
                 latent_scale: float = LATENT_SCALE, latent_shift: float = LATENT_SHIFT, defaults: dict | None = None,
                 default_size: int | None = None):
        """``defaults``: steps, cfg_scale, shift, sampler (default: ``MODEL_DEFAULTS[model]``), kept as a copy.
        ``default_size``: pixels (default: 1024, or less where the model's position grid is smaller)."""
        check_choice("offload", offload, OFFLOAD_MODES)
        self.mmdit, self.vae, self.text_encoder = mmdit, vae, text_encoder
        self.model = model
        self.defaults = dict(defaults if defaults is not None else MODEL_DEFAULTS.get(model, MODEL_DEFAULTS["custom"]))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.offload = offload
        self.latent_format = (latent_scale, latent_shift)
        self.default_size = default_size
        self.last_seed = None
        if offload == "none":
            for m in (mmdit, vae, text_encoder):
                if m is not None and not isinstance(m, OnDisk):   # None: from_sources loads it in place
                    m.to(self.device)

    # --- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_single_file(cls, path, *, clip_l=None, clip_g=None, t5xxl=None, tokenizer=None, no_t5: bool = False,
                         device=None, dtype=None, offload: str = "none", token=None) -> "SD3Pipeline":
        """An official single file (``sd3_medium.safetensors``, ``sd3.5_*.safetensors``, or a name in
        ``HUB_MODELS`` to download it). Text encoders come from the file when it bundles them, else from
        the given paths, else from ``text_encoders/`` beside the file (the Hub layout).

        ``tokenizer``: an ``SD3Tokenizer``, or a T5 tokenizer folder / Hub repo (default google/t5-v1_1-xxl);
        the CLIP tokenizer ships with sd3mini. ``no_t5``: skip T5 (see ``encode_prompt``).
        """
        if no_t5 and t5xxl is not None:
            raise ArgumentError(f"t5xxl={str(t5xxl)!r} and no_t5=True contradict each other; pass one of them")
        found = single_file_sources(path, clip_l=clip_l, clip_g=clip_g, t5xxl=t5xxl, no_t5=no_t5, token=token)
        tokenizer = tokenizer_for(tokenizer, need_t5=not no_t5, token=token)
        return cls.from_sources(found, tokenizer, name=str(path), device=device, dtype=dtype, offload=offload)

    @classmethod
    def from_pretrained(cls, path_or_repo, *, no_t5: bool = False, device=None, dtype=None, offload: str = "none",
                        token=None) -> "SD3Pipeline":
        """A diffusers-format folder (``transformer/``, ``vae/``, ``text_encoder*/``, ``tokenizer*/``), or a
        Hub repository in that layout (e.g. stabilityai/stable-diffusion-3-medium-diffusers)."""
        found, root = diffusers_sources(path_or_repo, no_t5=no_t5, token=token)
        tokenizer = tokenizer_for(root if (root / "tokenizer").is_dir() else None, need_t5="t5xxl" in found,
                                  token=token)
        return cls.from_sources(found, tokenizer, name=root.name, device=device, dtype=dtype, offload=offload)

    @classmethod
    def from_sources(cls, sources: dict, tokenizer, *, name, device, dtype, offload) -> "SD3Pipeline":
        """Build the pipeline from one opened ``sources.Source`` per component (mmdit, vae, clip_l, clip_g,
        optionally t5xxl; components of one file share its Source, so its header is read once).

        ``offload="none"``: every component on ``device``. ``"model"``: in host memory,
        each visits the device while it runs. ``"sequential"``: nothing is loaded now;
        each component is read from its file onto the device, one tensor at a time,
        right before its stage, and freed after it.
        """
        check_dtype("dtype", dtype)
        mmdit_config = MMDiTConfig.from_state_dict(mmdit_state_dict(sources["mmdit"]))
        vae_config = VAEConfig.from_state_dict(vae_state_dict(sources["vae"]))
        check_text_encoders({k: v for k, v in sources.items() if k in TEXT_ENCODERS}, mmdit_config)
        # The pipeline first (it checks offload), its components then, straight to where it keeps them.
        pipe = cls(None, None, None, model=detect_model(mmdit_config, name), device=device, offload=offload)
        dtype = dtype or default_dtype(pipe.device)
        place = pipe.device if offload != "model" else torch.device("cpu")
        lazy = offload == "sequential"

        def component(load, src, *args, dtype=dtype, **attrs):
            if lazy:   # reopened by path at each stage: no file stays memory-mapped between stages
                return OnDisk(lambda: load(src.path, *args, device=place, dtype=dtype), **attrs)
            return load(src, *args, device=place, dtype=dtype)

        pipe.mmdit = component(load_mmdit, sources["mmdit"], config=mmdit_config)
        pipe.vae = component(load_vae, sources["vae"], dtype=_vae_dtype(dtype),
                             downscale=2 ** (len(vae_config.ch_mult) - 1))
        encoders = {kind: component(load_text_encoder, src, kind) for kind, src in sources.items()
                    if kind in TEXT_ENCODERS}
        if lazy:   # the text encoders load one at a time, each when it is called
            encoders = {kind: LoadOnCall(enc.load) for kind, enc in encoders.items()}
        pipe.text_encoder = SD3TextEncoder(encoders["clip_l"], encoders["clip_g"], encoders.get("t5xxl"), tokenizer,
                                           mmdit_config.context_in_dim)
        return pipe

    # --- running ---------------------------------------------------------------------------------
    @contextmanager
    def _stage(self, component):
        """The component, on the device, for the duration of one stage.

        offload "none": it is there already. "model": it moves from host memory to the device and back.
        "sequential" (an ``OnDisk``): it is read from its file now and freed when the stage ends.
        """
        if isinstance(component, OnDisk):
            module = component.load()
            try:
                yield module
            finally:
                del module
                free_memory(self.device)
        elif self.offload == "model":
            component.to(self.device)
            try:
                yield component
            finally:
                component.to("cpu")
                free_memory(self.device)
        else:
            yield component

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt="", *, width=None, height=None, steps=None, cfg_scale=None,
                 shift=None, sampler=None, seed=None, init_image=None, denoise=None, slg=None, progress=True,
                 output="pil"):
        """Generate one image per prompt -> list of PIL images (each with ``info["parameters"]``), or with
        ``output="tensor"`` the decoded images (B, 3, H, W) in [-1, 1], before rounding to 8 bits.

        ``seed``: image i of a batch uses seed + i (None: a random seed, kept in ``self.last_seed``).
        ``init_image`` + ``denoise`` in (0, 1] (default 0.8): image-to-image. ``slg``: True for the reference's
        skip-layer guidance, or a dict(scale, start, end, layers).
        """
        prompts, negatives = check_prompts(prompt, negative_prompt)
        check_choice("output", output, ("pil", "tensor"))
        steps = steps if steps is not None else self.defaults["steps"]
        cfg_scale = cfg_scale if cfg_scale is not None else self.defaults["cfg_scale"]
        shift = shift if shift is not None else self.defaults["shift"]
        sampler = sampler or self.defaults["sampler"]
        check_sampling(steps=steps, shift=shift, cfg_scale=cfg_scale, sampler=sampler, samplers=SAMPLERS)
        denoise = check_denoise(denoise, init_image is not None, default=0.8 if init_image is not None else 1.0)
        cfg = self.mmdit.config
        slg = self._slg(slg, cfg.depth)
        init_image = None if init_image is None else rgb_image(init_image)     # 8-bit RGB, or refused now
        width, height = self.output_size(width, height, init_image)
        seed = random.randrange(2**31) if seed is None else check_seed(seed, len(prompts))
        self.last_seed = seed

        # Each stage is a method, so the modules it loaded are released when it returns.
        cond, uncond = self._encode_text(prompts, negatives if needs_uncond(cfg_scale) else None)
        noise = make_noise(seed, (cfg.in_channels, height // self.vae.downscale, width // self.vae.downscale),
                           batch=len(prompts)).to(self.device)
        init_latent = None
        if init_image is not None:
            init_latent = self._encode_image(init_image, width, height, seed).expand(len(prompts), -1, -1, -1)
        latent = self._denoise(noise, cond, uncond, steps=steps, shift=shift, cfg_scale=cfg_scale, sampler=sampler,
                               init_latent=init_latent, denoise=denoise, slg=slg,
                               progress=progress)
        decoded = self._decode(latent)
        if output == "tensor":
            return decoded.clamp(-1, 1)
        images = tensor_to_images(decoded)
        for i, im in enumerate(images):
            im.info["parameters"] = (f"prompt: {prompts[i]!r}; negative: {negatives[i]!r}; seed: {seed + i}; "
                                     f"steps: {steps}; cfg: {cfg_scale}; shift: {shift}; sampler: {sampler}; "
                                     f"size: {width}x{height}; model: {self.model}")
        return images

    def output_size(self, width=None, height=None, init_image=None) -> tuple[int, int]:
        """The (width, height) a call makes: as given; a side not given is the init image's, rounded down
        to the model's multiple (its patch in pixels), else the default. Refused if the model cannot."""
        cfg = self.mmdit.config
        pixels = cfg.patch_size * self.vae.downscale                  # per patch side
        max_size = cfg.pos_embed_max_size * pixels
        return output_size(width, height, None if init_image is None else init_image.size, multiple=pixels,
                           max_size=max_size, default=self.default_size or min(1024, max_size))  # official: 1024

    @staticmethod
    def _slg(slg, depth: int):
        """slg=True: the reference's skip-layer guidance (SD3.5-medium's layers 7, 8, 9), if this model has them."""
        if slg is True:
            if max(DEFAULT_SLG["layers"]) >= depth:
                raise ArgumentError(f"slg=True is the reference's skip-layer guidance for SD3.5-medium (layers "
                                    f"{', '.join(map(str, DEFAULT_SLG['layers']))}); this model has {depth} joint "
                                    f"blocks: pass slg=dict(scale, start, end, layers) with layers in 0-{depth - 1}")
            return dict(DEFAULT_SLG)
        if slg is False:
            return None
        return check_slg(slg, depth)

    def _encode_text(self, prompts, negatives):
        """Prompts (and negative prompts, encoded like any prompt) -> cond, uncond = (context, pooled)."""
        with self._stage(self.text_encoder) as te:
            texts = prompts + (negatives or [])
            if "names" in inspect.signature(te.encode).parameters:     # sd3mini's: a warning names its text
                names = ["prompt"] * len(prompts) + ["negative prompt"] * len(negatives or [])
                context, pooled = te.encode(texts, names=names)
            else:                                                       # any other encode(prompts)
                context, pooled = te.encode(texts)
        check_finite("the text encoder", context, "T5-XXL overflows in float16: load it with dtype=torch.float16 "
                     "through sd3mini (its feed-forward outputs stay float32), in bfloat16, or in float32.")
        context, pooled = context.to(self.device), pooled.to(self.device)
        n = len(prompts)
        return (context[:n], pooled[:n]), ((context[n:], pooled[n:]) if negatives else None)

    def _encode_image(self, image, width, height, seed):
        with self._stage(self.vae) as vae:
            pixels = image_to_tensor(image, width, height).to(self.device, _dtype(vae))
            z = vae.encode(pixels, generator=torch.Generator().manual_seed(seed)).float()
        return process_in(z, *self.latent_format)

    def _denoise(self, noise, cond, uncond, init_latent, **kwargs):
        """``sample``'s run on the arguments ``__call__`` checked; the inputs' shapes are checked here."""
        check_inputs(self.mmdit.config, noise, cond, uncond, init_latent)
        with self._stage(self.mmdit) as mmdit:
            latent = integrate(mmdit, noise, cond, uncond, init_latent=init_latent, **kwargs)
            hint = overflow_hint(_dtype(mmdit), self.device)
        check_finite("the MM-DiT", latent, hint)
        return latent

    def _decode(self, latent):
        with self._stage(self.vae) as vae:
            image = vae.decode(process_out(latent, *self.latent_format).to(_dtype(vae))).float()
        check_finite("the VAE decoder", image, "Decode in float32 or bfloat16 (sd3mini does so when the rest is float16).")
        return image


class OnDisk:
    """A component left in its file: ``load()`` reads it onto the device when its stage
    comes. ``attrs`` are what the pipeline needs to know without loading it (``config``, ``downscale``)."""

    def __init__(self, load, **attrs):
        self.load = load
        self.__dict__.update(attrs)


class LoadOnCall(OnDisk):
    """A text encoder left in its file: every call loads it, runs it and frees it (sequential offload)."""

    def __call__(self, *args, **kwargs):
        module = self.load()
        try:
            return module(*args, **kwargs)
        finally:
            device = next(module.parameters()).device
            del module
            free_memory(device)


def image_grid(images, cols: int, upscale: int = 1, gap: int = 0, *, canvas=None, first: int = 0):
    """PIL images -> one picture, ``cols`` per row, each enlarged ``upscale`` times (nearest neighbour).
    ``canvas``: paste into this picture instead, from cell ``first`` on (a grid drawn in parts)."""
    w, h = images[0].width * upscale, images[0].height * upscale
    rows = -(-len(images) // cols)
    grid = canvas or Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), "white")
    for i, im in enumerate(images, first):
        grid.paste(im.resize((w, h), Image.NEAREST), ((i % cols) * (w + gap), (i // cols) * (h + gap)))
    return grid


def _dtype(module) -> torch.dtype:
    return next(module.parameters(), torch.empty(0)).dtype


def _vae_dtype(dtype):
    """float16 VAEs can overflow (black images); decode in float32 when the rest runs in float16."""
    return torch.float32 if dtype == torch.float16 else dtype
