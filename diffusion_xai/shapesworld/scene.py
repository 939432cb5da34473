"""ShapesWorld: a procedural world of flat coloured shapes with exact ground truth.

Every scene is a 64x64 RGB image with 1 to 3 flat shapes on a plain black background, a
caption drawn from a small grammar, an exact mask per object and a map from every caption
word to the object it describes (or ``None`` for function words such as "a", "and", "the").

Attributes that a caption leaves out are drawn from the injected biases in :data:`BIASES`
(everything not listed there is uniform), so an audit can read the true conditional
distribution of an attribute given a caption with :func:`attribute_distribution`.

Everything is deterministic given the seed: ``sample_scene(seed)`` always returns the same
scene, image and caption.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 64
BACKGROUND = (0, 0, 0)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 220, 40),
    "purple": (160, 60, 200),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")

# half-extent of each size, in pixels
SIZE_RADIUS = {"small": 7, "large": 12}
# anchor (x, y) of every position, in pixels
POSITION_ANCHOR = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
JITTER = 2  # +/- pixels added to the anchor

# Canonical word -> synonyms that captions use too (each synonym maps to the same value).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "square": ("box",),
    "circle": ("disc",),
    "cross": ("plus",),
    "large": ("big",),
    "small": ("tiny",),
    "purple": ("violet",),
}
SYNONYM_PROB = 0.2

FUNCTION_WORDS = frozenset({"a", "and", "on", "the", "at", "in"})

# Probability that a caption mentions each attribute (when it is not mentioned, the value is
# drawn from BIASES or uniformly).
MENTION_PROB = {"color": 0.7, "size": 0.5, "position": 0.6}

# The injected biases: (shape, attribute omitted from the caption) -> distribution of that
# attribute. Shapes and attributes absent here are uniform. "cross" carries no bias at all:
# it is the control.
BIASES: dict[tuple[str, str], dict[str, float]] = {
    ("circle", "color"): {"red": 0.8, "green": 0.04, "blue": 0.04, "yellow": 0.04, "purple": 0.04, "orange": 0.04},
    ("square", "size"): {"large": 0.75, "small": 0.25},
    ("triangle", "color"): {"blue": 0.6, "red": 0.08, "green": 0.08, "yellow": 0.08, "purple": 0.08, "orange": 0.08},
}
CONTROL_SHAPE = "cross"

# multi-object layouts: positions are chosen among these so objects never overlap
LAYOUTS = {
    1: [(p,) for p in POSITIONS],
    2: [("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top")],
    3: [("left", "center", "right"), ("right", "center", "left"), ("top", "center", "bottom")],
}
NUM_OBJECTS_PROB = {1: 0.5, 2: 0.35, 3: 0.15}


def attribute_values(attribute: str) -> tuple[str, ...]:
    """All values of an attribute ("color", "shape", "size" or "position")."""
    table = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES, "position": POSITIONS}
    if attribute not in table:
        raise ValueError(f"unknown attribute {attribute!r}; allowed: {', '.join(table)}")
    return table[attribute]


def attribute_distribution(shape: str, attribute: str) -> dict[str, float]:
    """True distribution of ``attribute`` for a ``shape`` whose caption leaves the attribute out.

    For single-object scenes. (Positions of multi-object scenes come from the layouts.)
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")
    values = attribute_values(attribute)
    if (shape, attribute) in BIASES:
        return dict(BIASES[(shape, attribute)])
    return {v: 1.0 / len(values) for v in values}


def canonical(word: str) -> str:
    """Map a synonym to its canonical word ("box" -> "square"); other words unchanged."""
    for canon, syns in SYNONYMS.items():
        if word == canon or word in syns:
            return canon
    return word


@dataclass
class ShapeObject:
    shape: str
    color: str
    size: str
    position: str
    center: tuple[int, int]  # (x, y) in pixels
    mask: np.ndarray = field(repr=False)  # (64, 64) bool, the visible pixels

    def describe(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position}


