"""SD3's 16-channel VAE (``SDVAE``), with the official module names (``first_stage_model.*``).

An 8x-downsampling convolutional autoencoder in the LDM layout: the encoder maps an image in
[-1, 1] to the mean and log-variance of a diagonal Gaussian over a 16-channel latent; the decoder
maps a latent back to an image. There is no quant_conv / post_quant_conv (unlike SD1/SDXL).

Shapes: image (B, 3, H, W) <-> latent (B, 16, H/8, W/8) for the real configuration.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .checks import ArgumentError
from .keys import num_blocks, prefix_of


@dataclass(frozen=True)
class VAEConfig:
    """The shape of the VAE; ``VAEConfig()`` is SD3's, ``from_state_dict`` reads it off a checkpoint."""

    ch: int = 128                        # channels at full resolution
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)   # channel multiplier per level; len - 1 downsamplings
    num_res_blocks: int = 2
    in_channels: int = 3
    z_channels: int = 16

    @classmethod
    def from_state_dict(cls, sd, keys: dict | None = None) -> "VAEConfig":
        """Infer the configuration from official VAE keys (with or without ``first_stage_model.``).

        ``keys`` names the tensors read (``CONFIG_KEYS``; convert.py passes the diffusers names).
        """
        keys = keys or CONFIG_KEYS
        prefix = prefix_of(sd, keys["conv_in"], "first_stage_model.", what="an SD3 VAE")
        ch, in_channels = tuple(sd[prefix + keys["conv_in"]].shape)[:2]
        levels = num_blocks(sd, prefix + keys["levels"])
        ch_mult = tuple(sd[prefix + keys["conv1"].format(i)].shape[0] // ch for i in range(levels))
        return cls(ch=ch, ch_mult=ch_mult, num_res_blocks=num_blocks(sd, prefix + keys["blocks"]),
                   in_channels=in_channels, z_channels=sd[prefix + keys["z"]].shape[1])


# The tensors VAEConfig.from_state_dict reads, by their official names ({} is a level index).
CONFIG_KEYS = {
    "conv_in": "encoder.conv_in.weight",
    "levels": "encoder.down.",
    "blocks": "encoder.down.0.block.",
    "conv1": "encoder.down.{}.block.0.conv1.weight",
    "z": "decoder.conv_in.weight",
}


def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, the LDM VAE's only normalization."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv3x3, twice, plus a (1x1 when the width changes) skip connection."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (the middle of the encoder and decoder)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        hidden = self.norm(x)
        q, k, v = (t(hidden).reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)           # (B, 1, HW, C), scale 1/sqrt(C)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halve the resolution: pad right/bottom by one, then a stride-2 3x3 conv (no symmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks) and optionally ``downsample`` / ``upsample``."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None = None, name: str = "downsample"):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = name
        if resample is not None:
            self.add_module(name, resample)

    def forward(self, x):
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return resample(x) if resample is not None else x


class Mid(nn.Module):
    """The lowest resolution: ResnetBlock -> AttnBlock -> ResnetBlock."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class VAEEncoder(nn.Module):
    """(B, 3, H, W) -> (B, 2*z, H/2^(levels-1), W/2^(levels-1)): mean and log-variance."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(cfg.num_res_blocks)]
            block_in = block_out
            last = i == len(cfg.ch_mult) - 1
            self.down.append(Level(blocks, None if last else Downsample(block_in), "downsample"))
        self.mid = Mid(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAEDecoder(nn.Module):
    """(B, z, h, w) -> (B, 3, h*2^(levels-1), w*2^(levels-1)). Output is not clamped.

    ``up[i]`` is resolution level i (``up.0`` is full resolution); they run from the coarsest up.
    Each level has num_res_blocks + 1 ResnetBlocks.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = Mid(block_in)
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(cfg.num_res_blocks + 1)]
            block_in = block_out
            levels.insert(0, Level(blocks, None if i == 0 else Upsample(block_in), "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def sample_latent(moments: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The reparameterization trick: z = mean + std * noise, with noise ~ N(0, I).

    ``moments`` (B, 2z, h, w) is the encoder output [mean | log-variance]; writing the sample as
    a deterministic function of (mean, logvar) and outside noise lets gradients reach the encoder.
    """
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    return mean + torch.exp(0.5 * logvar) * noise


class SDVAE(nn.Module):
    """SD3's VAE. ``SDVAE()`` is the real configuration (83.8 M parameters)."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        self.encoder = VAEEncoder(config)
        self.decoder = VAEDecoder(config)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> a sampled latent (B, 16, H/8, W/8), *before* ``process_in``.

        The noise is drawn with ``generator`` on the generator's device (CPU by default), then moved.
        """
        moments = self.encoder(image)
        shape = (moments.shape[0], moments.shape[1] // 2, *moments.shape[2:])
        gen_device = generator.device if generator is not None else "cpu"
        noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
        return sample_latent(moments, noise.to(device=moments.device, dtype=moments.dtype))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, 16, h, w), *after* ``process_out`` -> image (B, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(z)


# --- Images <-> tensors ---------------------------------------------------------------------------
def rgb_image(image, name: str = "init_image") -> Image.Image:
    """Any PIL image -> 8-bit RGB. PIL's own ``convert`` clips grey images of more than 8 bits (a 16-bit
    50 % grey becomes white) and float ones (0.5 becomes black); those are scaled here instead: 16-bit by
    1/257, 32-bit integers (mode I: no bit depth is declared) by the smallest of 2**8 - 1, 2**16 - 1,
    2**32 - 1 that holds their largest value, floats (mode F) from [0, 1], refused outside it."""
    if not hasattr(image, "size") or not hasattr(image, "convert"):
        raise ArgumentError(f"{name} must be a PIL image, got {type(image).__name__}")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        a = np.asarray(image).astype(np.float64)                     # (H, W)
        lo, hi = (a.min(), a.max()) if a.size else (0.0, 0.0)
        if image.mode == "F" and not (np.isfinite(a).all() and 0 <= lo and hi <= 1):
            raise ArgumentError(f"{name} is a float image (mode F) with values in [{lo:g}, {hi:g}]; sd3mini reads "
                                "float images as [0, 1] (0 black, 1 white): rescale it")
        if lo < 0:
            raise ArgumentError(f"{name} is a 32-bit integer image (mode I) with negative values (down to {lo:g}); "
                                "sd3mini reads integer images as 0 = black: rescale it")
        top = 1 if image.mode == "F" else 65535 if image.mode.startswith("I;16") else \
            next(2**bits - 1 for bits in (8, 16, 32, 64) if hi <= 2**bits - 1)
        image = Image.fromarray(np.round(a / top * 255).astype(np.uint8))
    return image.convert("RGB")


def image_to_tensor(image: Image.Image, width: int | None = None, height: int | None = None) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1], resized with Lanczos when a size is given."""
    image = rgb_image(image, "image")
    if width is not None and height is not None and image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (2 * x - 1).unsqueeze(0)


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images: clamp((x+1)/2) * 255, truncated to uint8 as the reference."""
    x = ((x.float().clamp(-1, 1) + 1) / 2).clamp(0, 1)   # clamp twice: NaN-safe and exact at the ends
    arr = (x.permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
