"""ControlNet datasets: conditioning images matched by stem, augmented exactly as their images, in the batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.controlnet.args import setup_controlnet_parser
from library.data.errors import DatasetError
from library.dataset_config import build_dataset_group
from tests.data_helpers import FakeVAE, write_image


def cn_args(*argv: str, **flags):
    """The train_control_net.py parser on ``argv`` + ``flag=value`` pairs (True -> bare flag)."""
    items = list(argv)
    for key, value in flags.items():
        if value is False or value is None:
            continue
        items += [f"--{key}"] + ([] if value is True else [str(value)])
    return setup_controlnet_parser().parse_args(items)


def write_pairs(root: Path, sizes: list[tuple[int, int]], *, same: bool = True, scale: int = 1) -> tuple[Path, Path]:
    """``images/img<i>.png`` with captions and ``cond/img<i>.png``: the image itself (``same``), or another
    random image; ``scale`` makes the conditioning images that many times larger (same aspect ratio)."""
    images, cond = root / "images", root / "cond"
    for i, (w, h) in enumerate(sizes):
        path = write_image(images / f"img{i}.png", (w, h), seed=i)
        path.with_suffix(".caption").write_text(f"caption {i}", encoding="utf-8")
        if same:
            picture = Image.open(path)
            if scale != 1:
                picture = picture.resize((w * scale, h * scale), Image.Resampling.NEAREST)
            cond.mkdir(parents=True, exist_ok=True)
            picture.save(cond / f"img{i}.png")
        else:
            write_image(cond / f"img{i}.png", (w * scale, h * scale), seed=100 + i)
    return images, cond


def batches(group, epochs=(1, 2, 3)):
    for epoch in epochs:
        group.set_current_epoch(epoch)
        for i in range(len(group)):
            yield group[i]


def build(images: Path, cond: Path, **flags):
    flags.setdefault("resolution", 64)
    flags.setdefault("seed", 3)
    return build_dataset_group(cn_args(train_data_dir=images, conditioning_data_dir=cond, **flags),
                               conditioning_images=True)[0]


@pytest.mark.parametrize("flags", [
    dict(flip_aug=True),
    dict(flip_aug=True, random_crop=True, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
         bucket_reso_steps=32),
    dict(flip_aug=True, random_crop=True, resolution="48,48"),
])
def test_conditioning_images_get_the_crop_and_flip_of_their_image(tmp_path, flags):
    # The conditioning image IS the image, so any difference in resize, crop window or flip shows.
    images, cond = write_pairs(tmp_path, [(96, 64), (64, 96), (80, 80), (130, 70)])
    group = build(images, cond, train_batch_size=2, **flags)
    flips = set()
    for batch in batches(group):
        c = batch["conditioning_images"]
        assert c.dtype == torch.float32 and c.shape == batch["images"].shape
        assert 0.0 <= c.min() and c.max() <= 1.0
        assert torch.allclose(c * 2 - 1, batch["images"], atol=1e-6)
        flips |= set(batch["flippeds"])
    assert flips == {True, False}  # both branches were seen


def test_face_crops_cut_the_same_window(tmp_path):
    images, cond = tmp_path / "images", tmp_path / "cond"
    path = write_image(images / "face_60_40_30_30.png", (160, 120), seed=2)
    cond.mkdir()
    Image.open(path).save(cond / "face_60_40_30_30.png")
    group = build(images, cond, face_crop_aug_range="1.5,3.0", random_crop=True, resolution=48)
    windows = set()
    for batch in batches(group, epochs=range(1, 6)):
        assert torch.allclose(batch["conditioning_images"] * 2 - 1, batch["images"], atol=1e-6)
        windows.add(batch["images"].sum().item())
    assert len(windows) > 1  # the window moved between epochs, and the conditioning image moved with it


def test_larger_conditioning_images_of_the_same_shape_are_resized_to_their_image(tmp_path):
    images, cond = write_pairs(tmp_path, [(96, 64), (64, 64)], scale=2)
    group = build(images, cond, flip_aug=True, train_batch_size=1)
    for batch in batches(group):
        # nearest-upscaled then area-downscaled back: the same pixels up to rounding
        assert (batch["conditioning_images"] * 2 - 1 - batch["images"]).abs().max() < 2 / 255 + 1e-6


def test_colour_augmentation_changes_the_image_only(tmp_path):
    images, cond = write_pairs(tmp_path, [(64, 64)] * 3)
    group = build(images, cond, color_aug=True)
    changed = 0
    for batch in batches(group, epochs=range(1, 5)):
        original = torch.from_numpy(np.asarray(Image.open(images / Path(batch["image_keys"][0]).name),
                                               dtype=np.float32) / 255).permute(2, 0, 1)
        assert torch.allclose(batch["conditioning_images"][0], original, atol=1e-6)
        changed += not torch.allclose(batch["images"][0], original * 2 - 1, atol=1e-6)
    assert changed > 0


def test_cached_latents_keep_conditioning_images_and_their_flips(tmp_path):
    images, cond = write_pairs(tmp_path, [(96, 64), (64, 64), (64, 96)], same=False)
    plain = build(images, cond, flip_aug=True, train_batch_size=1)
    cached = build(images, cond, flip_aug=True, train_batch_size=1)
    cached.cache_latents(FakeVAE())
    seen = set()
    for a, b in zip(batches(plain), batches(cached)):
        assert b["images"] is None and b["latents"] is not None
        assert a["flippeds"] == b["flippeds"]
        assert torch.equal(a["conditioning_images"], b["conditioning_images"])
        seen |= set(b["flippeds"])
    assert seen == {True, False}


def test_latents_cached_on_first_use_keep_conditioning_images_and_their_flips(tmp_path):
    from library.data.first_use import LatentsOnFirstUse

    images, cond = write_pairs(tmp_path, [(96, 64), (64, 64), (64, 96)], same=False)
    plain = build(images, cond, flip_aug=True, train_batch_size=1)
    eager = build(images, cond, flip_aug=True, train_batch_size=1)
    eager.cache_latents(FakeVAE())
    lazy = build(images, cond, flip_aug=True, train_batch_size=1)
    cache = LatentsOnFirstUse(lazy, FakeVAE(), seed=3)
    for a, b, c in zip(batches(plain), batches(eager), batches(lazy)):
        c = cache.fill(c)
        assert a["flippeds"] == c["flippeds"]
        assert torch.equal(a["conditioning_images"], c["conditioning_images"])
        assert torch.equal(b["latents"], c["latents"])  # FakeVAE draws nothing: the same latents as a pass
    assert cache.complete


def test_latent_caching_is_refused_with_random_crop_as_for_other_datasets(tmp_path):
    images, cond = write_pairs(tmp_path, [(96, 64)])
    group = build(images, cond, random_crop=True)
    with pytest.raises(DatasetError, match="random_crop"):
        group.cache_latents(FakeVAE())


def test_one_error_names_every_image_without_a_conditioning_image(tmp_path):
    images, cond = write_pairs(tmp_path, [(64, 64)] * 6)
    for i in (1, 3, 4):
        (cond / f"img{i}.png").unlink()
    write_image(cond / "stray.png", (64, 64))
    with pytest.raises(DatasetError) as e:
        build(images, cond)
    message = str(e.value)
    assert "\n" not in message
    for name in ("img1.png", "img3.png", "img4.png", "stray.png"):
        assert name in message
    assert "img0.png" not in message and "3 image(s)" in message


def test_every_dataset_config_subset_needs_a_conditioning_folder(tmp_path):
    images, cond = write_pairs(tmp_path, [(64, 64)] * 2)
    config = tmp_path / "dataset.toml"
    config.write_text(f"""
