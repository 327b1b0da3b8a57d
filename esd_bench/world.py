"""A small synthetic image world with captions: one coloured shape on a patterned ("style") background.

Every image has exactly one value for each of three attributes:

* ``shape``  -- circle, square, triangle, star, cross   (object-class erasure: erase "circle")
* ``color``  -- red, green, blue, yellow, purple         (attribute erasure)
* ``style``  -- plain, striped, dotted, checkered, gradient background pattern (style erasure: erase "striped")

Nuisance factors (position, size, rotation, exact colour, grey levels, pattern period/phase/angle) are drawn at
random so that a model has to learn the concept, not a template. Everything is a pure function of ``(seed, index)``:
the i-th sample of a dataset never depends on how many samples are drawn.

Captions name a random subset of the attributes, in varied phrasings and word orders, and use paraphrases
("round disc", "crimson", "banded") for about a fifth of the mentions. The paraphrases are what robustness
benchmarks use: after erasing "circle", does "a round disc" still draw circles? About 10% of captions are empty,
which is what classifier-free guidance needs for its unconditional branch.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
_SUPERSAMPLE = 4  # render at 4x and box-filter down: anti-aliased edges like a real photo/drawing would have

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "star", "cross"),
    "color": ("red", "green", "blue", "yellow", "purple"),
    "style": ("plain", "striped", "dotted", "checkered", "gradient"),
}
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(ATTRIBUTES)

# Words that describe a value without its canonical name. They appear in ~20% of training mentions, so the
# model learns them as synonyms; prompts built from them test whether an erasure generalises beyond one word.
PARAPHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {
        "circle": ("round disc", "disk"),
        "square": ("box", "four-sided block"),
        "triangle": ("three-sided shape", "pyramid"),
        "star": ("five-pointed shape", "pentagram"),
        "cross": ("plus sign", "plus shape"),
    },
    "color": {
        "red": ("crimson", "scarlet"),
        "green": ("emerald", "jade"),
        "blue": ("azure", "cobalt"),
        "yellow": ("golden", "lemon"),
        "purple": ("violet", "lavender"),
    },
    "style": {
        "plain": ("blank", "solid grey"),
        "striped": ("banded", "pinstriped"),
        "dotted": ("polka dot", "spotted"),
        "checkered": ("checkerboard", "chequered"),
        "gradient": ("fading", "shaded"),
    },
}

_BASE_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (150, 55, 195),
}


@dataclass(frozen=True)
class Scene:
    """All factors of one image: the three labelled attributes and the nuisance parameters."""

    shape: str
    color: str
    style: str
    center: tuple[float, float]  # pixels
    radius: float  # pixels, circumradius-like object size
    angle: float  # degrees
    rgb: tuple[int, int, int]
    light: int  # grey level of the light background component
    dark: int  # grey level of the dark background component
    period: float  # pattern period in pixels (stripes, dots, checks)
    phase: float  # pattern phase in [0, 1)
    pattern_angle: float  # degrees; stripe/gradient direction

    def labels(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "style": self.style}


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of sample ``index`` of dataset ``seed`` (independent of all other samples)."""
    return np.random.default_rng([int(seed), int(index)])


def sample_scene(rng: np.random.Generator, **fixed: str) -> Scene:
    """Draw a scene; ``fixed`` pins attributes, e.g. ``sample_scene(rng, shape="circle")``."""
    unknown = set(fixed) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}")
    values = {a: fixed.get(a) or str(rng.choice(ATTRIBUTES[a])) for a in ATTRIBUTE_NAMES}
    base = np.array(_BASE_RGB[values["color"]])
    rgb = tuple(int(v) for v in np.clip(base + rng.integers(-15, 16, size=3), 0, 255))
    stripe_angle = float(rng.choice([45.0, -45.0]) + rng.uniform(-10, 10))
    # Object size: radius 16-21 px (32-42 px across, 8-10 latent pixels at the toy VAE's 16x16) and rotation within
    # +-12 degrees. With 13-18 px, +-20 degrees and +-6 px of jitter the same training recipe drew squares, triangles
    # and crosses as rounded blobs (prompted shape 53%, colour 70% after 4500 steps); at this size 85% and 76% after
    # the same 4500 steps (95% and 92% after 6000, the committed toy; esd_bench/README.md).
    return Scene(
        shape=values["shape"],
        color=values["color"],
        style=values["style"],
        center=(float(32 + rng.uniform(-4, 4)), float(32 + rng.uniform(-4, 4))),
        radius=float(rng.uniform(16, 21)),
        angle=float(rng.uniform(-12, 12)),
        rgb=rgb,  # type: ignore[arg-type]
        light=int(rng.integers(165, 215)),
        dark=int(rng.integers(85, 125)),
        period=float(rng.uniform(9, 13)),
        phase=float(rng.uniform(0, 1)),
        pattern_angle=stripe_angle if values["style"] == "striped" else float(rng.uniform(0, 360)),
    )


