"""Resolved dataset settings: the typed blueprints the data pipeline is built from.

``library.dataset_config`` turns the TOML/JSON file (or the CLI-only flags) into these objects,
resolving each value subset -> dataset -> general -> command line -> the defaults below. Nothing
downstream reads ``args`` or raw dicts: a subset or dataset is fully described by its dataclass.
Field names are the TOML key names, so the schema, the resolution and these classes line up.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from library.data.captions import CaptionOptions

DatasetKind = Literal["dreambooth", "fine_tuning"]


@dataclass(frozen=True)
class SubsetParams:
    """Settings shared by every kind of subset (all valid in [general], [[datasets]] and subsets)."""

    image_dir: Path | None = None
    num_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    random_crop: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    custom_attributes: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)
    alpha_mask: bool = False
    resize_interpolation: str | None = None
    # Where this subset came from, for error messages and logs ("datasets[0].subsets[1]" or a folder).
    where: str = field(default="", compare=False)

    @property
    def is_reg(self) -> bool:
        return False

    @property
    def mask_dir(self) -> Path | None:
        """The folder of mask images (``conditioning_data_dir``), or None; DreamBooth subsets only."""
        return None

    @property
    def conditioning_image_dir(self) -> Path | None:
        """The folder of ControlNet conditioning images (``conditioning_data_dir`` of a ControlNet subset)."""
        return None

    @property
    def uses_masks(self) -> bool:
        """Whether samples of this subset carry a loss mask (alpha channel or mask image)."""
        return self.alpha_mask or self.mask_dir is not None

    @property
    def name(self) -> str:
        """The name used in metadata (``ss_dataset_dirs``, ``ss_tag_frequency``): the folder's basename."""
        return self.image_dir.name if self.image_dir is not None else ""

    def caption_options(self) -> CaptionOptions:
        """The caption settings, by name: every CaptionOptions field is also a subset key."""
        return CaptionOptions(**{f.name: getattr(self, f.name) for f in fields(CaptionOptions)})

    def uncacheable_reason(self, *, face_crop: bool = True) -> str | None:
        """Why latents of this subset cannot be cached (they change every epoch), or None.

        ``face_crop``: whether face crops are active for the dataset (they are only without bucketing).
        """
        for flag in ("color_aug", "random_crop"):
            if getattr(self, flag):
                return f"{flag} is on"
        if face_crop and self.face_crop_aug_range is not None:
            return "face_crop_aug_range is set"
        return None


@dataclass(frozen=True)
class DreamBoothSubsetParams(SubsetParams):
    """A folder of images with one caption file per image (or ``class_tokens`` as the caption)."""

    is_reg: bool = False  # type: ignore[assignment]  # a field here, a constant False on the base
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    cache_info: bool = False
    # Loss masks: one image per training image (same stem), red channel = mask (white trains).
    conditioning_data_dir: Path | None = None

    @property
    def mask_dir(self) -> Path | None:
        return self.conditioning_data_dir


@dataclass(frozen=True)
class ControlNetSubsetParams(DreamBoothSubsetParams):
    """A DreamBooth-style folder whose ``conditioning_data_dir`` holds one ControlNet conditioning image per
    image (same stem): what the ControlNet trainers read; there it is no loss mask."""

    @property
    def mask_dir(self) -> Path | None:
        return None

    @property
    def conditioning_image_dir(self) -> Path | None:
        return self.conditioning_data_dir


@dataclass(frozen=True)
class FineTuningSubsetParams(SubsetParams):
    """Images listed in a metadata file (json / jsonl) that also holds their captions and tags."""

    metadata_file: Path | None = None

    @property
    def name(self) -> str:
        return self.metadata_file.name if self.metadata_file is not None else super().name


@dataclass(frozen=True)
class DatasetParams:
    """One ``[[datasets]]`` entry: batching and bucketing settings plus its subsets."""

    kind: DatasetKind
    subsets: tuple[SubsetParams, ...]
    resolution: tuple[int, int]  # (width, height)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    resize_interpolation: str | None = None
    validation_split: float = 0.0
    validation_seed: int | None = None
    where: str = field(default="", compare=False)

    @property
    def is_dreambooth(self) -> bool:
        return self.kind == "dreambooth"
