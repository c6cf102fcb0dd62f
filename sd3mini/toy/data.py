"""Procedural training data for the embedded tiny SD3: coloured shapes with exact captions.

A scene is one object, or two objects related by above / below / left of / right of. An object has a
colour, a shape, a size and (single objects) a cell of a 3x3 grid. Images are rendered from signed
distances with 4x4 supersampling (anti-aliased), in batches, deterministically from a seed.

    scene   = [Obj(...)] or [Obj(...), Obj(...)] plus, for pairs, a relation
    caption = "a large red circle in the top left", "a red circle", "a purple circle below a blue triangle"
"""

import random
from dataclasses import dataclass

import torch

from ..flow import process_in, sample_t, time_shift

IMAGE_SIZE = 32
COLOURS = {  # RGB in [0, 1]
    "red": (0.92, 0.12, 0.10), "orange": (1.00, 0.55, 0.05), "yellow": (0.96, 0.90, 0.12),
    "green": (0.12, 0.75, 0.22), "blue": (0.16, 0.32, 0.98), "purple": (0.62, 0.20, 0.85),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 3.6, "large": 5.8}          # "radius" in pixels at 32 x 32
CELLS = {  # grid cell -> (row, column); phrased "in the <cell>"
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
RELATIONS = ("above", "below", "left of", "right of")
# Colour-shape pairs never shown in training, to measure generalization to new combinations.
HELD_OUT = (("purple", "triangle"), ("orange", "square"), ("green", "circle"))
GRID = (0.2, 0.5, 0.8)                       # cell centres, as fractions of the image side


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    cell: str                                 # the grid cell it is drawn in
    dx: float = 0.0                           # jitter in pixels
    dy: float = 0.0

    def centre(self, size: int = IMAGE_SIZE) -> tuple[float, float]:
        row, col = CELLS[self.cell]
        return GRID[col] * size + self.dx, GRID[row] * size + self.dy


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    relation: str | None = None               # pairs: objects[0] <relation> objects[1]


# --- sampling scenes ------------------------------------------------------------------------------
def _relation_holds(rel: str, a: tuple[int, int], b: tuple[int, int]) -> bool:
    (ra, ca), (rb, cb) = a, b
    return {"above": ra < rb, "below": ra > rb, "left of": ca < cb, "right of": ca > cb}[rel]


def random_object(rng: random.Random, holdout: bool, cell: str | None = None, size: str | None = None) -> Obj:
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if not (holdout and (colour, shape) in HELD_OUT):
            break
    return Obj(colour, shape, size or rng.choice(list(SIZES)), cell or rng.choice(list(CELLS)),
               rng.uniform(-1, 1), rng.uniform(-1, 1))


def random_scene(rng: random.Random, p_pair: float = 0.6, holdout: bool = True) -> Scene:
    """One single object (in any cell) or a related pair (different colours, not touching)."""
    if rng.random() >= p_pair:
        return Scene((random_object(rng, holdout),))
    rel = rng.choice(RELATIONS)
    while True:
        cell_a, cell_b = rng.sample(list(CELLS), 2)
        if not _relation_holds(rel, CELLS[cell_a], CELLS[cell_b]):
            continue
        a = random_object(rng, holdout, cell_a)
        b = random_object(rng, holdout, cell_b)
        (ra, ca), (rb, cb) = CELLS[cell_a], CELLS[cell_b]
        adjacent = max(abs(ra - rb), abs(ca - cb)) == 1
        if a.colour != b.colour and not (adjacent and a.size == b.size == "large"):
            return Scene((a, b), rel)


# --- captions -------------------------------------------------------------------------------------
def describe(obj: Obj, size: bool, colour: bool) -> str:
    words = ["a"] + ([obj.size] if size else []) + ([obj.colour] if colour else []) + [obj.shape]
    return " ".join(words)


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """The scene in words. With ``rng``, attributes are dropped at random (size 50%, position 40%,
    colour of a single object 10%); without, every attribute is named."""
    keep = (lambda p: rng.random() >= p) if rng is not None else (lambda p: True)  # noqa: E731
    if scene.relation is None:
        obj = scene.objects[0]
        text = describe(obj, keep(0.5), keep(0.1))
        return text + (f" in the {obj.cell}" if keep(0.4) else "")
    a, b = scene.objects
    return f"{describe(a, keep(0.5), True)} {scene.relation} {describe(b, keep(0.5), True)}"


def parse_caption(text: str) -> dict:
    """The inverse of ``caption``: the attributes a caption names (for the judge)."""
    words = text.split()

    def obj(ws):
        return {"size": next((w for w in ws if w in SIZES), None), "colour": next((w for w in ws if w in COLOURS), None),
                "shape": next((w for w in ws if w in SHAPES), None)}

    for rel in RELATIONS:
        if f" {rel} " in f" {text} ":
            left, right = f" {text} ".split(f" {rel} ")
            return {"objects": [obj(left.split()), obj(right.split())], "relation": rel, "cell": None}
    cell = text.split(" in the ", 1)[1] if " in the " in text else None
    return {"objects": [obj(words)], "relation": None, "cell": cell}


# --- rendering ------------------------------------------------------------------------------------
def _coverage(shape: str, x: torch.Tensor, y: torch.Tensor, r: float) -> torch.Tensor:
    """1 where the sample point (x, y) (relative to the centre, pixels) is inside the shape."""
    if shape == "circle":
        inside = x**2 + y**2 <= r**2
    elif shape == "square":
        inside = torch.maximum(x.abs(), y.abs()) <= 0.86 * r
    else:  # an upward triangle: apex at (0, -r), base at y = 0.8 r, half-width 1.05 r
        inside = (y <= 0.8 * r) & (1.05 * (y + r) >= 1.8 * x.abs())
    return inside.float()


def render(scenes: list[Scene], size: int = IMAGE_SIZE, supersample: int = 4) -> torch.Tensor:
    """Scenes -> images (B, 3, size, size) in [-1, 1] on a black background."""
    s = supersample
    ticks = (torch.arange(size * s, dtype=torch.float32) + 0.5) / s       # sample points, in pixels
    y, x = torch.meshgrid(ticks, ticks, indexing="ij")
    images = torch.zeros(len(scenes), 3, size, size)
    for i, scene in enumerate(scenes):
        canvas = torch.zeros(3, size * s, size * s)
        for obj in scene.objects:
            cx, cy = obj.centre(size)
            r = SIZES[obj.size] * size / IMAGE_SIZE
            alpha = _coverage(obj.shape, x - cx, y - cy, r)
            colour = torch.tensor(COLOURS[obj.colour]).view(3, 1, 1)
            canvas = canvas * (1 - alpha) + colour * alpha
        images[i] = torch.nn.functional.avg_pool2d(canvas[None], s)[0]  # box-filter the 4x4 samples
    return images * 2 - 1


def batch(seed: int, n: int, *, p_pair: float = 0.6, holdout: bool = True, dropout: bool = True):
    """``n`` random scenes -> (images (n, 3, 32, 32), captions, scenes); the same seed, the same batch."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, p_pair, holdout) for _ in range(n)]
    captions = [caption(sc, rng if dropout else None) for sc in scenes]
    return render(scenes), captions, scenes


def eval_captions(n_single: int = 150, n_pair: int = 150, seed: int = 1234) -> list[str]:
    """The fixed evaluation set: fully specified captions, held-out colour-shape pairs included."""
    rng = random.Random(seed)
    single = [caption(Scene((random_object(rng, holdout=False),))) for _ in range(n_single)]
    pairs = [caption(random_scene(rng, p_pair=1.0, holdout=False)) for _ in range(n_pair)]
    return single + pairs


def uses_held_out(text: str) -> bool:
    return any((o["colour"], o["shape"]) in HELD_OUT for o in parse_caption(text)["objects"])


# --- training batches ------------------------------------------------------------------------------
def data_stats(n: int = 2048, seed: int = 999) -> tuple[float, float]:
    """(latent_scale, latent_shift): SD3 normalizes its latents to unit variance (scale 1/std, offset the
    mean); the same, measured on pixels."""
    images, _, _ = batch(seed, n)
    return 1.0 / images.std().item(), images.mean().item()


def training_batch(r, step: int, rank: int, latent_scale: float, latent_shift: float, draw=None):
    """(x0, captions, noise, sigma) of ``step`` on ``rank`` for the recipe ``r`` (``recipe.Recipe``): a
    function of (seed, rank, step) only, so resuming is exact. ``draw(n, generator)``: the noise levels
    before the shift (default: ``r.t_sampler``; the paper's arms draw each formulation's own)."""
    seed = (r.seed * 1_000_003 + rank) * 10_000_019 + step
    # A curriculum: single objects first teach grid position, which pair captions never name
    # (benchmarks/RESULTS.md).
    p_pair = 0.0 if step < r.singles_first else r.p_pair
    images, captions, _ = batch(seed, r.batch, p_pair=p_pair)
    rng = random.Random(seed)
    captions = ["" if rng.random() < r.cfg_drop else c for c in captions]
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=gen)
    levels = draw(r.batch, gen) if draw is not None else sample_t(r.batch, r.t_sampler, generator=gen)
    return process_in(images, latent_scale, latent_shift), captions, noise, time_shift(levels, r.t_shift)
