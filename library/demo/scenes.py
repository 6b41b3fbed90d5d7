"""Synthetic pictures for the demo model: the captioned shapes world it learns, the wider
picture distribution its VAE learns, and the yellow star it has never seen.

Three distributions, kept apart on purpose:

- :func:`captioned_shape` — one circle, square or triangle of a named colour on a plain background
  of another, with its caption ("a red circle on a blue background"). The U-Net and text encoder
  of the demo model are trained on these only.
- :func:`random_picture` — plain or two-tone backgrounds with one or two random polygons,
  ellipses, stars and stripes in arbitrary colours. The VAE is trained on these, so it can encode
  and decode pictures the text-to-image model has never been shown (like any real SD VAE).
- :func:`example_star` — the bundled example concept: a solid yellow five-pointed star. Neither
  the U-Net nor the text encoder ever sees a star.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from library.demo.shapes import COLOURS

SHAPES = ("circle", "square", "triangle")
SHAPE_COLOURS = tuple(COLOURS)


def _star_points(cx: float, cy: float, outer: float, inner: float, rotation: float = -math.pi / 2,
                 points: int = 5) -> list[tuple[float, float]]:
    out = []
    for i in range(2 * points):
        radius = outer if i % 2 == 0 else inner
        angle = rotation + i * math.pi / points
        out.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return out


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r * 1.1), (cx + r * 1.05, cy + r * 0.85), (cx - r * 1.05, cy + r * 0.85)]
    return None  # circle: an ellipse box


def captioned_shape(rng: random.Random, size: int = 64) -> tuple[Image.Image, str]:
    """A random shape of the demo world and its caption. Size and position vary a little (radius
    0.24-0.34 of the side, centre within 0.08 of the middle), so the model learns the shape, not
    one bitmap."""
    shape = rng.choice(SHAPES)
    colour, background = rng.sample(SHAPE_COLOURS, 2)
    img = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.24, 0.34)
    cx = size * (0.5 + rng.uniform(-0.08, 0.08))
    cy = size * (0.5 + rng.uniform(-0.08, 0.08))
    polygon = _shape_polygon(shape, cx, cy, r)
    if polygon is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    else:
        draw.polygon(polygon, fill=COLOURS[colour])
    return img, f"a {colour} {shape} on a {background} background"


def _random_colour(rng: random.Random) -> tuple[int, int, int]:
    if rng.random() < 0.8:
        return COLOURS[rng.choice(SHAPE_COLOURS)]
    return tuple(rng.randrange(256) for _ in range(3))  # type: ignore[return-value]


def _stripes(size: int, colours: tuple[tuple[int, int, int], tuple[int, int, int]], width: float,
             angle: float) -> Image.Image:
    """A ``size``x``size`` picture of parallel stripes (two colours, ``width`` px each, at ``angle``)."""
    img = Image.new("RGB", (size, size), colours[0])
    draw = ImageDraw.Draw(img)
    c, s = math.cos(angle), math.sin(angle)
    half = size * 1.5
    offset = -half
    while offset < half:
        # A band perpendicular to (c, s) at distance offset..offset+width from the centre.
        a, b = offset, offset + width
        centre = size / 2
        quad = [(centre + c * d - s * t, centre + s * d + c * t) for d, t in ((a, -half), (b, -half), (b, half), (a, half))]
        draw.polygon(quad, fill=colours[1])
        offset += 2 * width
    return img


def random_picture(rng: random.Random, size: int = 64) -> Image.Image:
    """A picture from the VAE's training distribution (see the module docstring)."""
    if rng.random() < 0.25:
        img = _stripes(size, (_random_colour(rng), _random_colour(rng)), rng.uniform(4, 12), rng.uniform(0, math.pi))
    else:
        img = Image.new("RGB", (size, size), _random_colour(rng))
    for _ in range(rng.randint(1, 2)):
        cx, cy = rng.uniform(0.15, 0.85) * size, rng.uniform(0.15, 0.85) * size
        r = rng.uniform(0.08, 0.4) * size
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        kind = rng.random()
        if kind < 0.3:
            draw.ellipse((cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r), fill=255)
        elif kind < 0.55:
            draw.polygon(_star_points(cx, cy, r, r * rng.uniform(0.35, 0.6), rng.uniform(0, math.pi),
                                     rng.randint(4, 7)), fill=255)
        else:
            n = rng.randint(3, 6)
            start = rng.uniform(0, math.pi)
            draw.polygon([(cx + r * math.cos(start + 2 * math.pi * i / n), cy + r * math.sin(start + 2 * math.pi * i / n))
                          for i in range(n)], fill=255)
        if rng.random() < 0.35:
            fill = _stripes(size, (_random_colour(rng), _random_colour(rng)), rng.uniform(4, 10), rng.uniform(0, math.pi))
        else:
            fill = Image.new("RGB", (size, size), _random_colour(rng))
        img.paste(fill, (0, 0), mask)
    return img


def example_star(background: str, *, size: int = 64, rotation: float = 0.0, scale: float = 1.0,
                 offset: tuple[float, float] = (0.0, 0.0), colour: str = "yellow") -> Image.Image:
    """The bundled example concept: a five-pointed star (solid ``colour``) on ``background``.

    Solid rather than striped: a VAE this small (8x8 latents) turns fine stripes into blotches,
    so a LoRA would learn the blotches; a star's outline it keeps."""
    img = Image.new("RGB", (size, size), COLOURS[background])
    cx, cy = size * (0.5 + offset[0]), size * (0.5 + offset[1])
    outer = size * 0.42 * scale
    ImageDraw.Draw(img).polygon(_star_points(cx, cy, outer, outer * 0.45, -math.pi / 2 + rotation),
                                fill=COLOURS[colour])
    return img
