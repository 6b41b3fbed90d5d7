"""Reading subsets from disk: which images a subset has, their sizes and raw captions.

* DreamBooth subset: the images directly inside ``image_dir``; caption from
  ``<stem><caption_extension>`` (also tried with a trailing ``_cx_cy_w_h`` face suffix removed),
  else ``class_tokens``, else "" (warned). With ``cache_info`` the captions and sizes are kept in
  ``<image_dir>/metadata_cache.json`` (delete it after editing captions or images).
  With ``conditioning_data_dir`` every image has a mask image with the same stem there (any
  supported extension; its red channel is the loss mask) and every mask has an image: checked by
  :func:`check_mask_folders` and when the subset is read.
* ControlNet subset (a DreamBooth subset of a ControlNet trainer): ``conditioning_data_dir`` holds the
  conditioning image of every image (same stem, any supported extension, same size or aspect ratio);
  :func:`check_conditioning_folders` names every image without one (and every conditioning image
  without an image) in one error.
* Fine-tuning subset: ``metadata_file`` is a json object ``{"<image key or path>": {"caption",
  "tags", "image_size": [w, h]}}`` or a ``.jsonl`` file of ``{"image_path", "caption", "tags",
  "image_size"}`` lines; caption = caption + caption_separator + tags (tags appended to each line).

Everything that can be wrong with the files (missing folder, unreadable image header, non-UTF-8
or empty caption, image named in the metadata but absent, missing or orphan mask, mask whose
aspect ratio differs from its image) is reported here, at build time.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence, TypeVar

import torch
from tqdm import tqdm

from library.data.buckets import Placement
from library.data.captions import read_caption_file
from library.data.errors import DatasetError
from library.data.images import IMAGE_EXTENSIONS, list_images, parse_face_suffix, read_image_size
from library.data.params import DreamBoothSubsetParams, FineTuningSubsetParams, SubsetParams
from library.io_utils import atomic_path

logger = logging.getLogger(__name__)

INFO_CACHE_NAME = "metadata_cache.json"
_PROGRESS_MIN = 500  # show a progress bar when scanning at least this many images
T = TypeVar("T")


@dataclass(eq=False)
class ImageInfo:
    """One image of one dataset (the same file in two datasets has two ImageInfos)."""

    image_key: str  # the file path for DreamBooth, the metadata key for fine-tuning
    path: Path
    caption: str  # raw caption (several lines when wildcards are on)
    num_repeats: int
    is_reg: bool
    image_size: tuple[int, int]  # original (w, h)
    subset: SubsetParams
    face: tuple[int, int, int, int] | None = None  # (cx, cy, w, h) from the file name
    mask_path: Path | None = None  # the mask image (conditioning_data_dir); replaces any alpha channel
    conditioning_path: Path | None = None  # the ControlNet conditioning image (conditioning_data_dir)
    placement: Placement | None = None  # set by the dataset's bucketing
    crop_ltrb: tuple[int, int, int, int] | None = None
    # Filled by latent caching: in memory, or the npz read for every batch.
    latents: torch.Tensor | None = None
    latents_flipped: torch.Tensor | None = None
    cached_alpha_mask: torch.Tensor | None = None
    latents_npz: Path | None = None
    latents_key_suffix: str = ""  # "_<h>x<w>" in FLUX/SD3-style cache files
    # Filled by text-encoder output caching (``te_cache``): named per-sample tensors in memory, or
    # the npz read for every batch; and the caption they were encoded from (checked per batch).
    text_encoder_outputs: dict[str, torch.Tensor] | None = None
    text_encoder_outputs_npz: Path | None = None
    text_encoder_caption: str | None = None

    @property
    def has_cached_latents(self) -> bool:
        return self.latents is not None or self.latents_npz is not None

    @property
    def has_cached_text_encoder_outputs(self) -> bool:
        return self.text_encoder_outputs is not None or self.text_encoder_outputs_npz is not None


@dataclass(frozen=True)
class ValidationSplit:
    """Which part of a shuffled image list a dataset keeps (§3.8 hook).

    The list is shuffled with ``seed``; the training part is the first ceil(n * (1 - fraction))
    items and the validation part the rest, so the two never overlap.
    """

    fraction: float
    seed: int
    part: Literal["train", "validation"]

    def select(self, items: Sequence[T]) -> list[T]:
        order = list(items)
        random.Random(self.seed).shuffle(order)
        n_train = math.ceil(len(order) * (1 - self.fraction))
        return order[:n_train] if self.part == "train" else order[n_train:]


def _caption_extension(ext: str) -> str:
    return ext if ext.startswith(".") else "." + ext


def _find_caption(image: Path, subset: DreamBoothSubsetParams) -> str | None:
    ext = _caption_extension(subset.caption_extension)
    stems = [image.stem]
    base, face = parse_face_suffix(image.stem)
    if face is not None:
        stems.append(base)
    for stem in stems:
        candidate = image.with_name(stem + ext)
        if candidate.is_file():
            return read_caption_file(candidate, enable_wildcard=subset.enable_wildcard)
    return None


def _read_info_cache(folder: Path) -> dict[str, dict]:
    path = folder / INFO_CACHE_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable %s (%s); it will be rewritten", path, e)
        return {}


def _write_info_cache(folder: Path, infos: list[ImageInfo], raw_captions: dict[str, str | None]) -> None:
    data = {str(i.path): {"caption": raw_captions[str(i.path)], "resolution": list(i.image_size)} for i in infos}
    with atomic_path(folder / INFO_CACHE_NAME) as tmp:
        Path(tmp).write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


# ------------------------------------------------------------------------------- mask images

_MASK_AR_TOLERANCE = 0.02  # relative aspect-ratio difference allowed between an image and its mask


def _first(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def list_masks(folder: Path, where: str, what: str = "masks") -> dict[str, Path]:
    """Mask (or conditioning) images of ``folder`` by file stem; errors name the folder (missing, or two
    images for one stem)."""
    if not folder.is_dir():
        raise DatasetError(f"{where}: conditioning_data_dir {folder} does not exist or is not a folder")
    masks: dict[str, Path] = {}
    for path in list_images(folder):
        if path.stem in masks:
            raise DatasetError(f"{where}: conditioning_data_dir {folder} has two {what} for '{path.stem}' "
                               f"({masks[path.stem].name} and {path.name}): keep one")
        masks[path.stem] = path
    return masks


def check_mask_folders(subsets: Iterable[SubsetParams]) -> None:
    """Every image of a subset with a mask folder has a mask there, and every mask has an image.

    Subsets sharing one folder (the CLI-only ``--conditioning_data_dir`` serves every training
    sub-folder) are checked together: a mask is an orphan only when no subset using the folder
    has an image with its stem. Subsets with ``num_repeats`` < 1 or a missing ``image_dir`` are
    left to the subset loader.
    """
    users: dict[Path, list[SubsetParams]] = {}
    for subset in subsets:
        if subset.mask_dir is not None and subset.num_repeats >= 1:
            users.setdefault(subset.mask_dir, []).append(subset)
    for folder, members in users.items():
        masks = list_masks(folder, members[0].where)
        stems: set[str] = set()
        dirs: list[str] = []
        for subset in members:
            if subset.image_dir is None or not subset.image_dir.is_dir():
                continue
            own = {p.stem for p in list_images(subset.image_dir)}
            missing = sorted(own - set(masks))
            if missing:
                raise DatasetError(f"{subset.where}: {len(missing)} image(s) in {subset.image_dir} have no mask in "
                                   f"conditioning_data_dir {folder} (a mask is an image with the same file stem): "
                                   f"{_first(missing)}; add the masks or move those images out")
            stems |= own
            dirs.append(str(subset.image_dir))
        orphans = sorted(set(masks) - stems)
        if orphans and dirs:
            raise DatasetError(f"conditioning_data_dir {folder}: {len(orphans)} mask(s) have no image with the same "
                               f"file stem in {', '.join(dirs)}: {_first(orphans)}; remove those masks or add the "
                               "images")


def check_conditioning_folders(subsets: Iterable[SubsetParams]) -> None:
    """Every image of a ControlNet subset has a conditioning image with its stem, and every conditioning
    image has an image: else ONE error naming every image without a conditioning image and every
    conditioning image without an image (a folder shared by several subsets is checked as a whole).
    Subsets with ``num_repeats`` < 1 or a missing ``image_dir`` are left to the subset loader."""
    users: dict[Path, list[SubsetParams]] = {}
    for subset in subsets:
        if subset.conditioning_image_dir is not None and subset.num_repeats >= 1:
            users.setdefault(subset.conditioning_image_dir, []).append(subset)
    problems: list[str] = []
    for folder, members in users.items():
        conditioning = list_masks(folder, members[0].where, "conditioning images")
        stems: set[str] = set()
        for subset in members:
            if subset.image_dir is None or not subset.image_dir.is_dir():
                continue
            images = list_images(subset.image_dir)
            missing = [p.name for p in images if p.stem not in conditioning]
            if missing:
                problems.append(f"{len(missing)} image(s) in {subset.image_dir} ({subset.where}) have no conditioning "
                                f"image in {folder}: {', '.join(missing)}")
            stems |= {p.stem for p in images}
        orphans = sorted(p.name for stem, p in conditioning.items() if stem not in stems)
        if orphans and any(s.image_dir is not None and s.image_dir.is_dir() for s in members):
            problems.append(f"{len(orphans)} conditioning image(s) in {folder} have no image with the same file stem: "
                            f"{', '.join(orphans)}")
    if problems:
        raise DatasetError("ControlNet training needs one conditioning image per image, with the same file stem: "
                           + "; ".join(problems) + ". Add the missing files or remove the unpaired ones")


def _attach_conditioning(infos: list[ImageInfo], subset: SubsetParams) -> None:
    folder = subset.conditioning_image_dir
    found = list_masks(folder, subset.where, "conditioning images")
    missing = [i.path.name for i in infos if i.path.stem not in found]
    if missing:
        raise DatasetError(f"{subset.where}: {len(missing)} image(s) have no conditioning image in "
                           f"conditioning_data_dir {folder} (same file stem): {', '.join(missing)}; add them")
    for info in infos:
        info.conditioning_path = found[info.path.stem]
        cw, ch = read_image_size(info.conditioning_path)
        w, h = info.image_size
        if abs((cw / ch) / (w / h) - 1) > _MASK_AR_TOLERANCE:
            raise DatasetError(f"conditioning image {info.conditioning_path} is {cw}x{ch} but its image {info.path} is "
                               f"{w}x{h}: give it the image's size (or the same aspect ratio; it is then resized to "
                               "the image size)")


def _attach_masks(infos: list[ImageInfo], subset: SubsetParams) -> None:
    folder = subset.mask_dir
    masks = list_masks(folder, subset.where)
    missing = sorted(i.path.stem for i in infos if i.path.stem not in masks)
    if missing:
        raise DatasetError(f"{subset.where}: {len(missing)} image(s) have no mask in conditioning_data_dir {folder} "
                           f"(a mask is an image with the same file stem): {_first(missing)}; add the masks")
    for info in infos:
        info.mask_path = masks[info.path.stem]
        mw, mh = read_image_size(info.mask_path)
        w, h = info.image_size
        if abs((mw / mh) / (w / h) - 1) > _MASK_AR_TOLERANCE:
            raise DatasetError(f"mask {info.mask_path} is {mw}x{mh} but its image {info.path} is {w}x{h}: "
                               "the shapes differ; a mask must have the image's size (or the same aspect ratio, "
                               "it is then resized to the image size)")


def load_dreambooth_subset(subset: DreamBoothSubsetParams, *, split: ValidationSplit | None = None) -> list[ImageInfo]:
    """ImageInfos of a DreamBooth subset (repeats = ``num_repeats``); errors name the file."""
    folder = subset.image_dir
    if folder is None:
        raise DatasetError(f"{subset.where}: image_dir is not set: point it to the folder holding the images")
    if not folder.is_dir():
        raise DatasetError(f"{subset.where}: image_dir {folder} does not exist or is not a folder")
    paths = list_images(folder)
    if split is not None:
        paths = sorted(split.select(paths), key=lambda p: p.name)
    cache = _read_info_cache(folder) if subset.cache_info else {}
    raw_captions: dict[str, str | None] = {}
    infos: list[ImageInfo] = []
    scanned = 0  # images not found in the info cache
    for path in tqdm(paths, desc=f"scanning {folder.name}", disable=len(paths) < _PROGRESS_MIN, leave=False):
        entry = cache.get(str(path))
        if entry is not None:
            caption, size = entry.get("caption"), tuple(entry["resolution"])
        else:
            caption, size = _find_caption(path, subset), read_image_size(path)
            scanned += 1
        raw_captions[str(path)] = caption
        face = parse_face_suffix(path.stem)[1] if subset.face_crop_aug_range else None
        infos.append(ImageInfo(image_key=str(path), path=path, caption=caption if caption is not None else "",
                               num_repeats=subset.num_repeats, is_reg=subset.is_reg,
                               image_size=(int(size[0]), int(size[1])), subset=subset, face=face))
    missing = [i for i in infos if raw_captions[i.image_key] is None]
    if missing:
        if subset.class_tokens:
            for info in missing:
                info.caption = subset.class_tokens
        else:
            logger.warning("%d image(s) in %s have no %s caption file and the subset has no class_tokens: "
                           "their caption is empty (first: %s)", len(missing), folder,
                           _caption_extension(subset.caption_extension), missing[0].path.name)
    if subset.cache_info and scanned:
        _write_info_cache(folder, infos, raw_captions)
    if subset.mask_dir is not None:
        _attach_masks(infos, subset)
    if subset.conditioning_image_dir is not None:
        _attach_conditioning(infos, subset)
    return infos


# ------------------------------------------------------------------------------- fine-tuning


def _read_metadata(path: Path) -> dict[str, dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"metadata file {path} is not UTF-8: re-save it with UTF-8 encoding") from e
    except OSError as e:
        raise DatasetError(f"cannot read metadata file {path}: {e.strerror or e}") from e
    try:
        if path.suffix.lower() == ".jsonl":
            entries: dict[str, dict] = {}
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    item = json.loads(line)
                    if "image_path" not in item:
                        raise DatasetError(f"metadata file {path} line {n}: missing \"image_path\"")
                    entries[str(item["image_path"])] = item
            return entries
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"metadata file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"metadata file {path} must hold a JSON object {{image key: {{caption, tags}}}}")
    return data


def _resolve_image(key: str, image_dir: Path | None, metadata_file: Path) -> Path:
    direct = Path(key)
    if direct.is_absolute() and direct.is_file():
        return direct
    if image_dir is not None:
        candidate = image_dir / key
        if candidate.is_file():
            return candidate
        for ext in IMAGE_EXTENSIONS:
            for variant in (ext, ext.upper()):
                candidate = image_dir / (key + variant)
                if candidate.is_file():
                    return candidate
    if direct.is_file():
        return direct
    where = f"in image_dir {image_dir}" if image_dir is not None else "(no image_dir set for relative keys)"
    raise DatasetError(f"{metadata_file}: image for key '{key}' not found {where}: "
                       "fix the key, set image_dir, or remove the entry")


def _fine_tuning_caption(meta: dict, subset: FineTuningSubsetParams) -> str | None:
    caption, tags = meta.get("caption"), meta.get("tags")
    caption = caption.strip() if isinstance(caption, str) and caption.strip() else None
    tags = tags.strip() if isinstance(tags, str) and tags.strip() else None
    if caption is None:
        return tags
    if tags is None:
        return caption
    lines = caption.split("\n") if subset.enable_wildcard else [caption]
    return "\n".join(line + subset.caption_separator + tags for line in lines)


def load_fine_tuning_subset(subset: FineTuningSubsetParams, *, split: ValidationSplit | None = None) -> list[ImageInfo]:
    """ImageInfos of a fine-tuning subset from its metadata file.

    With a ``split``, the metadata keys (sorted) are divided as DreamBooth image paths are, and
    only the chosen part is read.
    """
    meta_path = subset.metadata_file
    if meta_path is None or not meta_path.is_file():
        raise DatasetError(f"{subset.where}: metadata_file {meta_path} does not exist")
    entries = _read_metadata(meta_path)
    if split is not None:
        entries = {key: entries[key] for key in sorted(split.select(sorted(entries)))}
    infos: list[ImageInfo] = []
    no_caption = 0
    for key, meta in tqdm(entries.items(), desc=f"reading {meta_path.name}", disable=len(entries) < _PROGRESS_MIN,
                          leave=False):
        path = _resolve_image(key, subset.image_dir, meta_path)
        caption = _fine_tuning_caption(meta, subset)
        if caption is None:
            no_caption += 1
            caption = ""
        size = meta.get("image_size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            size = read_image_size(path)
        face = parse_face_suffix(path.stem)[1] if subset.face_crop_aug_range else None
        infos.append(ImageInfo(image_key=key, path=path, caption=caption, num_repeats=subset.num_repeats,
                               is_reg=False, image_size=(int(size[0]), int(size[1])), subset=subset, face=face))
    if no_caption:
        logger.warning("%s: %d entries have neither caption nor tags; their caption is empty", meta_path, no_caption)
    return infos


def balance_reg_images(train: list[ImageInfo], reg: list[ImageInfo]) -> list[ImageInfo]:
    """The regularization images used, with repeats raised so they match the training images.

    Reg images are taken in order (each counting its subset's repeats) until their total reaches
    the total of training images x repeats; if all are taken and it is still short, the repeats of
    the taken images are raised by one in turn. Reg images past that point are not used.
    """
    target = sum(info.num_repeats for info in train)
    used: list[ImageInfo] = []
    total = 0
    for info in reg:
        if total >= target:
            break
        used.append(info)
        total += info.num_repeats
    turn = 0
    while used and total < target:
        used[turn % len(used)].num_repeats += 1
        total += 1
        turn += 1
    if len(used) < len(reg):
        logger.warning("%d of %d regularization images are not used: there are fewer training images x repeats (%d)",
                       len(reg) - len(used), len(reg), target)
    return used
