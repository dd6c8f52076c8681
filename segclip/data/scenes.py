"""Procedural captioned scenes: coloured shapes on textured backgrounds, with masks.

Deterministic for a seed, so the demo and the tests need no download. Each
scene has 1-3 objects; its caption names their shapes, half the time with their colours,
and, for two objects, where they stand relative to each other, in one of a few frames ("a
photo of ...", "... on a pattern"). Each shape has its own colour
(with per-object jitter), as real classes have typical looks: with colours drawn
independently of shapes, the tiny model trained from scratch in the CPU demo
matched captions by colour alone and named an image's shapes at chance (32%
top-1 on the demo benchmark after 600 steps); with tied colours, 74%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SCENES_VERSION = 3  # bump when a seed's scenes change, so no stage reuses older ones
CATEGORIES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")
COLOURS = {  # the colour of each shape in CATEGORIES, in order
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}


# How a caption frames its list of objects. The zero-shot prompt is "a photo of a {}.": a
# frame no caption used puts a word the text tower never trained into every class prompt.
CAPTION_FRAMES = ("{}.", "a photo of {}.", "a picture of {}", "{} on a pattern")
# An object's colour is named in this share of its mentions ("a blue triangle", else "a
# triangle"). Named always, the colour alone matched every caption (each shape has its own)
# and the text tower learned shape names, which the prompts hold alone, by the seed's luck.
COLOUR_MENTION_SHARE = 0.5


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    class_map: np.ndarray  # (H, W) uint8: 0 background, k = CATEGORIES[k - 1]


def _polygon(category: str, box: tuple[float, float, float, float]) -> list[tuple]:
    """The outline of a shape centred at (cx, cy) with radius r, turned by `turn` radians."""
    cx, cy, r, turn = box

    def ring(n: int, radius_of) -> list[tuple]:
        return [
            (
                cx + radius_of(i) * math.cos(turn + 2 * math.pi * i / n),
                cy + radius_of(i) * math.sin(turn + 2 * math.pi * i / n),
            )
            for i in range(n)
        ]

    if category == "triangle":
        return ring(3, lambda i: r)
    if category == "square":
        return ring(4, lambda i: r)
    if category == "diamond":
        return [(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)]
    if category == "hexagon":
        return ring(6, lambda i: r)
    if category == "star":
        return ring(10, lambda i: r if i % 2 == 0 else 0.45 * r)
    if category == "cross":
        a, b = r, 0.35 * r
        return [
            (cx - b, cy - a),
            (cx + b, cy - a),
            (cx + b, cy - b),
            (cx + a, cy - b),
            (cx + a, cy + b),
            (cx + b, cy + b),
            (cx + b, cy + a),
            (cx - b, cy + a),
            (cx - b, cy + b),
            (cx - a, cy + b),
            (cx - a, cy - b),
            (cx - b, cy - b),
        ]
    raise KeyError(category)


def _draw(draw: ImageDraw.ImageDraw, category: str, box: tuple, fill) -> None:
    cx, cy, r, _ = box
    if category == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif category == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(0.35 * r)))
    else:
        draw.polygon(_polygon(category, box), fill=fill)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.integers(60, 200, size=3)
    y, x = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, math.pi)
    stripes = np.sin((x * math.cos(angle) + y * math.sin(angle)) * rng.uniform(4, 20) * math.pi)
    texture = stripes[..., None] * rng.uniform(5, 30) + rng.normal(
        0, rng.uniform(2, 15), (size, size, 3)
    )
    return np.clip(base + texture, 0, 255).astype(np.uint8)


def render_scene(rng: np.random.Generator, size: int) -> Scene:
    """One scene of 1-3 objects; later objects may partly cover earlier ones."""
    image = Image.fromarray(_background(rng, size))
    mask = Image.new("L", (size, size), 0)
    draw, mask_draw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    objects = []
    for _ in range(rng.integers(1, 4)):
        index = rng.integers(len(CATEGORIES))
        category, colour = CATEGORIES[index], list(COLOURS)[index]
        fill = tuple(
            int(c) for c in np.clip(np.add(COLOURS[colour], rng.integers(-25, 26, 3)), 0, 255)
        )
        r = rng.uniform(0.12, 0.3) * size
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        box = (cx, cy, r, rng.uniform(0, 2 * math.pi))
        _draw(draw, category, box, fill)
        _draw(mask_draw, category, box, CATEGORIES.index(category) + 1)
        objects.append((colour, category, cx))
    return Scene(np.asarray(image), _caption(rng, objects), np.asarray(mask))


def _caption(rng: np.random.Generator, objects: list[tuple[str, str, float]]) -> str:
    def mention(colour: str, category: str) -> str:
        return f"a {colour} {category}" if rng.random() < COLOUR_MENTION_SHARE else f"a {category}"

    if len(objects) == 2 and rng.random() < 0.5:
        left, right = sorted(objects, key=lambda o: o[2])
        listing = f"{mention(*left[:2])} to the left of {mention(*right[:2])}"
    else:
        names = [mention(colour, category) for colour, category, _ in objects]
        listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]}"
    return str(rng.choice(CAPTION_FRAMES)).format(listing)
