"""Loss masks from mask images (``conditioning_data_dir``) and the fine-tuning validation split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.errors import DatasetError
from library.data.subsets import ValidationSplit
from library.dataset_config import build_dataset_group
from library.training.loss import LossConfig, training_loss
from tests.data_helpers import FakeVAE, parse, write_folder, write_image


def write_mask(path: Path, size: tuple[int, int], *, left_white: bool = True, gray: bool = False) -> Path:
    """A mask image of ``size`` (w, h): white on the left half, black on the right (or the opposite).

    Colour masks get green/blue noise so that only the red channel can give the expected result.
    """
    w, h = size
    red = np.zeros((h, w), dtype=np.uint8)
    if left_white:
        red[:, : w // 2] = 255
    else:
        red[:, w // 2 :] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    if gray:
        Image.fromarray(red, mode="L").save(path)
    else:
        noise = np.random.default_rng(1).integers(0, 256, (h, w, 2), dtype=np.uint8)
        Image.fromarray(np.concatenate([red[..., None], noise], axis=2)).save(path)
    return path


def write_rgba(path: Path, size: tuple[int, int]) -> Path:
    """An RGBA image whose own alpha is the OPPOSITE of ``write_mask`` (opaque on the right)."""
    w, h = size
    rgba = np.random.default_rng(5).integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[:, w // 2 :, 3] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, mode="RGBA").save(path)
    return path


def masked_group(tmp_path: Path, **flags):
    flags.setdefault("resolution", 64)
    flags.setdefault("seed", 7)
    return build_dataset_group(parse(train_data_dir=tmp_path / "train", conditioning_data_dir=tmp_path / "masks",
                                     masked_loss=True, **flags))


def left_right(mask: torch.Tensor) -> tuple[float, float]:
    """Mean of the outer quarter columns on each side of an [H, W] mask."""
    w = mask.shape[-1]
    return float(mask[:, : w // 4].mean()), float(mask[:, -(w // 4):].mean())


# --------------------------------------------------------------------------- masks in batches
def test_mask_image_follows_resize_crop_and_flip_and_beats_the_alpha_channel(tmp_path):
    # 128x96 image -> 64x64 bucket (resize to 85x64, centre crop); the mask is half the size
    # (resized to the image first), and the image's own alpha says the opposite of the mask.
    write_rgba(tmp_path / "train" / "1_x" / "a.png", (128, 96))
    write_mask(tmp_path / "masks" / "a.bmp", (64, 48))
    train, _ = masked_group(tmp_path, flip_aug=True, alpha_mask=True)
    seen = set()
    for epoch in range(1, 9):
        train.set_current_epoch(epoch)
        batch = train[0]
        masks = batch["alpha_masks"]
        assert masks.shape == (1, 64, 64) and masks.dtype == torch.float32
        assert 0 <= float(masks.min()) and float(masks.max()) <= 1
        left, right = left_right(masks[0])
        flipped = batch["flippeds"][0]
        seen.add(flipped)
        if flipped:
            assert left < 0.01 and right > 0.99
        else:
            assert left > 0.99 and right < 0.01
    assert seen == {True, False}


def test_mask_equals_the_image_through_random_crop_buckets_and_flips(tmp_path):
    # The mask is the image's own red channel: after any resize / random crop / flip the batch
    # mask must still be the red channel of the batch image, pixel for pixel.
    image = write_image(tmp_path / "train" / "1_x" / "b.png", (150, 90), seed=4)
    red = np.array(Image.open(image).convert("RGB"))[..., 0]
    (tmp_path / "masks").mkdir()
    Image.fromarray(red, mode="L").save(tmp_path / "masks" / "b.png")
    train, _ = masked_group(tmp_path, flip_aug=True, random_crop=True, enable_bucket=True, min_bucket_reso=32,
                            max_bucket_reso=128, bucket_reso_steps=32)
    crops = set()
    for epoch in range(1, 7):
        train.set_current_epoch(epoch)
        batch = train[0]
        expected = (batch["images"][0, 0] + 1) / 2
        assert torch.allclose(batch["alpha_masks"][0], expected, atol=1e-5)
        crops.add((tuple(batch["crop_top_lefts"][0].tolist()), batch["flippeds"][0]))
    assert len(crops) > 1  # the crop or the flip really changed between epochs


def test_masks_survive_latent_caching_and_flip(tmp_path):
    folder = tmp_path / "train" / "1_x"
    write_folder(folder, [(64, 64)] * 2)
    for i in range(2):
        write_mask(tmp_path / "masks" / f"img{i}.png", (64, 64), gray=True)
    train, _ = masked_group(tmp_path, flip_aug=True)
    train.cache_latents(FakeVAE(), to_disk=True)
    with np.load(next(folder.glob("img0_*.npz"))) as npz:
        assert "alpha_mask" in npz.files and npz["alpha_mask"].shape == (64, 64)
    seen = set()
    for epoch in range(1, 7):
        train.set_current_epoch(epoch)
        batch = train[0]
        assert batch["images"] is None and batch["latents"] is not None
        for mask, flipped in zip(batch["alpha_masks"], batch["flippeds"]):
            left, right = left_right(mask)
            assert (left, right) == ((0.0, 1.0) if flipped else (1.0, 0.0))
            seen.add(flipped)
    assert seen == {True, False}


def test_cli_mask_folder_serves_every_training_subfolder_but_not_reg(tmp_path):
    write_folder(tmp_path / "train" / "2_a", [(64, 64)], prefix="a")
    write_folder(tmp_path / "train" / "1_b", [(64, 64)], prefix="b")
    write_folder(tmp_path / "reg" / "1_r", [(64, 64)] * 3, prefix="r")
    write_mask(tmp_path / "masks" / "a0.png", (64, 64))
    write_mask(tmp_path / "masks" / "b0.bmp", (64, 64))
    train, _ = masked_group(tmp_path, reg_data_dir=tmp_path / "reg", train_batch_size=6)
    infos = {i.path.name: i for i in train.images()}
    assert infos["a0.png"].mask_path.name == "a0.png" and infos["b0.png"].mask_path.name == "b0.bmp"
    assert all(infos[f"r{i}.png"].mask_path is None for i in range(3))
    batch = train[0]
    for key, mask in zip(batch["image_keys"], batch["alpha_masks"]):
        if Path(key).name.startswith("r"):
            assert mask.eq(1).all()  # reg images train everywhere
        else:
            assert left_right(mask) == (1.0, 0.0)


def test_config_subset_mask_folder(tmp_path):
    write_folder(tmp_path / "img", [(64, 64)])
    write_folder(tmp_path / "plain", [(64, 64)], prefix="p")
    write_mask(tmp_path / "m" / "img0.png", (64, 64), left_white=False)
    cfg = {"datasets": [{"resolution": 64, "batch_size": 2, "subsets": [
        {"image_dir": str(tmp_path / "img"), "conditioning_data_dir": str(tmp_path / "m")},
        {"image_dir": str(tmp_path / "plain")}]}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"subsets\[0\]: conditioning_data_dir .* needs --masked_loss"):
        build_dataset_group(parse(dataset_config=path, seed=1))
    train, _ = build_dataset_group(parse(dataset_config=path, seed=1, masked_loss=True))
    masks = dict(zip(train[0]["image_keys"], train[0]["alpha_masks"]))
    assert left_right(masks[str(tmp_path / "img" / "img0.png")]) == (0.0, 1.0)
    assert masks[str(tmp_path / "plain" / "p0.png")].eq(1).all()


# --------------------------------------------------------------------------- errors
def test_images_without_masks_are_listed_with_the_folder(tmp_path):
    write_folder(tmp_path / "train" / "1_x", [(64, 64)] * 8)
    write_mask(tmp_path / "masks" / "img0.png", (64, 64))
    with pytest.raises(DatasetError) as e:
        masked_group(tmp_path)
    msg = str(e.value)
    assert "7 image(s)" in msg and "'img1', 'img2', 'img3', 'img4', 'img5' and 2 more" in msg
    assert str(tmp_path / "masks") in msg and "same file stem" in msg


def test_masks_without_images_are_listed(tmp_path):
    write_folder(tmp_path / "train" / "1_x", [(64, 64)])
    write_mask(tmp_path / "masks" / "img0.png", (64, 64))
    write_mask(tmp_path / "masks" / "stray.png", (64, 64))
    with pytest.raises(DatasetError, match=r"masks: 1 mask\(s\) have no image .*'stray'"):
        masked_group(tmp_path)


def test_mask_shape_and_folder_errors(tmp_path):
    write_folder(tmp_path / "train" / "1_x", [(64, 64)])
    with pytest.raises(DatasetError, match=r"conditioning_data_dir .*masks does not exist"):
        masked_group(tmp_path)
    write_mask(tmp_path / "masks" / "img0.png", (64, 32))
    with pytest.raises(DatasetError, match=r"mask .*img0.png is 64x32 but its image .* is 64x64"):
        masked_group(tmp_path)
    write_mask(tmp_path / "masks" / "img0.png", (32, 32))  # same shape, smaller: resized
    write_mask(tmp_path / "masks" / "img0.jpg", (32, 32))
    with pytest.raises(DatasetError, match="two masks for 'img0'"):
        masked_group(tmp_path)


def test_masked_loss_needs_a_mask_source(tmp_path):
    write_folder(tmp_path / "train" / "1_x", [(64, 64)])
    with pytest.raises(DatasetError, match="--masked_loss: no subset has masks"):
        build_dataset_group(parse(train_data_dir=tmp_path / "train", resolution=64, masked_loss=True))
    with pytest.raises(DatasetError, match="only used with --masked_loss"):
        build_dataset_group(parse(train_data_dir=tmp_path / "train", resolution=64,
                                  conditioning_data_dir=tmp_path / "train"))
    train, _ = build_dataset_group(parse(train_data_dir=tmp_path / "train", resolution=64, masked_loss=True,
                                         alpha_mask=True))
    assert train[0]["alpha_masks"].eq(1).all()  # no alpha channel: all pixels train


def test_fine_tuning_subsets_take_no_mask_folder(tmp_path):
    write_folder(tmp_path / "imgs", [(64, 64)])
    (tmp_path / "meta.json").write_text(json.dumps({"img0.png": {"caption": "x"}}), encoding="utf-8")
    write_mask(tmp_path / "masks" / "img0.png", (64, 64))
    cfg = {"datasets": [{"resolution": 64, "subsets": [{"metadata_file": str(tmp_path / "meta.json"),
                                                        "conditioning_data_dir": str(tmp_path / "masks")}]}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"subsets\[0\]: conditioning_data_dir not valid in a fine-tuning subset"):
        build_dataset_group(parse(dataset_config=path, masked_loss=True))
    with pytest.raises(DatasetError, match="--conditioning_data_dir .* not with --in_json"):
        build_dataset_group(parse(train_data_dir=tmp_path / "imgs", in_json=tmp_path / "meta.json", resolution=64,
                                  masked_loss=True, conditioning_data_dir=tmp_path / "masks"))


# --------------------------------------------------------------------------- the loss ignores masked-out pixels
def test_training_loss_ignores_errors_where_the_mask_image_is_black(tmp_path):
    write_folder(tmp_path / "train" / "1_x", [(64, 64)] * 2)
    for i in range(2):
        write_mask(tmp_path / "masks" / f"img{i}.png", (32, 32))  # resized to the image
    train, _ = masked_group(tmp_path, train_batch_size=2)
    masks = train[0]["alpha_masks"]
    target = torch.randn(2, 4, 8, 8)
    kwargs = dict(loss_weights=torch.ones(2), masks=masks)
    timesteps = torch.tensor([10, 500])
    right = target.clone()
    right[..., 5:] += 3.0  # error only in the masked-out (black) right part
    left = target.clone()
    left[..., :3] += 3.0  # the same error in the trained (white) left part
    assert training_loss(right, target, timesteps, LossConfig(), **kwargs).item() == pytest.approx(0.0, abs=1e-6)
    assert training_loss(left, target, timesteps, LossConfig(), **kwargs).item() == pytest.approx(9.0 * 3 / 8)
    unmasked = training_loss(right, target, timesteps, LossConfig(), loss_weights=torch.ones(2))
    assert unmasked.item() == pytest.approx(9.0 * 3 / 8)


# --------------------------------------------------------------------------- validation split
def _ft_config(tmp_path: Path, seed: int, split: float = 0.25) -> Path:
    images = tmp_path / "imgs"
    if not images.is_dir():
        write_folder(images, [(64, 64)] * 8)
        meta = {f"img{i}.png": {"caption": f"picture {i}"} for i in range(8)}
        (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    cfg = {"datasets": [{"resolution": 64, "validation_split": split, "validation_seed": seed, "subsets": [
        {"metadata_file": str(tmp_path / "meta.json"), "image_dir": str(images), "num_repeats": 3}]}]}
    path = tmp_path / f"ft{seed}.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def _split_keys(path: Path, seed: int = 1) -> tuple[list[str], list[str]]:
    train, val = build_dataset_group(parse(dataset_config=path, seed=seed))
    return sorted(i.image_key for i in train.images()), sorted(i.image_key for i in val.images())


def test_fine_tuning_dataset_is_really_split(tmp_path, caplog):
    train_keys, val_keys = _split_keys(_ft_config(tmp_path, seed=5))
    assert len(train_keys) == 6 and len(val_keys) == 2 and not set(train_keys) & set(val_keys)
    assert sorted(train_keys + val_keys) == sorted(f"img{i}.png" for i in range(8))
    assert "not supported for fine-tuning" not in caplog.text
    train, val = build_dataset_group(parse(dataset_config=_ft_config(tmp_path, seed=5), seed=1))
    assert train.num_train_images == 18 and val.num_train_images == 2  # validation repeats 1
    assert {i.caption for i in val.images()} == {f"picture {k[3]}" for k in val_keys}
    # deterministic for a seed (whatever the training seed), different for another seed
    assert _split_keys(_ft_config(tmp_path, seed=5), seed=99) == (train_keys, val_keys)
    assert _split_keys(_ft_config(tmp_path, seed=6))[1] != val_keys


def test_fine_tuning_split_from_the_command_line_uses_the_seed(tmp_path):
    _ft_config(tmp_path, seed=0)

    def split(seed):
        train, val = build_dataset_group(parse(train_data_dir=tmp_path / "imgs", in_json=tmp_path / "meta.json",
                                               resolution=64, validation_split=0.25, seed=seed))
        return {i.image_key for i in train.images()}, {i.image_key for i in val.images()}

    train_keys, val_keys = split(3)
    assert len(train_keys) == 6 and len(val_keys) == 2 and not train_keys & val_keys
    expected = ValidationSplit(0.25, 3, "validation").select(sorted(f"img{i}.png" for i in range(8)))
    assert val_keys == set(expected)
    assert split(3) == (train_keys, val_keys) and split(4)[1] != val_keys


def test_dreambooth_split_is_unchanged(tmp_path):
    paths = write_folder(tmp_path / "img", [(64, 64)] * 8)
    cfg = {"datasets": [{"resolution": 64, "validation_split": 0.25, "validation_seed": 5,
                         "subsets": [{"image_dir": str(tmp_path / "img"), "num_repeats": 2}]}]}
    path = tmp_path / "db.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    train, val = build_dataset_group(parse(dataset_config=path, seed=1))
    expected_val = ValidationSplit(0.25, 5, "validation").select(sorted(paths, key=lambda p: p.name))
    assert {i.path for i in val.images()} == set(expected_val) and len(expected_val) == 2
    assert {i.path for i in train.images()} == set(paths) - set(expected_val)
    assert train.num_train_images == 12 and all(i.num_repeats == 1 for i in val.images())


# --------------------------------------------------------------------------- one real run
@pytest.mark.slow
def test_run_with_conditioning_masks(tmp_path, tiny_sd1_ckpt):
    from safetensors import safe_open

    from library.demo.shapes import write_shapes_folder
    from tests.train_helpers import base_train_args, run_script

    for path in write_shapes_folder(tmp_path / "train" / "1_shape", 2, seed=4):
        write_mask(tmp_path / "masks" / (path.stem + ".png"), (64, 64))
    out = tmp_path / "out"
    run_script("train_network.py", base_train_args(
        tiny_sd1_ckpt, out, train_data_dir=tmp_path / "train", caption_extension=".txt", max_train_steps=2,
        masked_loss=True, conditioning_data_dir=tmp_path / "masks", flip_aug=True, cache_latents=True))
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.keys() and all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
    assert list((tmp_path / "train" / "1_shape").glob("*.npz")) == []  # in-memory cache only
