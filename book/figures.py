"""Draw the book's static diagrams as committed SVG files, so the built book needs no diagram CDN.

    python book/figures.py    # writes book/images/sd3_system.svg, mmdit.svg and mmdit_block.svg

Tensor shapes use B (batch), H x W (image pixels); the latent is 8x smaller per side.

The book shows each diagram at the width of its content column, about 800 px at a 1280-px window.
So every figure is drawn at most 8.4 inches wide (about 800 px at its natural size) with text of at
least 10 pt (about 13 px on screen): few boxes, short labels, and the details left to the chapters.
Coordinates are in inches (one axis unit = one inch), so font sizes and box sizes are comparable.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

IMAGES = Path(__file__).parent / "images"
TEXT, SMALL, TITLE = 11, 10, 13                     # font sizes in points; 10 pt is the smallest used
GREY, BLUE, PALE_BLUE, ORANGE, PALE_ORANGE, GREEN, PURPLE = (
    "0.92", "#9ecae1", "#deebf7", "#fdae6b", "#fee6ce", "#c7e9c0", "#dadaeb")


def _canvas(width, height):
    """A figure whose axis units are inches, so text and boxes scale together."""
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    return fig, ax


def _box(ax, x, y, w, h, label, colour, size=TEXT, weight="normal"):
    """A rounded box centred at (x, y), w x h inches, with its label."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=colour, ec="0.35", lw=1))
    ax.text(x, y, label, ha="center", va="center", fontsize=size, weight=weight, linespacing=1.3)
    return {"left": (x - w / 2, y), "right": (x + w / 2, y), "top": (x, y + h / 2), "bottom": (x, y - h / 2)}


def _arrow(ax, start, end, label="", offset=(0.08, 0.0), ha="left", dashed=False, rad=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color="0.3", lw=1.3,
                                 linestyle="--" if dashed else "-", connectionstyle=f"arc3,rad={rad}",
                                 shrinkA=1, shrinkB=1))
    if label:
        ax.text((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1], label,
                fontsize=SMALL, ha=ha, va="center", color="0.2")


def sd3_system():
    """The whole system: the prompt through three text encoders, the sampler loop, the VAE."""
    fig, ax = _canvas(8.4, 5.0)
    # the text: prompt -> three encoders -> context and pooled y -> the MM-DiT
    prompt = _box(ax, 0.8, 4.0, 1.3, 0.6, "prompt", GREY)
    encoders = [_box(ax, 2.65, y, 1.6, 0.5, label, BLUE)
                for y, label in ((4.6, "CLIP-L"), (4.0, "CLIP-G"), (3.4, "T5-XXL"))]
    context = _box(ax, 4.8, 4.35, 1.9, 0.7, "context\n(B, 154, 4096)", PALE_BLUE)
    pooled = _box(ax, 4.8, 3.4, 1.9, 0.7, "pooled y\n(B, 2048)", PALE_BLUE)
    for enc in encoders:
        _arrow(ax, prompt["right"], enc["left"])
        _arrow(ax, enc["right"], context["left"])
    for enc in encoders[:2]:
        _arrow(ax, enc["right"], pooled["left"])
    mmdit = _box(ax, 7.3, 3.85, 1.8, 0.9, "MM-DiT\npredicts the\nvelocity v", ORANGE, weight="bold")
    _arrow(ax, context["right"], (mmdit["left"][0], 4.1))
    _arrow(ax, pooled["right"], (mmdit["left"][0], 3.6))
    # the image: noise -> the sampler, which calls the MM-DiT every step -> the VAE decoder
    noise = _box(ax, 4.8, 2.35, 1.9, 0.7, "noise\n(B, 16, H/8, W/8)", GREY)
    sampler = _box(ax, 7.3, 2.35, 1.8, 0.7, "sampler\n(Euler, DPM++)", GREEN)
    _arrow(ax, noise["right"], sampler["left"])
    _arrow(ax, (7.0, sampler["top"][1]), (7.0, mmdit["bottom"][1]), "z_t, t", offset=(-0.08, 0), ha="right")
    _arrow(ax, (7.6, mmdit["bottom"][1]), (7.6, sampler["top"][1]), "v (28-50\nsteps)", offset=(0.08, 0))
    decoder = _box(ax, 7.3, 0.55, 1.8, 0.6, "VAE decoder", PURPLE)
    image = _box(ax, 4.8, 0.55, 1.9, 0.7, "image\n(B, 3, H, W)", GREY)
    _arrow(ax, sampler["bottom"], decoder["top"], "z_0", offset=(0.1, 0))
    _arrow(ax, decoder["left"], image["right"])
    # image-to-image enters through the VAE encoder
    init = _box(ax, 0.8, 1.45, 1.3, 0.7, "image\n(img2img)", GREY)
    encoder = _box(ax, 2.65, 1.45, 1.6, 0.6, "VAE encoder", PURPLE)
    _arrow(ax, init["right"], encoder["left"], dashed=True)
    _arrow(ax, encoder["right"], (sampler["left"][0], 2.1), dashed=True)
    return fig


