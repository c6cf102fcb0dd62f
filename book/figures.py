"""Draw the book's static diagrams as committed SVG files, so the built book needs no diagram CDN.

    python book/figures.py          # writes book/images/sd3_system.svg

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


def main():
    IMAGES.mkdir(exist_ok=True)
    plt.rcParams["svg.hashsalt"] = "sd3mini"          # stable element ids: the file only changes with the figure
    path = IMAGES / "sd3_system.svg"
    sd3_system().savefig(path, metadata={"Date": None})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
