"""A caption-compliance judge for the coloured-shapes world: does an image show what its caption says?

How it looks at a 32x32 image (values in [-1, 1] or a PIL image):
  1. foreground = pixels brighter than 0.35 (the background is black);
  2. each foreground pixel gets the palette colour nearest to its chroma (RGB divided by its maximum),
     and the pixels of each colour are split into 4-connected components; the largest is "the object";
  3. colour: which colours have an object (at least 6 pixels);
  4. shape, from sub-pixel coverage: the area over the extents' product ("fill") is ~1 for a square,
     ~pi/4 for a circle, ~1/2 for a triangle, whose mass also sits low (negative vertical skew);
  5. size: the larger extent (small 6-7.6 px, large 10-12 px);
  6. grid cell: the brightness-weighted centroid, in thirds of the image;
  7. relation: the two objects' centroids differ by at least 2 px in the stated direction.
It is validated against ground-truth renders in the tests (>= 98% agreement required).

Known bias on *generated* images: a small square with soft edges can fill a little under 0.9 of its box and
is then read as a circle, so the judge under-reports squares and its accuracies are conservative (measured
in benchmarks/RESULTS.md; chapter 17 shows a case).
"""

import numpy as np
import torch
from PIL import Image

from .data import CELLS, COLOURS, RELATIONS, eval_captions, parse_caption

_PALETTE = np.array([c for c in COLOURS.values()])
_CHROMA = _PALETTE / _PALETTE.max(axis=1, keepdims=True)
_NAMES = list(COLOURS)