def mmdit():
    """The MM-DiT as a whole: embeddings, the joint blocks, the final layer (paper Fig. 2a)."""
    fig, ax = _canvas(8.2, 7.6)
    text, cond, image = 1.45, 4.1, 6.75
    ax.text(4.1, 7.3, "the MM-DiT", ha="center", fontsize=TITLE, weight="bold")
    inputs = [_box(ax, text, 6.55, 2.5, 0.75, "context\n(B, 154, 4096)", PALE_BLUE),
              _box(ax, cond, 6.55, 2.5, 0.75, "timestep = 1000 t,\npooled y (B, 2048)", PALE_BLUE),
              _box(ax, image, 6.55, 2.5, 0.75, "noisy latent\n(B, 16, H/8, W/8)", GREY)]
    embeds = [_box(ax, text, 5.35, 2.5, 0.75, "Linear", PALE_ORANGE),
              _box(ax, cond, 5.35, 2.5, 0.75, "MLP + MLP\n= c (B, D)", GREEN),
              _box(ax, image, 5.35, 2.5, 0.75, "2 x 2 patches, Linear,\n+ positions", PALE_ORANGE)]
    for a, b in zip(inputs, embeds):
        _arrow(ax, a["bottom"], b["top"])
    ax.add_patch(FancyBboxPatch((0.15, 2.35), 7.9, 2.25, boxstyle="round,pad=0.02,rounding_size=0.1",
                                fc="#fff5eb", ec="#e6550d", ls="--", lw=1.2))
    ax.text(4.1, 2.5, "joint block x depth (24 in SD3-medium)", fontsize=SMALL, color="#a63603",
            ha="center", va="center")
    text_stream = _box(ax, text, 3.2, 2.3, 0.95, "text stream\n(B, 154, D)", PALE_BLUE)
    image_stream = _box(ax, image, 3.2, 2.3, 0.95, "image stream\n(B, T, D)", PALE_ORANGE)
    joint = _box(ax, cond, 3.2, 2.0, 0.95, "one joint\nattention", ORANGE, weight="bold")
    _arrow(ax, embeds[0]["bottom"], text_stream["top"])
    _arrow(ax, embeds[2]["bottom"], image_stream["top"])
    _arrow(ax, embeds[1]["bottom"], joint["top"], "c modulates\nboth streams", offset=(0.1, 0.05))
    _arrow(ax, text_stream["right"], joint["left"])
    _arrow(ax, image_stream["left"], joint["right"])
    final = _box(ax, image, 1.55, 2.5, 0.7, "final layer:\nadaLN(c), Linear", PALE_ORANGE)
    velocity = _box(ax, image, 0.45, 2.5, 0.7, "velocity v\n(B, 16, H/8, W/8)", GREY)
    _arrow(ax, image_stream["bottom"], final["top"])
    _arrow(ax, final["bottom"], velocity["top"], "unpatchify", offset=(-0.1, 0.0), ha="right")
    ax.text(0.3, 1.2, "T = (H/16)(W/16) image tokens\nD = 64 x depth", fontsize=SMALL, color="0.25",
            va="center", linespacing=1.4)
    return fig


def mmdit_block():
    """One joint block (paper Fig. 2b): each stream its own weights, one attention over both."""
    fig, ax = _canvas(8.2, 8.2)
    centre, width = 4.1, 2.9
    columns = {"text": (1.6, PALE_BLUE, "(B, 154, D)"), "image": (6.6, PALE_ORANGE, "(B, T, D)")}
    ax.text(centre, 7.9, "one joint block", ha="center", fontsize=TITLE, weight="bold")
    _box(ax, centre, 7.3, 5.6, 0.5, "c  ->  SiLU, Linear  ->  6 vectors of D per stream", GREEN)
    attention = _box(ax, centre, 4.45, 1.75, 0.75, "attention over\n[text ; image]", ORANGE,
                     weight="bold")
    for name, (x, colour, shape) in columns.items():
        steps = [(6.5, f"{name} in {shape}", colour), (5.8, "LayerNorm, modulate", GREEN),
                 (5.1, "Linear -> q, k, v", PALE_ORANGE), (3.8, "Linear, x gate, + input", PALE_ORANGE),
                 (3.1, "LayerNorm, modulate", GREEN), (2.4, "MLP (4D, GELU)", PALE_ORANGE),
                 (1.7, "x gate, + input", PALE_ORANGE), (1.0, f"{name} out {shape}", colour)]
        boxes = [_box(ax, x, y, width, 0.5, label, c) for y, label, c in steps]
        side = attention["left"] if name == "text" else attention["right"]
        for a, b in zip(boxes, boxes[1:]):
            if a is boxes[2]:                       # q, k, v into the shared attention, and back
                _arrow(ax, a["bottom"], (side[0], side[1] + 0.15))
                _arrow(ax, (side[0], side[1] - 0.15), b["top"])
            else:
                _arrow(ax, a["bottom"], b["top"])
    ax.text(centre, 2.4, "shift, scale,\ngate: from c\n\nq, k: RMSNorm\nin SD3.5", ha="center",
            va="center", fontsize=SMALL, color="0.25", linespacing=1.4)
    ax.text(centre, 0.3, "the last block's text stream stops after q, k, v (pre-only)", ha="center",
            va="center", fontsize=SMALL, color="0.25")
    return fig


def main():
    IMAGES.mkdir(exist_ok=True)
    plt.rcParams["svg.hashsalt"] = "sd3mini"          # stable element ids: the file only changes with the figure
    for name, draw in (("sd3_system", sd3_system), ("mmdit", mmdit), ("mmdit_block", mmdit_block)):
        path = IMAGES / f"{name}.svg"
        draw().savefig(path, metadata={"Date": None})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