def _background(scene: Scene, size: int) -> np.ndarray:
    """Grey background pattern as float (size, size) in [0, 255]; coordinates are in output pixels."""
    coords = ((np.arange(size) + 0.5) / _SUPERSAMPLE).astype(np.float32)
    x, y = np.meshgrid(coords, coords)
    light, dark, period = float(scene.light), float(scene.dark), scene.period
    shift = scene.phase * period
    if scene.style == "plain":
        return np.full((size, size), (light + dark) / 2)
    if scene.style == "striped":
        t = math.radians(scene.pattern_angle)
        u = x * math.cos(t) + y * math.sin(t) + shift
        return np.where((u % period) < period / 2, light, dark)
    if scene.style == "dotted":
        dx = (x + shift) % period - period / 2
        dy = (y + shift) % period - period / 2
        return np.where(dx * dx + dy * dy < (0.27 * period) ** 2, dark, light)
    if scene.style == "checkered":
        cell = period * 0.75
        parity = (np.floor((x + shift) / cell) + np.floor((y + shift) / cell)) % 2
        return np.where(parity == 0, light, dark)
    if scene.style == "gradient":
        t = math.radians(scene.pattern_angle)
        u = ((x - 32) * math.cos(t) + (y - 32) * math.sin(t)) / 45.0  # about -1..1 across the image
        return dark + (light - dark) * np.clip(0.5 + 0.5 * u, 0, 1)
    raise ValueError(f"unknown style {scene.style!r}")


def _shape_polygon(scene: Scene) -> list[tuple[float, float]] | None:
    """Vertices (in supersampled pixels) of the object; None for the circle, which is drawn as an ellipse."""
    r = scene.radius
    if scene.shape == "circle":
        return None
    if scene.shape == "square":
        pts = [(r * 1.05 * math.cos(a), r * 1.05 * math.sin(a)) for a in np.radians([45, 135, 225, 315])]
    elif scene.shape == "triangle":
        pts = [(r * 1.25 * math.cos(a), r * 1.25 * math.sin(a)) for a in np.radians([-90, 30, 150])]
    elif scene.shape == "star":
        pts = [
            ((r * 1.25 if k % 2 == 0 else r * 0.5) * math.cos(a), (r * 1.25 if k % 2 == 0 else r * 0.5) * math.sin(a))
            for k, a in enumerate(np.radians(np.arange(-90, 270, 36)))
        ]
    elif scene.shape == "cross":
        w, L = 0.38 * r, 1.1 * r
        pts = [(-w, -L), (w, -L), (w, -w), (L, -w), (L, w), (w, w), (w, L), (-w, L), (-w, w), (-L, w), (-L, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    c, s = math.cos(math.radians(scene.angle)), math.sin(math.radians(scene.angle))
    cx, cy = scene.center
    return [((cx + px * c - py * s) * _SUPERSAMPLE, (cy + px * s + py * c) * _SUPERSAMPLE) for px, py in pts]


def render(scene: Scene) -> np.ndarray:
    """Render a scene as a uint8 RGB array of shape (64, 64, 3)."""
    size = IMAGE_SIZE * _SUPERSAMPLE
    grey = _background(scene, size).astype(np.float32)
    mask_img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_img)
    poly = _shape_polygon(scene)
    if poly is None:
        cx, cy, r = scene.center[0] * _SUPERSAMPLE, scene.center[1] * _SUPERSAMPLE, scene.radius * _SUPERSAMPLE
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(poly, fill=255)
    mask = np.asarray(mask_img, dtype=np.float32) / 255.0

    def box(a: np.ndarray) -> np.ndarray:  # box-filter the supersampled plane to the output size
        return a.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE).mean(axis=(1, 3))

    # Composite grey*(1-m) + rgb*m per channel, box-filtered exactly but on single-channel planes only.
    grey_b, grey_mask_b, mask_b = box(grey), box(grey * mask), box(mask)
    small = (grey_b - grey_mask_b)[:, :, None] + mask_b[:, :, None] * np.array(scene.rgb, dtype=np.float32)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------- captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _word(rng: np.random.Generator, attribute: str, value: str, p_paraphrase: float) -> str:
    if rng.random() < p_paraphrase:
        return str(rng.choice(PARAPHRASES[attribute][value]))
    return value


