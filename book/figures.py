"""Draw the book's static diagrams as committed SVG files, so the built book needs no diagram CDN.

    python book/figures.py          # writes book/images/sd3_system.svg and book/images/mmdit.svg

Tensor shapes use B (batch), H x W (image pixels); the latent is 8x smaller per side.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

IMAGES = Path(__file__).parent / "images"
W, H = 2.1, 0.8                                     # box width and height, in axis units

# name: (x, y, label, fill colour)
BOXES = {
    "prompt": (0.0, 2.7, "prompt", "0.92"),
    "clip_l": (2.6, 3.9, "CLIP-L\n(B, 77, 768)", "#9ecae1"),
    "clip_g": (2.6, 2.7, "CLIP-G\n(B, 77, 1280)", "#9ecae1"),
    "t5": (2.6, 1.5, "T5-XXL\n(B, 77, 4096)", "#9ecae1"),
    "context": (5.4, 3.3, "context\n(B, 154, 4096)", "#c6dbef"),
    "y": (5.4, 2.0, "pooled y\n(B, 768 + 1280)", "#c6dbef"),
    "mmdit": (8.2, 2.7, "MM-DiT\npredicts the velocity v", "#fdae6b"),
    "noise": (8.2, 0.6, "noise\n(B, 16, H/8, W/8)", "0.92"),
    "sampler": (11.4, 2.7, "sampler\nEuler / DPM++ with CFG", "#a1d99b"),
    "decoder": (11.4, 0.6, "VAE decoder", "#dadaeb"),
    "image": (14.2, 0.6, "image\n(B, 3, H, W)", "0.92"),
    "init": (14.2, 4.1, "image (img2img)", "0.96"),
    "encoder": (14.2, 2.7, "VAE encoder", "#dadaeb"),
}


def _anchor(name, side):
    x, y = BOXES[name][:2]
    return {"left": (x, y + H / 2), "right": (x + W, y + H / 2),
            "top": (x + W / 2, y + H), "bottom": (x + W / 2, y),
            "bottom_left": (x + 0.3 * W, y), "bottom_right": (x + 0.7 * W, y)}[side]


def _arrow(ax, a, b, sides=("right", "left"), text="", dashed=False, rad=0.0):
    start, end = _anchor(a, sides[0]), _anchor(b, sides[1])
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="0.25",
                                 linestyle="--" if dashed else "-", connectionstyle=f"arc3,rad={rad}"))
    if text:
        ax.text((start[0] + end[0]) / 2 + 0.1, (start[1] + end[1]) / 2, text, fontsize=8,
                ha="left", va="center", color="0.2")


def sd3_system():
    """The whole system on one page: three text encoders, the MM-DiT, the sampler, the VAE."""
    fig, ax = plt.subplots(figsize=(12, 4.4))
    for x, y, label, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), W, H, boxstyle="round,pad=0.05", fc=colour, ec="0.3"))
        ax.text(x + W / 2, y + H / 2, label, ha="center", va="center", fontsize=9)
    for enc in ("clip_l", "clip_g", "t5"):
        _arrow(ax, "prompt", enc)
        _arrow(ax, enc, "context")
    _arrow(ax, "clip_l", "y")
    _arrow(ax, "clip_g", "y")
    _arrow(ax, "context", "mmdit")
    _arrow(ax, "y", "mmdit")
    _arrow(ax, "mmdit", "sampler", ("top", "top"), rad=-0.5)            # the loop: v out, z_t and t in
    _arrow(ax, "sampler", "mmdit", ("bottom_left", "bottom"), rad=-0.5)
    ax.text(10.85, 4.25, "velocity v", fontsize=8, ha="center", color="0.2")
    ax.text(10.85, 1.95, "z_t, t (28-50 steps)", fontsize=8, ha="center", color="0.2")
    _arrow(ax, "noise", "sampler", ("right", "bottom_left"))
    _arrow(ax, "sampler", "decoder", ("bottom_right", "top"), text="z_0")
    _arrow(ax, "decoder", "image")
    _arrow(ax, "init", "encoder", ("bottom", "top"), dashed=True)
    _arrow(ax, "encoder", "sampler", ("left", "right"), dashed=True)
    ax.set_xlim(-0.2, 16.5)
    ax.set_ylim(0.3, 5.1)
    ax.axis("off")
    fig.tight_layout()
    return fig


def _box(ax, x, y, w, h, label, colour, fontsize=8.5):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.03", fc=colour, ec="0.3"))
    ax.text(x, y, label, ha="center", va="center", fontsize=fontsize)


def _line(ax, start, end, text="", side="right"):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10, color="0.3"))
    if text:
        dx = 0.08 if side == "right" else -0.08
        ax.text((start[0] + end[0]) / 2 + dx, (start[1] + end[1]) / 2, text, fontsize=7, color="0.25",
                ha="left" if side == "right" else "right", va="center")


def _overview(ax):
    """Left panel: the inputs, the joint blocks and the output (paper Fig. 2a), with shapes."""
    text, cond, image = 0.9, 3.1, 5.3
    _box(ax, text, 11.2, 2.0, 0.6, "context (B, 154, 4096)", "#c6dbef", 7.5)
    _box(ax, cond, 11.2, 2.0, 0.6, "pooled y (B, 2048),\ntimestep 1000 sigma", "#c6dbef", 7.5)
    _box(ax, image, 11.2, 2.0, 0.6, "noisy latent\n(B, 16, H/8, W/8)", "0.92", 7.5)
    _box(ax, text, 9.9, 2.0, 0.6, "Linear\n(context_embedder)", "#fdd0a2", 7.5)
    _box(ax, cond, 9.9, 2.0, 0.6, "MLP(y) +\nMLP(sinusoid(timestep))", "#fdd0a2", 7.5)
    _box(ax, image, 9.9, 2.0, 0.6, "patchify (p = 2)\n+ pos_embed", "#fdd0a2", 7.5)
    for x in (text, cond, image):
        _line(ax, (x, 10.9), (x, 10.2))
    _box(ax, cond, 8.85, 1.2, 0.4, "c (B, D)", "#e5f5e0", 7.5)
    _line(ax, (cond, 9.6), (cond, 9.05))
    ax.add_patch(FancyBboxPatch((-0.1, 5.1), 6.4, 3.2, boxstyle="round,pad=0.05", fc="#fff5eb", ec="#e6550d",
                                ls="--"))
    ax.text(2.0, 7.75, "joint block x depth\n(24 in SD3-medium)", ha="center", fontsize=8, color="#a63603")
    _box(ax, text, 6.7, 1.8, 1.4, "text stream\n(B, 154, D)", "#deebf7", 7.5)
    _box(ax, image, 6.7, 1.8, 1.4, "image stream\n(B, T, D)", "#fee6ce", 7.5)
    _box(ax, cond, 6.7, 1.4, 0.9, "joint\nattention", "#fdae6b", 7.5)
    _line(ax, (text, 9.6), (text, 7.45))
    _line(ax, (image, 9.6), (image, 7.45))
    _line(ax, (cond, 8.65), (cond, 7.2), "c: adaLN of\nboth streams")
    _line(ax, (text + 0.9, 6.7), (cond - 0.7, 6.7))
    _line(ax, (image - 0.9, 6.7), (cond + 0.7, 6.7))
    ax.text(3.1, 5.4, "the last block: text stream pre-only", ha="center", fontsize=7, color="0.3")
    _box(ax, image, 4.3, 2.0, 0.6, "final layer:\nadaLN(c), Linear", "#fdd0a2", 7.5)
    _box(ax, image, 3.2, 2.0, 0.5, "unpatchify", "#fdd0a2", 7.5)
    _box(ax, image, 2.1, 2.0, 0.6, "velocity v\n(B, 16, H/8, W/8)", "0.92", 7.5)
    _line(ax, (image, 6.0), (image, 4.6), "(B, T, D)", side="left")
    _line(ax, (image, 4.0), (image, 3.45), "(B, T, 16 p\u00b2)", side="left")
    _line(ax, (image, 2.95), (image, 2.4))
    ax.text(3.1, 12.6, "the MM-DiT", ha="center", fontsize=11, weight="bold")
    ax.text(3.1, 1.3, "T = (H/8p)(W/8p) image tokens; D = 64 x depth", ha="center", fontsize=7.5,
            color="0.25")


def _block(ax):
    """Right panel: one joint block (paper Fig. 2b): per stream adaLN, one attention over both."""
    centre, width = 11.0, 2.7
    columns = {"text": (9.4, "#deebf7"), "image": (12.6, "#fee6ce")}
    for name, (x, colour) in columns.items():
        seq = "(B, 154, D)" if name == "text" else "(B, T, D)"
        _box(ax, x, 12.0, width, 0.5, f"{name} in {seq}", colour, 7.5)
        _box(ax, x, 11.0, width, 0.55, "LayerNorm, x (1 + scale) + shift", "#e5f5e0", 7)
        _box(ax, x, 10.0, width, 0.55, "Linear -> q, k, v\n(RMSNorm on q, k: SD3.5)", "#fdd0a2", 7)
        _box(ax, x, 7.8, width, 0.55, "Linear, x gate, + residual", "#fdd0a2", 7)
        _box(ax, x, 6.8, width, 0.55, "LayerNorm, x (1 + scale) + shift", "#e5f5e0", 7)
        _box(ax, x, 5.8, width, 0.55, "MLP (4D, GELU-tanh)", "#fdd0a2", 7)
        _box(ax, x, 4.8, width, 0.55, "x gate, + residual", "#fdd0a2", 7)
        _box(ax, x, 3.8, width, 0.5, f"{name} out {seq}", colour, 7.5)
        for y0, y1 in ((11.75, 11.3), (10.7, 10.3), (7.5, 7.1), (6.5, 6.1), (5.5, 5.1), (4.5, 4.05)):
            _line(ax, (x, y0), (x, y1))
        side = -0.9 if name == "text" else 0.9
        _line(ax, (x, 9.7), (centre + side, 9.15))
        _line(ax, (centre + side, 8.75), (x, 8.1))
    _box(ax, centre, 8.95, 3.0, 0.4, "attention over [text ; image]", "#fdae6b", 7.5)
    _box(ax, centre, 12.9, 4.2, 0.45, "c (B, D) -> SiLU, Linear -> 6 vectors of D per stream", "#e5f5e0", 7)
    ax.text(centre, 2.7, "q, k, v of both streams concatenated: (B, heads, 154 + T, 64) (chapter 8)\n"
            "shift, scale, gate from c (chapter 7); the pre-only text stream has only shift, scale",
            ha="center", fontsize=7.5, color="0.25")
    ax.text(centre, 13.6, "one joint block", ha="center", fontsize=11, weight="bold")


def mmdit():
    """The MM-DiT with its shapes: the whole network on the left, one joint block on the right."""
    fig, ax = plt.subplots(figsize=(12, 8.5))
    _overview(ax)
    _block(ax)
    ax.set_xlim(-0.3, 14.1)
    ax.set_ylim(1.0, 14.0)
    ax.axis("off")
    fig.tight_layout()
    return fig


def main():
    IMAGES.mkdir(exist_ok=True)
    plt.rcParams["svg.hashsalt"] = "sd3mini"          # stable element ids: the file only changes with the figure
    for name, draw in (("sd3_system", sd3_system), ("mmdit", mmdit)):
        path = IMAGES / f"{name}.svg"
        draw().savefig(path, metadata={"Date": None})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
