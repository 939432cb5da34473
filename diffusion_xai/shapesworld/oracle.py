"""The ShapesWorld oracle: a pure numpy/scipy judge of what an image shows.

``judge(image)`` finds every object (connected foreground region) and reads its colour
(nearest palette colour of its mean), shape (best IoU against each shape's templates -- crisp and
blurred renders at the small, the large and a big radius -- fitted to the object's bounding box), size (bounding-box extent against the midpoint between the small
and large renders of that shape) and position (nearest anchor to the bounding-box centre).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage

from .scene import (
    BACKGROUND,
    COLORS,
    IMAGE_SIZE,
    POSITION_ANCHOR,
    SHAPES,
    SIZE_RADIUS,
    ShapeObject,
    shape_mask,
)

MIN_AREA = 20  # pixels; smaller regions are noise
TEMPLATE = 24  # template resolution for shape matching

_PALETTE_NAMES = ["background"] + list(COLORS)
_PALETTE = np.array([BACKGROUND] + list(COLORS.values()), np.float32)


@dataclass
class DetectedObject:
    shape: str
    color: str
    size: str
    position: str
    mask: np.ndarray = field(repr=False)
    confidence: float = 1.0  # template IoU of the chosen shape

    def describe(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position}


TEMPLATE_RADII = (SIZE_RADIUS["small"], SIZE_RADIUS["large"], 24)
TEMPLATE_BLURS = (0.0, 1.0, 1.6)  # Gaussian sigmas (pixels): blurred-and-thresholded shapes have rounded corners


@lru_cache(maxsize=None)
def _templates() -> dict[str, list[np.ndarray]]:
    """Every shape rendered at the small, the large and a big radius, crisp and blurred (then thresholded
    at 0.5), cropped and resized to TEMPLATE x TEMPLATE. Small shapes are aliased and decoded samples round
    their corners, so a single crisp big template misreads small discs as squares."""
    out = {}
    for s in SHAPES:
        out[s] = []
        for r in TEMPLATE_RADII:
            m = shape_mask(s, (32, 32), r, size=64).astype(np.float32)
            for sigma in TEMPLATE_BLURS:
                out[s].append(_crop_resize(ndimage.gaussian_filter(m, sigma) if sigma else m))
    return out


@lru_cache(maxsize=None)
def _size_thresholds() -> dict[str, float]:
    th = {}
    for s in SHAPES:
        ext = []
        for z in ("small", "large"):
            m = shape_mask(s, (32, 32), SIZE_RADIUS[z])
            ys, xs = np.nonzero(m)
            ext.append(max(xs.max() - xs.min(), ys.max() - ys.min()) + 1)
        th[s] = (ext[0] + ext[1]) / 2.0
    return th


def _crop_resize(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    zoom = (TEMPLATE / crop.shape[0], TEMPLATE / crop.shape[1])
    return ndimage.zoom(crop, zoom, order=1)[:TEMPLATE, :TEMPLATE] > 0.5


def pixel_labels(image: np.ndarray) -> np.ndarray:
    """Index into ["background", *COLORS] of the nearest palette colour of every pixel."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {img.shape}")
    d = ((img[:, :, None, :].astype(np.float32) - _PALETTE[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def _read(img: np.ndarray, m: np.ndarray) -> tuple[float, float, DetectedObject]:
    """(centre y, centre x, object) of one region mask."""
    core = ndimage.binary_erosion(m) if ndimage.binary_erosion(m).sum() >= 5 else m
    mean = img[core].astype(np.float32).mean(0)
    color = list(COLORS)[int(((_PALETTE[1:] - mean) ** 2).sum(-1).argmin())]
    t = _crop_resize(m)
    ious = {s: max((t & tm).sum() / max((t | tm).sum(), 1) for tm in tms) for s, tms in _templates().items()}
    shape = max(ious, key=ious.get)
    ys, xs = np.nonzero(m)
    extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    size = "large" if extent > _size_thresholds()[shape] else "small"
    cx, cy = (xs.max() + xs.min() + 1) / 2.0, (ys.max() + ys.min() + 1) / 2.0
    position = min(POSITION_ANCHOR, key=lambda p: (POSITION_ANCHOR[p][0] - cx) ** 2 + (POSITION_ANCHOR[p][1] - cy) ** 2)
    return cy, cx, DetectedObject(shape, color, size, position, m, float(ious[shape]))


def _colour_parts(labels: np.ndarray, m: np.ndarray) -> list[np.ndarray]:
    """Connected single-colour parts (opened, holes filled, >= MIN_AREA pixels) of a region."""
    parts = []
    for c in np.flatnonzero(np.bincount(labels[m]) >= MIN_AREA):  # a part keeps >= MIN_AREA pixels of its colour
        pc = ndimage.binary_opening((labels == c) & m, iterations=1)
        comp, n = ndimage.label(pc, structure=np.ones((3, 3)))
        parts += [ndimage.binary_fill_holes(comp == k) for k in range(1, n + 1) if (comp == k).sum() >= MIN_AREA]
    return parts


def judge(image) -> list[DetectedObject]:
    """Objects seen in a (H, W, 3) uint8 RGB image (or PIL image), sorted left-to-right, top-to-bottom.

    Regions are connected foreground pixels; a region made of several single-colour parts that each fit a
    shape template better than the whole region does is read as those touching objects.
    """
    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if img.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got dtype {img.dtype}")
    if img.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"image must be {IMAGE_SIZE}x{IMAGE_SIZE}, got {img.shape[1]}x{img.shape[0]}")
    labels = pixel_labels(img)
    fg = labels != 0
    fg = ndimage.binary_opening(fg, iterations=1) | (fg & ndimage.binary_erosion(fg))
    comp, n = ndimage.label(fg, structure=np.ones((3, 3)))
    found = []
    for k in range(1, n + 1):
        m = comp == k
        if m.sum() < MIN_AREA:
            continue
        m = ndimage.binary_fill_holes(m)
        whole = _read(img, m)
        masks = _colour_parts(labels, m)
        parts = [_read(img, pm) for pm in masks] if len(masks) >= 2 else []
        if parts and min(p[2].confidence for p in parts) > whole[2].confidence:
            found += parts  # touching objects of different colours, each fitting a shape better than the union
        else:
            found.append(whole)
    found.sort(key=lambda f: (round(f[1] / 8), f[0]))
    return [f[2] for f in found]


def _key(o) -> tuple:
    return (o.shape, o.color, o.size, o.position)


def same_objects(detected, truth) -> bool:
    """True when the two collections hold the same (shape, colour, size, position) objects."""
    return sorted(map(_key, detected)) == sorted(map(_key, truth))


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Degrade a clean render the way model samples are: blur, colour noise, colour shift, jitter."""
    img = image.astype(np.float32)
    sigma = rng.uniform(0.4, 1.0)
    img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0))
    img += rng.normal(0, 8, img.shape)  # per-pixel colour noise
    img += rng.uniform(-15, 15, (1, 1, 3))  # global colour shift
    shift = rng.integers(-1, 2, 2)
    img = np.roll(img, tuple(int(s) for s in shift), axis=(0, 1))
    return np.clip(img, 0, 255).round().astype(np.uint8)


def matches_prompt(detected, scene_objects: list[ShapeObject], attributes=("shape", "color", "size", "position")) -> bool:
    """True when detected objects equal the scene's objects on the given attributes (as multisets)."""
    key = lambda o: tuple(getattr(o, a) for a in attributes)  # noqa: E731
    return sorted(map(key, detected)) == sorted(map(key, scene_objects))
