"""Small helpers for the data-pipeline tests: image folders, parsed args, a fake VAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.args import setup_network_parser


def write_image(path: Path, size: tuple[int, int], *, seed: int = 0, alpha: bool = False) -> Path:
    """A random-noise image of ``size`` (w, h); RGBA with a left-half-opaque alpha when ``alpha``."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if alpha:
        a = np.zeros((h, w, 1), dtype=np.uint8)
        a[:, : w // 2] = 255
        pixels = np.concatenate([pixels, a], axis=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_folder(folder: Path, sizes: list[tuple[int, int]], captions: list[str | None] | None = None,
                 *, ext: str = ".caption", prefix: str = "img") -> list[Path]:
    """Images ``<prefix><i>.png`` of ``sizes`` with optional caption files."""
    paths = []
    for i, size in enumerate(sizes):
        path = write_image(folder / f"{prefix}{i}.png", size, seed=i)
        if captions is not None and captions[i] is not None:
            path.with_suffix(ext).write_text(captions[i], encoding="utf-8")
        paths.append(path)
    return paths


def parse(*argv: str, **flags) -> object:
    """``setup_network_parser().parse_args`` from argv plus ``flag=value`` pairs (True -> bare flag)."""
    items = list(argv)
    for key, value in flags.items():
        if value is False or value is None:
            continue
        items.append(f"--{key}")
        if value is not True:
            items.append(str(value))
    return setup_network_parser().parse_args(items)


def make_group(tmp_path: Path, **flags):
    """The training DatasetGroup of ``<tmp_path>/train`` (64 px, seed 3 unless given), built from flags."""
    from library.dataset_config import build_dataset_group

    flags.setdefault("resolution", 64)
    flags.setdefault("seed", 3)
    return build_dataset_group(parse(train_data_dir=tmp_path / "train", **flags))[0]


class FakeVAE:
    """Counts calls; 'encodes' by 8x average pooling plus a constant 4th channel."""

    def __init__(self, nan: bool = False):
        self.calls = 0
        self.images = 0
        self.nan = nan

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += images.shape[0]
        pooled = torch.nn.functional.avg_pool2d(images, 8)
        out = torch.cat([pooled, torch.ones_like(pooled[:, :1])], dim=1)
        if self.nan:
            out[0] = float("nan")
        return out