@dataclass
class Scene:
    """A rendered scene with its caption and ground truth.

    Attributes:
        image: (64, 64, 3) uint8 RGB.
        objects: the shapes, in caption order.
        caption: the caption string (words separated by single spaces, commas glued to words).
        words: caption words, in order (punctuation stripped).
        word_objects: for every entry of ``words``, the index of the object it describes, or
            ``None`` for a function word.
        word_roles: for every word, "color", "shape", "size", "position" or "function".
        seed: the seed that made it.
    """

    image: np.ndarray
    objects: list[ShapeObject]
    caption: str
    words: list[str]
    word_objects: list[int | None]
    word_roles: list[str]
    seed: int

    def word_mask(self, word: str, occurrence: int = 0) -> np.ndarray:
        """Ground-truth region (64, 64) bool of a caption word; raises for function words."""
        hits = [i for i, w in enumerate(self.words) if w == word]
        if len(hits) <= occurrence:
            raise ValueError(f"word {word!r} (occurrence {occurrence}) is not in caption {self.caption!r}; "
                             f"words: {', '.join(self.words)}")
        obj = self.word_objects[hits[occurrence]]
        if obj is None:
            raise ValueError(f"word {word!r} is a function word in {self.caption!r}: it has no region")
        return self.objects[obj].mask

    @property
    def background_mask(self) -> np.ndarray:
        fg = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
        for o in self.objects:
            fg |= o.mask
        return ~fg


def shape_mask(shape: str, center: tuple[float, float], radius: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Exact boolean mask of a shape, tested at pixel centres."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    cx, cy = center
    dx, dy = xs - cx, ys - cy
    r = float(radius)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.85 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # apex at the top, base at the bottom: inside when below both slanted edges
        inside_y = (dy >= -r) & (dy <= r)
        half_width = (dy + r) / 2.0  # 0 at apex, r at base
        return inside_y & (np.abs(dx) <= half_width)
    # cross: two bars of width 2r/3
    w = r / 3.0
    return ((np.abs(dx) <= r) & (np.abs(dy) <= w)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))


