"""The MM-DiT of SD3 and SD3.5 (with the MMDiT-X dual attention of SD3.5-medium).

Module and parameter names follow the official checkpoints (``mmditx.py`` in Stability-AI/sd3.5),
so ``MMDiT(config).load_state_dict(official_state_dict)`` needs no renaming.

Shapes used in the comments:
    B batch, C latent channels (16), H x W latent size (image / 8), p patch size (2),
    T = (H/p)(W/p) image tokens, L context tokens (154), D hidden size (64 * depth), nh heads, dh = D/nh.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .keys import num_blocks, prefix_of


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MMDiTConfig:
    """The shape of an MM-DiT, read off a checkpoint by ``from_state_dict``; sd3_medium() etc. are the official ones."""

    depth: int = 24                   # number of joint blocks
    hidden_size: int = 1536           # D; 64 * depth in every official model
    num_heads: int = 24               # nh; = depth in every official model, so head_dim = 64
    patch_size: int = 2
    in_channels: int = 16             # latent channels; the model predicts as many
    pos_embed_max_size: int = 192     # M: the stored position grid is M x M patches
    adm_in_channels: int = 2048       # pooled text vector: CLIP-L 768 + CLIP-G 1280
    context_in_dim: int = 4096        # context width: T5-XXL's 4096 (CLIP states are zero-padded to it)
    mlp_ratio: float = 4.0
    qk_norm: bool = False             # RMSNorm on each head's q and k (SD3.5)
    x_block_self_attn_layers: tuple[int, ...] = ()   # MMDiT-X: blocks with a second, image-only attention

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def sd3_medium(cls) -> "MMDiTConfig":
        return cls(depth=24, hidden_size=1536, num_heads=24, pos_embed_max_size=192)

    @classmethod
    def sd3_5_large(cls) -> "MMDiTConfig":
        return cls(depth=38, hidden_size=2432, num_heads=38, pos_embed_max_size=192, qk_norm=True)

    @classmethod
    def sd3_5_medium(cls) -> "MMDiTConfig":
        return cls(depth=24, hidden_size=1536, num_heads=24, pos_embed_max_size=384, qk_norm=True,
                   x_block_self_attn_layers=tuple(range(13)))

    @classmethod
    def from_state_dict(cls, sd, keys: dict | None = None) -> "MMDiTConfig":
        """Infer the configuration from the keys and shapes of a checkpoint.

        ``sd`` maps key names (official ones with or without the ``model.diffusion_model.`` prefix) to
        anything with a ``.shape``: tensors, meta tensors, or the lazy tensors of ``sd3mini.loading``.
        ``keys`` names the tensors read (``CONFIG_KEYS``; convert.py passes the diffusers names).
        """
        keys = keys or CONFIG_KEYS
        prefix = prefix_of(sd, keys["patch"], "model.diffusion_model.", what="an MMDiT")

        def shape(name, *index):
            return tuple(sd[prefix + keys[name].format(*index)].shape)

        hidden, in_channels, patch, _ = shape("patch")
        depth = num_blocks(sd, prefix + keys["blocks"])
        qk_norm = prefix + keys["ln_q"] in sd
        # Official models use head_dim 64 (heads = depth); with qk-norm the RMSNorm weight tells it.
        head_dim = shape("ln_q")[0] if qk_norm else 64
        return cls(
            depth=depth,
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            patch_size=patch,
            in_channels=in_channels,
            pos_embed_max_size=round(math.sqrt(shape("pos_embed")[1])),
            adm_in_channels=shape("y")[1],
            context_in_dim=shape("context")[1],
            mlp_ratio=shape("fc1")[0] / hidden,
            qk_norm=qk_norm,
            x_block_self_attn_layers=tuple(i for i in range(depth) if prefix + keys["attn2"].format(i) in sd),
        )


# The tensors MMDiTConfig.from_state_dict reads, by their official names ({} is a block index).
CONFIG_KEYS = {
    "patch": "x_embedder.proj.weight",
    "pos_embed": "pos_embed",
    "y": "y_embedder.mlp.0.weight",
    "context": "context_embedder.weight",
    "blocks": "joint_blocks.",
    "fc1": "joint_blocks.0.x_block.mlp.fc1.weight",
    "ln_q": "joint_blocks.0.context_block.attn.ln_q.weight",
    "attn2": "joint_blocks.{}.x_block.attn2.qkv.weight",
}


# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------
def timestep_embedding(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the timestep (= sigma * 1000): (B,) -> (B, dim), laid out [cos | sin].

    Frequencies run geometrically from 1 down to 1/max_period. Computed in float32 whatever the
    model dtype. For an odd ``dim`` a zero column is appended.
    """
    timestep = timestep.reshape(-1)
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=timestep.device)
    freqs = torch.exp(-math.log(max_period) * steps / half)
    args = timestep[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim) laid out [sin | cos], frequencies 1 ... 1/10000 (float64)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = pos.reshape(-1, 1) * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D position embedding of a ``grid_size`` x ``grid_size`` patch grid: (grid_size**2, dim).

    Rows of the result run over the grid row-major (the order patches are flattened in). The first
    dim/2 channels encode the patch's *column*, the last dim/2 its *row*, each as [sin | cos].
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, col), _sincos_1d(dim // 2, row)], dim=1).float()


def cropped_pos_embed(pos_embed: torch.Tensor, hw: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Cut the centre (H/p) x (W/p) window out of the stored (1, M*M, D) grid: -> (1, T, D).

    Every resolution sees the middle of the same grid, so a 512 px image and a 1024 px image share
    the position codes of their centres.
    """
    side = round(math.sqrt(pos_embed.shape[1]))
    h, w = hw[0] // patch_size, hw[1] // patch_size
    if h > side or w > side:
        raise ValueError(
            f"a latent of {hw[0]}x{hw[1]} is {h}x{w} patches, more than this model's {side}x{side} position grid; "
            f"the largest image it supports is {side * patch_size * 8}x{side * patch_size * 8} pixels")
    top, left = (side - h) // 2, (side - w) // 2
    grid = pos_embed.reshape(1, side, side, -1)
    return grid[:, top:top + h, left:left + w, :].reshape(1, h * w, -1)


class PatchEmbed(nn.Module):
    """Cut the latent into p x p patches and project each to D: (B, C, H, W) -> (B, T, D).

    A stride-p convolution is exactly a linear layer applied to every flattened patch.
    """

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (B, T, D); a view, every norm would copy


def unpatchify(x: torch.Tensor, hw: tuple[int, int], patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of patchify: (B, T, p*p*C) tokens -> (B, C, H, W)."""
    p = patch_size
    h, w = hw[0] // p, hw[1] // p
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)


class TimestepEmbedder(nn.Module):
    """timestep -> 256-d sinusoid -> MLP -> (B, D)."""

    def __init__(self, dim: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, timestep, dtype):
        return self.mlp(timestep_embedding(timestep, self.frequency_embedding_size).to(dtype))


class VectorEmbedder(nn.Module):
    """Pooled text vector y (B, 2048) -> MLP -> (B, D)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, y):
        return self.mlp(y)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim; no mean subtraction, no bias.

    Computed in the input dtype, as the reference does (no float32 upcast).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(x.dtype)


class SelfAttention(nn.Module):
    """The projections around an attention: fused qkv in, optional QK-norm, proj out.

    The attention itself is done by the caller (``block_mixing``), because in a joint block the
    context and image tokens attend together.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        # QK-norm keeps attention logits from growing without bound in long, high-lr training.
        self.ln_q = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.ln_k = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()

    def pre_attention(self, x):
        """(B, N, D) -> q, k, v, each (B, nh, N, dh). The fused weight is [q; k; v], each head-major."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return self.ln_q(q), self.ln_k(k), v

    def post_attention(self, x):
        return self.proj(x)


def attention(q, k, v):
    """Plain softmax attention, no mask: (B, nh, N, dh) x3 -> (B, N, nh*dh)."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def modulate(x, shift, scale):
    """adaLN: shift and scale the normalized tokens (B, N, D) per sample with (B, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Mlp(nn.Module):
    """fc1 -> tanh-approximated GELU -> fc2, the transformer's feed-forward (names as in the checkpoints)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------------------------------
# Joint blocks
# --------------------------------------------------------------------------------------------------
class DismantledBlock(nn.Module):
    """One stream (context or image) of a joint block, split around the shared attention.

    ``adaLN_modulation(c)`` gives per-sample vectors of size D: shift_msa, scale_msa, gate_msa for the
    attention and shift_mlp, scale_mlp, gate_mlp for the MLP. The gates multiply each residual update,
    so a block whose gates are zero is the identity. Variants:
      - ``pre_only`` (the context stream of the last block): only shift_msa, scale_msa for the attention
        input; its output is never used, so there is no proj, norm2 or MLP.
      - ``dual_attention`` (MMDiT-X image stream): shift_msa2, scale_msa2, gate_msa2 for a second,
        image-only attention.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 pre_only: bool = False, dual_attention: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.dual_attention = dual_attention
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads, qk_norm, pre_only)
        if dual_attention:
            self.attn2 = SelfAttention(dim, num_heads, qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.n_mods = 2 if pre_only else 9 if dual_attention else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mods * dim))

    def pre_attention(self, x, c):
        """x (B, N, D), c (B, D) -> (q, k, v), (q2, k2, v2) or None, modulation vectors."""
        mods = self.adaLN_modulation(c).chunk(self.n_mods, dim=1)
        shift_msa, scale_msa, *_ = mods
        x_norm = self.norm1(x)
        qkv = self.attn.pre_attention(modulate(x_norm, shift_msa, scale_msa))
        qkv2 = None
        if self.dual_attention:  # same normalized input, its own shift and scale
            *_, shift_msa2, scale_msa2, _gate_msa2 = mods
            qkv2 = self.attn2.pre_attention(modulate(x_norm, shift_msa2, scale_msa2))
        return qkv, qkv2, mods

    def post_attention(self, x, attn, attn2, mods):
        """Residual updates: x + gate * proj(attention), [+ gate2 * proj2(attention2)], + gate * MLP."""
        _shift_msa, _scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *second = mods
        x = x + gate_msa.unsqueeze(1) * self.attn.post_attention(attn)
        if self.dual_attention:
            _shift_msa2, _scale_msa2, gate_msa2 = second
            x = x + gate_msa2.unsqueeze(1) * self.attn2.post_attention(attn2)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def block_mixing(context, x, context_block: DismantledBlock, x_block: DismantledBlock, c):
    """Joint attention: context (B, L, D) and image (B, T, D) tokens attend as one sequence.

    Each stream has its own weights, but q, k, v are concatenated **context first** and one
    attention runs over all L + T tokens, so text reads the image and the image reads the text.
    Returns the new (context, x); the context is None after a ``pre_only`` context block.
    """
    ctx_qkv, _, ctx_mods = context_block.pre_attention(context, c)
    x_qkv, x_qkv2, x_mods = x_block.pre_attention(x, c)
    q, k, v = (torch.cat([a, b], dim=2) for a, b in zip(ctx_qkv, x_qkv))
    out = attention(q, k, v)                                      # (B, L + T, D)
    ctx_attn, x_attn = out[:, : context.shape[1]], out[:, context.shape[1]:]
    x_attn2 = attention(*x_qkv2) if x_qkv2 is not None else None  # MMDiT-X: image-only attention
    x = x_block.post_attention(x, x_attn, x_attn2, x_mods)
    context = None if context_block.pre_only else context_block.post_attention(context, ctx_attn, None, ctx_mods)
    return context, x


class JointBlock(nn.Module):
    """One MM-DiT layer: a context stream and an image stream that share one attention (``block_mixing``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool,
                 pre_only: bool = False, dual_attention: bool = False):
        super().__init__()
        self.context_block = DismantledBlock(dim, num_heads, mlp_ratio, qk_norm, pre_only=pre_only)
        self.x_block = DismantledBlock(dim, num_heads, mlp_ratio, qk_norm, dual_attention=dual_attention)

    def forward(self, context, x, c):
        return block_mixing(context, x, self.context_block, self.x_block, c)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + linear to p*p*C values per token. Note the order: shift first."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
class MMDiT(nn.Module):
    """SD3's denoiser: predicts the flow velocity of a latent given the timestep and the text.

    Buildable on the meta device (``with torch.device("meta"): MMDiT(cfg)``); its ``state_dict()``
    keys are the official checkpoint keys without the ``model.diffusion_model.`` prefix.
    """

    def __init__(self, config: MMDiTConfig | None = None):
        super().__init__()
        self.config = config = config or MMDiTConfig()
        dim = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = VectorEmbedder(config.adm_in_channels, dim)
        self.context_embedder = nn.Linear(config.context_in_dim, dim)
        # A fixed (not learned) buffer that the official checkpoints store; loading overwrites this init.
        pos = get_2d_sincos_pos_embed(dim, config.pos_embed_max_size)
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=True)   # (1, M*M, D)
        self.joint_blocks = nn.ModuleList([
            JointBlock(dim, config.num_heads, config.mlp_ratio, config.qk_norm,
                       pre_only=(i == config.depth - 1),
                       dual_attention=(i in config.x_block_self_attn_layers))
            for i in range(config.depth)
        ])
        self.final_layer = FinalLayer(dim, config.patch_size, config.in_channels)

    def initialize_weights(self):
        """DiT's initialization for training from scratch ("adaLN-Zero").

        Every adaLN output starts at zero, so each block's gates are 0 and each block is the identity;
        the final layer starts at zero, so the first prediction is v = 0. Linear layers are Xavier-uniform,
        the timestep MLP N(0, 0.02). (Loading a checkpoint overwrites all of this.)
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        adaln = [m[-1] for name, m in self.named_modules() if name.endswith("adaLN_modulation")]
        for layer in adaln + [self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        return self

    def forward(self, x, timestep, y, context, skip_layers=()):
        """x (B, C, H, W), timestep (B,) = sigma*1000, y (B, adm), context (B, L, ctx) -> velocity (B, C, H, W).

        ``skip_layers``: indices of joint blocks to bypass entirely (skip-layer guidance).
        """
        hw = x.shape[-2:]
        x, c, context = self.embed(x, timestep, y, context)
        for i, block in enumerate(self.joint_blocks):
            if i in skip_layers:
                continue
            context, x = block(context, x, c)
        return self.unembed(x, c, hw)

    def embed(self, x, timestep, y, context):
        """The inputs as tokens: image x (B, T, D) with its positions, c (B, D), context (B, L, D)."""
        cfg = self.config
        hw = x.shape[-2:]
        if hw[0] % cfg.patch_size or hw[1] % cfg.patch_size:
            raise ValueError(f"latent size {tuple(hw)} is not divisible by the patch size {cfg.patch_size}")
        if timestep.ndim == 0:
            timestep = timestep.expand(x.shape[0])
        x = self.x_embedder(x) + cropped_pos_embed(self.pos_embed, hw, cfg.patch_size)   # (B, T, D)
        c = self.t_embedder(timestep, dtype=x.dtype) + self.y_embedder(y)                       # (B, D)
        return x, c, self.context_embedder(context)                                     # context (B, L, D)

    def unembed(self, x, c, hw):
        """Image tokens (B, T, D) -> the velocity (B, C, H, W): the final adaLN layer, then unpatchify."""
        x = self.final_layer(x, c)                                                      # (B, T, p*p*C)
        return unpatchify(x, hw, self.config.patch_size, self.config.in_channels)