def caption(scene: Scene, rng: np.random.Generator, p_empty: float = 0.1, p_name: float = 0.75,
            p_paraphrase: float = 0.2) -> str:
    """A random caption of ``scene``: a random subset of its attributes, random words, random word order."""
    if rng.random() < p_empty:
        return ""
    named = {a: rng.random() < p_name for a in ATTRIBUTE_NAMES}
    if not any(named.values()):
        named[str(rng.choice(ATTRIBUTE_NAMES))] = True
    shape = _word(rng, "shape", scene.shape, p_paraphrase) if named["shape"] else None
    color = _word(rng, "color", scene.color, p_paraphrase) if named["color"] else None
    style = _word(rng, "style", scene.style, p_paraphrase) if named["style"] else None

    obj: str | None
    if shape and color:
        obj = str(rng.choice([f"{color} {shape}", f"{color} {shape}", f"{shape} that is {color}",
                              f"{shape} coloured {color}"]))
    elif shape:
        obj = shape
    elif color:
        obj = str(rng.choice([f"{color} shape", f"{color} object", f"{color} thing"]))
    else:
        obj = None
    if obj is None:
        assert style is not None
        return str(rng.choice([_article(f"{style} background"), f"{style} pattern", f"an image in {style} style",
                               f"{style} style"]))
    if style is None:
        return str(rng.choice([_article(obj), obj, f"a picture of {_article(obj)}", f"{obj}, centered"]))
    return str(rng.choice([
        f"{_article(obj)} on {_article(style + ' background')}",
        f"{_article(obj)} with {_article(style + ' pattern')} behind it",
        f"{style} background, {obj}",
        f"{obj}, {style}",
        f"{_article(obj)} in {style} style",
        f"{style} style image of {_article(obj)}",
    ]))


def prompt_for(shape: str | None = None, color: str | None = None, style: str | None = None) -> str:
    """The canonical prompt naming the given attribute values (in the commonest training phrasing).

    The values may be canonical names or paraphrases: ``prompt_for(shape="round disc")`` works too.
    """
    obj = " ".join(w for w in (color, shape) if w) if shape else (f"{color} shape" if color else None)
    if obj is None:
        if style is None:
            return ""
        return _article(f"{style} background")
    if style is None:
        return _article(obj)
    return f"{_article(obj)} on {_article(style + ' background')}"


def paraphrase_prompts(attribute: str, value: str) -> list[str]:
    """Prompts asking for ``value`` only through its paraphrases, e.g. circle -> ["a round disc", "a disk"].

    After erasing a concept by its name these test whether the erasure generalises to other words for it.
    """
    return [prompt_for(**{attribute: p}) for p in PARAPHRASES[attribute][value]]


def _vocabulary() -> list[tuple[str, str, str]]:
    """(phrase, attribute, value) for every canonical name and paraphrase, longest phrase first."""
    entries = [(v, a, v) for a, vals in ATTRIBUTES.items() for v in vals]
    entries += [(p, a, v) for a, table in PARAPHRASES.items() for v, ps in table.items() for p in ps]
    return sorted(entries, key=lambda e: -len(e[0]))


def attributes_in_text(text: str) -> dict[str, str]:
    """Which attribute values a prompt asks for, by canonical name or paraphrase (first match per attribute)."""
    found: dict[str, str] = {}
    remaining = f" {text.lower()} "
    for phrase, attribute, value in _vocabulary():
        pattern = rf"(?<![\w-]){re.escape(phrase)}(?![\w-])"
        if attribute not in found and re.search(pattern, remaining):
            found[attribute] = value
            remaining = re.sub(pattern, " ", remaining)
    return found


# ------------------------------------------------------------------------------------------------------ dataset


@dataclass(frozen=True)
class WorldSample:
    image: np.ndarray  # uint8 (64, 64, 3)
    labels: dict[str, str]
    caption: str


def make_sample(seed: int, index: int, **fixed: str) -> WorldSample:
    """Sample ``index`` of the world drawn with ``seed`` (deterministic)."""
    rng = sample_rng(seed, index)
    scene = sample_scene(rng, **fixed)
    return WorldSample(image=render(scene), labels=scene.labels(), caption=caption(scene, rng))


def label_indices(labels: Mapping[str, str]) -> list[int]:
    """Attribute values -> class indices, in ``ATTRIBUTE_NAMES`` order."""
    return [ATTRIBUTES[a].index(labels[a]) for a in ATTRIBUTE_NAMES]


def make_dataset(seed: int, n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Samples ``start .. start+n-1``: images uint8 (n, 64, 64, 3), labels int64 (n, 3), captions."""
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.empty((n, len(ATTRIBUTE_NAMES)), dtype=np.int64)
    captions: list[str] = []
    for i in range(n):
        s = make_sample(seed, start + i)
        images[i] = s.image
        labels[i] = label_indices(s.labels)
        captions.append(s.caption)
    return images, labels, captions


def render_grid(images: Sequence[np.ndarray] | np.ndarray, columns: int = 8) -> Image.Image:
    """Tile uint8 HxWx3 images into one PIL image (for looking at samples)."""
    images = np.asarray(images)
    rows = math.ceil(len(images) / columns)
    h, w = images.shape[1:3]
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = img
    return Image.fromarray(grid)
