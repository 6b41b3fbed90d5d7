"""Does the demo model draw what it is asked? Colour statistics of generated shapes.

A shape prompt ("a red circle on a blue background") should give the shape's colour in the
middle of the picture and the background's colour at its border. :func:`region_colours` measures
the mean colour of both regions; :func:`closest_colour` names it from the demo palette. The build
script prints a report, and the tests assert it, so a regression in loading or generation shows.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.demo.shapes import COLOURS

CHECK_PROMPTS = (
    ("red", "circle", "blue"),
    ("yellow", "square", "black"),
    ("green", "triangle", "white"),
    ("blue", "circle", "orange"),
    ("white", "square", "purple"),
)


def region_colours(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(mean RGB of the shape, mean RGB of the outer 8% frame). The shape's pixels are the 40% of
    the central half of the picture that differ most from the frame's colour, so a shape drawn a
    little off centre or thin (a triangle) is still measured on its own pixels."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = a.shape[:2]
    m = max(1, int(min(h, w) * 0.08))
    frame = np.concatenate([a[:m].reshape(-1, 3), a[-m:].reshape(-1, 3), a[m:-m, :m].reshape(-1, 3),
                            a[m:-m, -m:].reshape(-1, 3)]).mean(0)
    inner = a[h // 4:h - h // 4, w // 4:w - w // 4].reshape(-1, 3)
    distance = np.linalg.norm(inner - frame, axis=1)
    shape = inner[distance >= np.quantile(distance, 0.6)].mean(0)
    return shape, frame


_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in COLOURS[name]))[0]
         for name in ("red", "orange", "yellow", "green", "blue", "purple")}


def closest_colour(rgb: np.ndarray) -> str:
    """The demo palette's name for a colour: black when dark, white when bright and grey-ish, else
    the palette colour of nearest hue. Names by hue, not RGB distance, because a small VAE shifts
    brightness and saturation (a dark green is still green) far more than hue."""
    h, s, v = colorsys.rgb_to_hsv(*(float(c) / 255 for c in rgb))
    if v < 0.25:
        return "black"
    if s < 0.25:
        return "white" if v > 0.6 else "black"
    return min(_HUES, key=lambda name: min(abs(h - _HUES[name]), 1 - abs(h - _HUES[name])))


@torch.no_grad()
def generate(model_path: str | Path, prompts: Iterable[str], *, seed: int = 0, steps: int = 20, scale: float = 5.0,
             size: int = 64, sampler: str = "euler_a") -> list[Image.Image]:
    """Images for ``prompts`` from an SD1 file through the same sampler previews and gen_img.py use."""
    from library.families.sd import text
    from library.families.sd.family import LATENT_SCALE
    from library.families.sd.loading import load_sd_models
    from library.sampling.pipeline import LatentDiffusionSampler
    from library.sampling.prompts import SamplePrompt

    sd = load_sd_models(str(model_path), v2=False, keep_extras=False)

    def encode(texts: list[str]) -> torch.Tensor:
        return text.encode(sd.text_encoder, text.tokenize(sd.tokenizer, texts, max_token_length=None),
                           clip_skip=None, max_token_length=None)

    sampler_ = LatentDiffusionSampler(sd.unet, sd.vae, encode, latent_scale=LATENT_SCALE)
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + i)
        images.append(sampler_.generate(SamplePrompt(prompt=prompt, width=size, height=size, steps=steps, scale=scale),
                                        sampler_name=sampler, v_parameterization=False, generator=generator,
                                        device="cpu", dtype=torch.float32, progress=False))
    return images


def colour_report(model_path: str | Path, *, seed: int = 0) -> list[str]:
    """One line per check prompt: what was asked, which colours came out, and whether they match."""
    prompts = [f"a {c} {s} on a {b} background" for c, s, b in CHECK_PROMPTS]
    lines = []
    for (colour, _shape, background), prompt, image in zip(CHECK_PROMPTS, prompts, generate(model_path, prompts, seed=seed)):
        centre, frame = region_colours(image)
        got = closest_colour(centre), closest_colour(frame)
        mark = "ok" if got == (colour, background) else "MISMATCH"
        lines.append(f"{prompt!r}: shape {got[0]}, border {got[1]} [{mark}]")
    return lines