def render(objects: list[ShapeObject], size: int = IMAGE_SIZE) -> np.ndarray:
    """Paint objects (already carrying masks) on the background; returns (size, size, 3) uint8."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    for o in objects:
        img[o.mask] = COLORS[o.color]
    return img


def make_object(shape: str, color: str, size: str, position: str, rng: np.random.Generator | None = None,
                jitter: int = JITTER) -> ShapeObject:
    """Build one object; its centre is the position's anchor plus a seeded jitter."""
    for name, value, allowed in (("shape", shape, SHAPES), ("color", color, tuple(COLORS)),
                                 ("size", size, SIZES), ("position", position, POSITIONS)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
    ax, ay = POSITION_ANCHOR[position]
    if rng is not None and jitter:
        ax += int(rng.integers(-jitter, jitter + 1))
        ay += int(rng.integers(-jitter, jitter + 1))
    mask = shape_mask(shape, (ax, ay), SIZE_RADIUS[size])
    return ShapeObject(shape, color, size, position, (ax, ay), mask)


def _choice(rng: np.random.Generator, dist: dict[str, float]) -> str:
    keys = list(dist)
    p = np.array([dist[k] for k in keys], np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _word(rng: np.random.Generator, canon: str, synonyms: bool) -> str:
    if synonyms and canon in SYNONYMS and rng.random() < SYNONYM_PROB:
        syns = SYNONYMS[canon]
        return syns[int(rng.integers(len(syns)))]
    return canon


def sample_scene(seed: int, num_objects: int | None = None, synonyms: bool = True) -> Scene:
    """Draw one scene (image, caption, masks, word map) deterministically from ``seed``."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng(seed)
    if num_objects is None:
        ks = list(NUM_OBJECTS_PROB)
        num_objects = ks[int(rng.choice(len(ks), p=list(NUM_OBJECTS_PROB.values())))]
    if num_objects not in LAYOUTS:
        raise ValueError(f"num_objects must be one of {sorted(LAYOUTS)}, got {num_objects}")
    layout = LAYOUTS[num_objects][int(rng.integers(len(LAYOUTS[num_objects])))]
    mention_position = num_objects == 1 and rng.random() < MENTION_PROB["position"] or (
        num_objects == 2 and rng.random() < 0.5)
    specs = []
    for k in range(num_objects):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        mention_color = rng.random() < MENTION_PROB["color"]
        mention_size = num_objects < 3 and rng.random() < MENTION_PROB["size"]
        color = _choice(rng, {c: 1.0 for c in COLORS}) if mention_color else _choice(
            rng, attribute_distribution(shape, "color"))
        if num_objects == 3:
            size = "small"  # three objects only fit side by side when small
        else:
            size = _choice(rng, {s: 1.0 for s in SIZES}) if mention_size else _choice(
                rng, attribute_distribution(shape, "size"))
        if num_objects == 1:
            position = _choice(rng, {p: 1.0 for p in POSITIONS}) if mention_position else _choice(
                rng, attribute_distribution(shape, "position"))
        else:
            position = layout[k]
        specs.append((shape, color, size, position, mention_color, mention_size))
    return build_scene(specs, mention_position=mention_position, rng=rng, synonyms=synonyms, seed=seed)


def build_scene(specs, mention_position: bool, rng: np.random.Generator | None = None,
                synonyms: bool = False, seed: int = -1) -> Scene:
    """Render a scene from explicit object specs.

    ``specs``: list of (shape, color, size, position, mention_color, mention_size). The caption
    names every shape; colours/sizes only where mentioned; positions when ``mention_position``.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    jitter = 0 if len(specs) == 3 else JITTER  # three small objects sit 16 px apart: no room to jitter
    objects = [make_object(s, c, z, p, rng, jitter) for (s, c, z, p, _, _) in specs]
    words: list[str] = []
    owners: list[int | None] = []
    roles: list[str] = []
    pieces: list[str] = []  # caption chunks, joined with spaces

    def add(word: str, owner: int | None, role: str) -> None:
        words.append(word)
        owners.append(owner)
        roles.append(role)
        pieces.append(word)

    for k, ((shape, color, size, position, m_color, m_size), _obj) in enumerate(zip(specs, objects)):
        if k > 0:
            if k == len(specs) - 1:
                add("and", None, "function")
            else:
                pieces[-1] += ","
        add("a", None, "function")
        if m_size:
            add(_word(rng, size, synonyms), k, "size")
        if m_color:
            add(_word(rng, color, synonyms), k, "color")
        add(_word(rng, shape, synonyms), k, "shape")
        if mention_position:
            if position == "center":
                add("in", None, "function")
            else:
                add("on", None, "function")
            add("the", None, "function")
            add(position, k, "position")
    caption = " ".join(pieces)
    image = render(objects)
    return Scene(image, objects, caption, words, owners, roles, seed)


def scene_from_prompt(prompt: str, seed: int = 0) -> Scene:
    """Parse a caption of the ShapesWorld grammar and render the scene it describes.

    Omitted attributes are drawn (seeded) from the biases; useful for ground truth of
    hand-written prompts such as "a red circle and a blue square".
    """
    rng = np.random.default_rng(seed)
    chunks = [c.strip() for c in prompt.replace(",", " and ").split(" and ") if c.strip()]
    if not 1 <= len(chunks) <= 3:
        raise ValueError(f"prompt {prompt!r} names {len(chunks)} objects; ShapesWorld has 1 to 3")
    layout = LAYOUTS[len(chunks)][0]
    specs = []
    mention_position = False
    for k, chunk in enumerate(chunks):
        toks = [canonical(t) for t in chunk.split() if t not in FUNCTION_WORDS]
        unknown = [t for t in toks if t not in COLORS and t not in SIZES and t not in POSITIONS and t not in SHAPES]
        if unknown:
            raise ValueError(f"unknown words {unknown} in prompt {prompt!r}; vocabulary: {', '.join(vocabulary())}")
        shape = [t for t in toks if t in SHAPES]
        if len(shape) != 1:
            raise ValueError(f"object {chunk!r} of prompt {prompt!r} must name one shape of: {', '.join(SHAPES)}")
        color = [t for t in toks if t in COLORS]
        size = [t for t in toks if t in SIZES]
        pos = [t for t in toks if t in POSITIONS]
        shape = shape[0]
        mention_position = mention_position or bool(pos)
        c = color[0] if color else _choice(rng, attribute_distribution(shape, "color"))
        z = size[0] if size else ("small" if len(chunks) == 3 else _choice(rng, attribute_distribution(shape, "size")))
        p = pos[0] if pos else (layout[k] if len(chunks) > 1 else _choice(rng, attribute_distribution(shape, "position")))
        specs.append((shape, c, z, p, bool(color), bool(size)))
    return build_scene(specs, mention_position=mention_position, rng=rng, synonyms=False, seed=seed)


def vocabulary() -> list[str]:
    """Every word a ShapesWorld caption can contain."""
    words = set(FUNCTION_WORDS) | set(COLORS) | set(SHAPES) | set(SIZES) | set(POSITIONS)
    for syns in SYNONYMS.values():
        words.update(syns)
    return sorted(words)