[general]
resolution = 64
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{images}'
  conditioning_data_dir = '{cond}'
  [[datasets.subsets]]
  image_dir = '{images}'
  [[datasets.subsets]]
  metadata_file = 'meta.json'
""")
    with pytest.raises(DatasetError) as e:
        build_dataset_group(cn_args(dataset_config=config), conditioning_images=True)
    message = str(e.value)
    assert "subsets[1] has no conditioning_data_dir" in message
    assert "subsets[2] has no image_dir and no conditioning_data_dir" in message and "metadata_file" in message


def test_dataset_config_subsets_train_with_their_own_folders(tmp_path):
    first, first_cond = write_pairs(tmp_path / "a", [(64, 64)] * 2)
    second, second_cond = write_pairs(tmp_path / "b", [(64, 64)] * 3, same=False)
    config = tmp_path / "dataset.toml"
    config.write_text(f"""
[general]
resolution = 64
caption_extension = '.caption'
[[datasets]]
batch_size = 1
  [[datasets.subsets]]
  image_dir = '{first}'
  conditioning_data_dir = '{first_cond}'
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = '{second}'
  conditioning_data_dir = '{second_cond}'
""")
    group, _ = build_dataset_group(cn_args(dataset_config=config, seed=1), conditioning_images=True)
    assert group.num_train_images == 2 * 2 + 3
    for batch in batches(group, epochs=(1,)):
        key = Path(batch["image_keys"][0])
        expected = (first_cond if key.parent == first else second_cond) / key.name
        pixels = torch.from_numpy(np.asarray(Image.open(expected), dtype=np.float32) / 255).permute(2, 0, 1)
        assert torch.allclose(batch["conditioning_images"][0], pixels, atol=1e-6)
        assert batch["captions"] == [key.with_suffix(".caption").read_text()]


def test_cli_train_data_dir_is_the_image_folder_itself(tmp_path):
    images, cond = write_pairs(tmp_path / "data", [(64, 64)] * 2)
    with pytest.raises(DatasetError, match="image folder itself"):
        build(tmp_path, cond)  # a parent of folders, as DreamBooth would have it
    with pytest.raises(DatasetError, match="--conditioning_data_dir"):
        build_dataset_group(cn_args(train_data_dir=images, resolution=64), conditioning_images=True)
    assert len(build(images, cond, dataset_repeats=3, train_batch_size=1)) == 6


def test_other_trainers_still_read_conditioning_data_dir_as_masks(tmp_path):
    from tests.data_helpers import parse

    images, masks = write_pairs(tmp_path / "train", [(64, 64)])
    images.rename(tmp_path / "train" / "1_thing")
    with pytest.raises(DatasetError, match="masked_loss"):
        build_dataset_group(parse(train_data_dir=tmp_path / "train", conditioning_data_dir=masks, resolution=64))
    group, _ = build_dataset_group(parse(train_data_dir=tmp_path / "train", conditioning_data_dir=masks,
                                         resolution=64, masked_loss=True))
    batch = group[0]
    assert batch["alpha_masks"] is not None and batch["conditioning_images"] is None
