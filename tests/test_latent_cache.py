"""Latent caching: file names and keys, reuse, invalidation, memory cache, refusals and NaN errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from library.data.errors import DatasetError
from library.data.latent_cache import cache_path
from tests.data_helpers import FakeVAE, make_group, write_image


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "train" / "1_x"
    write_image(folder / "img.png", (160, 96), seed=1)
    write_image(folder / "sq.png", (64, 64), seed=2)
    return folder


def test_cache_file_name():
    from pathlib import Path

    assert cache_path(Path("/d/img.png"), (160, 96)).name == "img_0160x0096_sd.npz"
    assert cache_path(Path("/d/a.b.jpg"), (1024, 12345), "_sdxl").name == "a.b_1024x12345_sdxl.npz"


def test_disk_cache_written_reused_and_used_in_batches(tmp_path, folder):
    vae = FakeVAE()
    group = make_group(tmp_path, flip_aug=True)
    assert group.cache_latents(vae, vae_batch_size=4, to_disk=True) == 2
    npz_path = folder / "img_0160x0096_sd.npz"
    with np.load(npz_path) as npz:
        assert set(npz.files) == {"latents", "latents_flipped", "original_size", "crop_ltrb"}
        assert npz["latents"].shape == (4, 8, 8) and npz["latents"].dtype == np.float32
        assert npz["original_size"].tolist() == [160, 96]
        # 160x96 in a 64x64 bucket: fitted 64x38.4 -> top (64 - 38.4) // 2 = 12, bottom round(50.4)
        assert npz["crop_ltrb"].tolist() == [0, 12, 64, 50]
        assert not np.allclose(npz["latents"], npz["latents_flipped"])
    assert (folder / "sq_0064x0064_sd.npz").is_file()
    assert vae.calls == 2  # one batch of two images, plus its flipped copy

    again = make_group(tmp_path, flip_aug=True)
    vae2 = FakeVAE()
    assert again.cache_latents(vae2, to_disk=True) == 0 and vae2.calls == 0
    batch = again[0]
    assert batch["images"] is None and batch["latents"].shape == (1, 4, 8, 8)
    key = batch["image_keys"][0]
    with np.load(folder / ("img_0160x0096_sd.npz" if key.endswith("img.png") else "sq_0064x0064_sd.npz")) as npz:
        expected = npz["latents_flipped" if batch["flippeds"][0] else "latents"]
    assert torch.equal(batch["latents"][0], torch.from_numpy(expected))


def test_shape_mismatch_reencodes_unless_skip_cache_check(tmp_path, folder):
    make_group(tmp_path).cache_latents(FakeVAE(), to_disk=True)
    bigger = make_group(tmp_path, resolution=128)  # latents must now be 16x16
    assert bigger.cache_latents(FakeVAE(), to_disk=True, skip_cache_check=True) == 0  # trusted as is
    vae = FakeVAE()
    assert make_group(tmp_path, resolution=128).cache_latents(vae, to_disk=True) == 2 and vae.images == 2
    with np.load(folder / "img_0160x0096_sd.npz") as npz:
        assert npz["latents"].shape == (4, 16, 16)
    # a flip_aug run needs latents_flipped: the files without it are re-encoded
    vae = FakeVAE()
    make_group(tmp_path, resolution=128, flip_aug=True).cache_latents(vae, to_disk=True)
    assert vae.images == 4


def test_image_edited_after_caching_is_reencoded(tmp_path, folder):
    import os

    make_group(tmp_path).cache_latents(FakeVAE(), to_disk=True)
    npz_path = folder / "img_0160x0096_sd.npz"
    before = np.load(npz_path)["latents"].copy()
    earlier = npz_path.stat().st_mtime - 10  # so the edit below is clearly later, whatever the clock resolution
    os.utime(npz_path, (earlier, earlier))
    write_image(folder / "img.png", (160, 96), seed=9)  # same size, new pixels
    vae = FakeVAE()
    assert make_group(tmp_path).cache_latents(vae, to_disk=True) == 1 and vae.images == 1  # only the edited one
    assert not np.array_equal(np.load(npz_path)["latents"], before)
    assert make_group(tmp_path).cache_latents(FakeVAE(), to_disk=True) == 0  # the new file is current


def test_legacy_npz_reused(tmp_path, folder):
    np.savez(folder / "img.npz", latents=np.zeros((4, 8, 8), np.float32))
    vae = FakeVAE()
    group = make_group(tmp_path)
    assert group.cache_latents(vae, to_disk=True) == 1  # only sq.png is encoded
    assert not (folder / "img_0160x0096_sd.npz").exists()
    info = next(i for i in group.images() if i.path.name == "img.png")
    assert info.latents_npz == folder / "img.npz"


def test_memory_cache(tmp_path, folder):
    vae = FakeVAE()
    group = make_group(tmp_path, train_batch_size=2, alpha_mask=True)
    assert group.cache_latents(vae, vae_batch_size=1) == 2 and vae.calls == 2
    assert not list(folder.glob("*.npz"))
    batch = group[0]
    assert batch["images"] is None and batch["latents"].shape == (2, 4, 8, 8)
    assert batch["alpha_masks"].shape == (2, 64, 64) and batch["alpha_masks"].eq(1).all()
    for key, lat in zip(batch["image_keys"], batch["latents"]):
        info = next(i for i in group.images() if i.image_key == key)
        assert torch.equal(lat, info.latents)


def test_refused_for_random_augmentation(tmp_path, folder):
    for flag in ("color_aug", "random_crop"):
        group = make_group(tmp_path, **{flag: True})
        assert not group.is_latent_cacheable()
        with pytest.raises(DatasetError, match=f"{flag} is on"):
            group.cache_latents(FakeVAE(), to_disk=True)
    assert make_group(tmp_path).is_latent_cacheable()


def test_nan_latents_name_the_image(tmp_path, folder):
    with pytest.raises(DatasetError, match=r"NaN latents for .*img\.png"):
        make_group(tmp_path).cache_latents(FakeVAE(nan=True), vae_batch_size=2, to_disk=True)
    assert not list(folder.glob("*.npz"))