def to_array(image) -> np.ndarray:
    """PIL image, or a (3, H, W) tensor in [-1, 1] -> (H, W, 3) float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, by label propagation (small images only)."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                                        padded[1:-1, :-2], padded[1:-1, 2:]])
        new = np.where(mask, neighbours, big)
        if np.array_equal(new, labels):
            break
        labels = new
    return [labels == v for v in np.unique(labels[mask])]


def colour_masks(image) -> dict[str, np.ndarray]:
    """{colour: (H, W) bool}: the bright pixels whose hue is nearest that palette colour."""
    rgb = to_array(image)
    bright = rgb.max(axis=2)
    chroma = rgb / np.maximum(bright, 1e-6)[..., None]
    nearest = np.argmin(((chroma[:, :, None, :] - _CHROMA[None, None]) ** 2).sum(-1), axis=2)
    return {name: (bright > 0.35) & (nearest == k) for k, name in enumerate(_NAMES)}


def find_objects(image) -> dict[str, dict]:
    """{colour: {"shape", "size", "cell", "centroid" (x, y), "pixels"}} for the largest blob of each colour."""
    bright = to_array(image).max(axis=2)
    masks = colour_masks(image)
    objects = {}
    h, w = bright.shape
    for k, name in enumerate(_NAMES):
        comps = _components(masks[name])
        if not comps:
            continue
        comp = max(comps, key=lambda m: m.sum())
        if comp.sum() < 6:
            continue
        # Coverage in [0, 1]: brightness relative to the colour's own, over the blob and a 1-px rim
        # (the anti-aliased edge). Sub-pixel measures come from it: area, extents, vertical skew.
        p = np.pad(comp, 1)
        region = comp | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
        cover = np.clip(bright / _PALETTE[k].max(), 0, 1) * region
        area = cover.sum()
        ext_x, ext_y = cover.max(axis=0).sum(), cover.max(axis=1).sum()
        fill = area / (ext_x * ext_y)
        ys, xs = np.arange(h), np.arange(w)
        cx, cy = (cover.sum(0) * xs).sum() / area + 0.5, (cover.sum(1) * ys).sum() / area + 0.5
        sy = np.sqrt((cover.sum(1) * (ys + 0.5 - cy) ** 2).sum() / area)
        skew = (cover.sum(1) * (ys + 0.5 - cy) ** 3).sum() / area / max(sy, 1e-6) ** 3
        if fill < 0.7 or skew < -0.3:      # triangles fill ~1/2 of their box, with their mass low
            shape = "triangle"
        elif fill > 0.9:                   # squares fill their box
            shape = "square"
        else:                              # circles fill pi/4 of it
            shape = "circle"
        row, col = min(2, int(cy * 3 // h)), min(2, int(cx * 3 // w))
        cell = next(name for name, rc in CELLS.items() if rc == (row, col))
        objects[name] = {"shape": shape, "size": "large" if max(ext_x, ext_y) * 32 / w >= 8.8 else "small",
                         "cell": cell, "centroid": (cx, cy), "pixels": float(area)}
    return objects


def _relation_ok(rel: str, a: tuple, b: tuple, margin: float = 2.0) -> bool:
    (xa, ya), (xb, yb) = a, b
    return {"above": ya < yb - margin, "below": ya > yb + margin,
            "left of": xa < xb - margin, "right of": xa > xb + margin}[rel]


def judge(image, text: str) -> dict[str, bool | None]:
    """Check an image against its caption: {"colour", "shape", "size", "cell", "relation", "all"};
    None where the caption does not name that attribute."""
    want = parse_caption(text)
    found = find_objects(image)
    objs = [found.get(o["colour"]) if o["colour"] else (max(found.values(), key=lambda f: f["pixels"]) if found else None)
            for o in want["objects"]]
    named = [(o, f) for o, f in zip(want["objects"], objs)]
    result: dict[str, bool | None] = {
        "colour": all(f is not None for o, f in named if o["colour"]) if any(o["colour"] for o, _ in named) else None,
        "shape": all(f is not None and f["shape"] == o["shape"] for o, f in named),
        "size": (all(f is not None and f["size"] == o["size"] for o, f in named if o["size"])
                 if any(o["size"] for o, _ in named) else None),
        "cell": (objs[0] is not None and objs[0]["cell"] == want["cell"]) if want["cell"] else None,
        "relation": None,
    }
    if want["relation"] in RELATIONS:
        result["relation"] = (all(f is not None and f["shape"] == o["shape"] for o, f in named)
                              and _relation_ok(want["relation"], objs[0]["centroid"], objs[1]["centroid"]))
    if want["relation"] is None and result["colour"] and len(found) > 1:
        result["colour"] = max(found.values(), key=lambda f: f["pixels"]) is objs[0]   # the named colour dominates
    result["all"] = all(v for k, v in result.items() if v is not None)
    return result


def pair_parts(image, text: str) -> dict[str, bool | None] | None:
    """The three things a relation needs, judged apart, for a two-object caption (None for one object):
    both colours found ("colours"), the two centroids in the named order, no margin ("arranged"), and
    both shapes right ("shapes"); the last two are None where a colour is missing."""
    want = parse_caption(text)
    if want["relation"] is None:
        return None
    found = find_objects(image)
    a, b = (found.get(o["colour"]) for o in want["objects"])
    if a is None or b is None:
        return {"colours": False, "arranged": None, "shapes": None}
    return {"colours": True, "arranged": bool(_relation_ok(want["relation"], a["centroid"], b["centroid"], margin=0.0)),
            "shapes": (a["shape"], b["shape"]) == (want["objects"][0]["shape"], want["objects"][1]["shape"])}


def score(images, captions) -> dict[str, float]:
    """Accuracy per attribute over the captions that name it, and over all of them ("all")."""
    results = [judge(im, c) for im, c in zip(images, captions)]
    keys = ("colour", "shape", "size", "cell", "relation", "all")
    return {k: float(np.mean([r[k] for r in results if r[k] is not None])) if any(r[k] is not None for r in results)
            else float("nan") for k in keys}


# --- a pipeline's scores ---------------------------------------------------------------------------
def generate(pipe, captions, *, seed=0, batch=100, **options) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] for ``captions`` through ``pipe``, image i from seed ``seed + i``;
    ``options`` are the pipeline's (steps, cfg_scale, shift, ...)."""
    return torch.cat([pipe(captions[i: i + batch], seed=seed + i, output="tensor", progress=False, **options)
                      for i in range(0, len(captions), batch)])


def evaluate(pipe, captions, **options) -> dict:
    """The judge's scores (colour, shape, size, cell, relation, all) of ``pipe``'s images of ``captions``."""
    return score(generate(pipe, captions, **options), captions)


def eval_captions_subset(n: int) -> list[str]:
    """An even mix of single-object and two-object captions from the fixed evaluation set."""
    full = eval_captions()
    half = n // 2
    return full[:half] + full[150: 150 + n - half]
