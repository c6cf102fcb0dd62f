"""The text-to-image backbones SD3's paper compares with its MM-DiT, at toy size.

Section "Improved Text-to-Image Backbones" of the paper trains the same data with different ways of
letting image tokens read the text. All three share SD3's embeddings (patches, positions, the timestep
and pooled-text vector c, adaLN-Zero) and its final layer; they differ only in the blocks:

    MM-DiT    two weight sets per block (text, image), one joint attention over [text; image]   (SD3)
    DiT       one weight set per block for the concatenated [text; image] sequence
    CrossDiT  image tokens attend to themselves, then cross-attend to the (fixed) text tokens

``MMDiT`` itself is ``sd3mini.MMDiT``; the other two are built here from its pieces.
Shapes: x (B, C, H, W), timestep (B,), y (B, Dy), context (B, L, Dc); T image tokens, D width.
"""

from dataclasses import replace

import torch
from torch import nn

from ..mmdit import MMDiT, MMDiTConfig, Mlp, RMSNorm, attention, modulate

BACKBONES = ("mmdit", "dit", "crossdit")


class SingleStreamBlock(nn.Module):
    """DiT's block over one sequence: adaLN-Zero (6 vectors from c), attention, MLP, one set of weights."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ln_q, self.ln_k = RMSNorm(dim // heads), RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):                       # x (B, N, D), c (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        b, n, _ = x.shape
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).reshape(b, n, 3, self.heads, -1) \
            .permute(2, 0, 3, 1, 4)
        x = x + gate1.unsqueeze(1) * self.proj(attention(self.ln_q(q), self.ln_k(k), v))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class CrossBlock(nn.Module):
    """CrossDiT's block: self-attention over image tokens, cross-attention from them to the text, MLP;
    adaLN-Zero with 9 vectors from c (shift, scale, gate for each of the three)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_block = SingleStreamBlock(dim, heads)    # its adaLN makes 6 of the 9 vectors
        self.norm_x = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.ln_q, self.ln_k = RMSNorm(dim // heads), RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))   # the other 3
        self.heads = heads

    def forward(self, x, context, c):              # x (B, T, D), context (B, L, D)
        x = self.self_block(x, c)
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)
        b, t, _ = x.shape
        q = self.q(modulate(self.norm_x(x), shift, scale)).reshape(b, t, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return x + gate.unsqueeze(1) * self.proj(attention(self.ln_q(q), self.ln_k(k), v))


class ToyBackbone(MMDiT):
    """DiT or CrossDiT: ``sd3mini.MMDiT``'s embeddings, final layer and initialization around other blocks.

    ``forward`` has MMDiT's signature, so the sampler and the training loop take any of the three.
    """

    def __init__(self, kind: str, config: MMDiTConfig):
        super().__init__(replace(config, depth=1))      # the embeddings and the final layer
        self.joint_blocks = nn.ModuleList()
        self.config, self.kind = config, kind
        block = SingleStreamBlock if kind == "dit" else CrossBlock
        self.blocks = nn.ModuleList([block(config.hidden_size, config.num_heads) for _ in range(config.depth)])

    def forward(self, x, timestep, y, context, skip_layers=()):
        hw = x.shape[-2:]
        x, c, context = self.embed(x, timestep, y, context)                              # MMDiT's
        if self.kind == "dit":
            tokens = torch.cat([context, x], dim=1)                                      # (B, L + T, D)
            for block in self.blocks:
                tokens = block(tokens, c)
            x = tokens[:, context.shape[1]:]
        else:
            for block in self.blocks:
                x = block(x, context, c)
        return self.unembed(x, c, hw)


def build_backbone(kind: str, config: MMDiTConfig) -> nn.Module:
    """An initialized backbone of the given kind ("mmdit", "dit", "crossdit") and shape."""
    if kind not in BACKBONES:
        raise ValueError(f"unknown backbone {kind!r}; use one of {', '.join(BACKBONES)}")
    model = MMDiT(config) if kind == "mmdit" else ToyBackbone(kind, config)
    return model.initialize_weights()
