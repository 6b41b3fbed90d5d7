"""Latents cached on first use (--cache_latents_on_first_use): batches fill the cache as they need it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from library.data.errors import DatasetError
from library.data.first_use import LatentsOnFirstUse
from tests.data_helpers import FakeVAE, make_group, write_image
from tests.train_helpers import base_train_args, run_script


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "train" / "1_x"
    write_image(folder / "a.png", (64, 64), seed=1, alpha=True)
    write_image(folder / "b.png", (64, 64), seed=2, alpha=True)
    write_image(folder / "c.png", (64, 64), seed=3, alpha=True)
    return folder


class NoisyVAE(FakeVAE):
    """FakeVAE plus a draw from the global generator, like a VAE's posterior sample."""

    def __init__(self):
        super().__init__()
        self.draws = []

    def __call__(self, images):
        self.draws.append(torch.randn(images.shape[0], 4, images.shape[2] // 8, images.shape[3] // 8))
        return super().__call__(images) + self.draws[-1]


def filled(cache: LatentsOnFirstUse, group, index: int) -> dict:
    batch = group[index]
    assert batch["latents"] is None and batch["images"] is None and batch["latents_to_fill"] is not None
    return cache.fill(batch)


def test_batches_encode_only_what_they_need_and_write_the_cache_pass_files(tmp_path, folder):
    vae = FakeVAE()
    group = make_group(tmp_path, flip_aug=True, alpha_mask=True)
    cache = LatentsOnFirstUse(group, vae, seed=3, to_disk=True)
    assert cache.total == 3 and not cache.complete
    batch = filled(cache, group, 0)
    # one image, both orientations (flip_aug), and nothing for the batches not reached yet
    assert vae.images == 2 and len(list(folder.glob("*.npz"))) == 1
    assert batch["latents"].shape == (1, 4, 8, 8) and batch["latents_to_fill"] is None
    key = batch["image_keys"][0]
    npz_path = folder / f"{os.path.basename(key)[0]}_0064x0064_sd.npz"
    with np.load(npz_path) as npz:
        assert set(npz.files) == {"latents", "latents_flipped", "original_size", "crop_ltrb", "alpha_mask"}
        expected = npz["latents_flipped" if batch["flippeds"][0] else "latents"]
        mask = npz["alpha_mask"]
    assert torch.equal(batch["latents"][0], torch.from_numpy(expected))
    # the mask comes from the cache, in the sample's orientation (the worker could not know it)
    want_mask = torch.from_numpy(mask).flip(1) if batch["flippeds"][0] else torch.from_numpy(mask)
    assert torch.equal(batch["alpha_masks"][0], want_mask) and not torch.equal(want_mask, torch.ones_like(want_mask))

    for index in range(1, len(group)):
        filled(cache, group, index)
    assert cache.complete and vae.images == 6
    # the files are the ones a cache pass writes: the next cache pass encodes nothing
    again = FakeVAE()
    assert make_group(tmp_path, flip_aug=True, alpha_mask=True).cache_latents(again, to_disk=True) == 0
    assert again.calls == 0
    eager_dir = tmp_path / "eager"
    for name in ("a", "b", "c"):
        write_image(eager_dir / "train" / "1_x" / f"{name}.png", (64, 64), seed="abc".index(name) + 1, alpha=True)
    make_group(eager_dir, flip_aug=True, alpha_mask=True).cache_latents(FakeVAE(), to_disk=True)
    for path in folder.glob("*.npz"):
        with np.load(path) as lazy, np.load(eager_dir / "train" / "1_x" / path.name) as eager:
            assert lazy.files == eager.files
            for name in lazy.files:
                assert np.array_equal(lazy[name], eager[name]), (path.name, name)


def test_a_latent_does_not_depend_on_which_batch_first_needed_it(tmp_path, folder):
    def latents_in_order(order):
        group = make_group(tmp_path, train_batch_size=1)
        vae = NoisyVAE()
        cache = LatentsOnFirstUse(group, vae, seed=7)
        before = torch.get_rng_state()
        out = {}
        for index in order:
            batch = filled(cache, group, index)
            out[batch["image_keys"][0]] = batch["latents"][0]
        assert torch.equal(torch.get_rng_state(), before)  # the training's random stream is untouched
        assert not torch.equal(vae.draws[0], vae.draws[1])  # each image has a sample of its own
        return out

    forward, backward = latents_in_order([0, 1, 2]), latents_in_order([2, 1, 0])
    assert forward.keys() == backward.keys() and len(forward) == 3
    for key in forward:
        assert torch.equal(forward[key], backward[key])


def test_a_batch_mixing_cached_and_new_images_encodes_only_the_new_ones(tmp_path, folder):
    make_group(tmp_path).cache_latents(FakeVAE(), to_disk=True)
    os.remove(folder / "b_0064x0064_sd.npz")
    vae = FakeVAE()
    group = make_group(tmp_path, train_batch_size=3)
    cache = LatentsOnFirstUse(group, vae, seed=3, to_disk=True)
    assert cache.total == 1
    raw = group[0]
    rows = dict(zip(raw["image_keys"], raw["latents_to_fill"]["latents"]))
    assert sum(r is None for r in rows.values()) == 1 and rows[str(folder / "b.png")] is None
    batch = cache.fill(raw)
    assert vae.images == 1 and cache.complete and batch["latents"].shape == (3, 4, 8, 8)


def test_a_persistent_worker_keeps_asking_and_the_main_cache_answers(tmp_path, folder):
    from library.data.collate import collate_batch

    vae = FakeVAE()
    group = make_group(tmp_path)
    cache = LatentsOnFirstUse(group, vae, seed=3)
    # a persistent worker holds its own copy of the dataset from the start: it never sees the cache
    loader = torch.utils.data.DataLoader(group, batch_size=1, num_workers=1, persistent_workers=True,
                                         collate_fn=collate_batch)
    first = [cache.fill(batch)["latents"] for batch in loader]
    assert vae.images == 3 and cache.complete
    second = [cache.fill(batch)["latents"] for batch in loader]
    assert vae.images == 3  # nothing encoded twice
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    # a worker started after the cache is full (a new epoch without persistent workers) sends latents
    fresh = next(iter(torch.utils.data.DataLoader(group, batch_size=1, num_workers=1, collate_fn=collate_batch)))
    assert fresh["latents"] is not None and fresh["latents_to_fill"] is None


def test_flux_style_files_are_written_with_their_resolution_keys(tmp_path, folder):
    group = make_group(tmp_path, train_batch_size=3)
    cache = LatentsOnFirstUse(group, FakeVAE(), seed=3, to_disk=True, cache_suffix="_flux", suffixed_keys=True)
    batch = filled(cache, group, 0)
    assert batch["latents"].shape == (3, 4, 8, 8) and cache.complete
    with np.load(folder / "a_0064x0064_flux.npz") as npz:
        assert set(npz.files) == {"latents_8x8", "original_size_8x8", "crop_ltrb_8x8"}
    again = FakeVAE()
    assert make_group(tmp_path).cache_latents(again, to_disk=True, cache_suffix="_flux", suffixed_keys=True) == 0


def test_first_use_refuses_images_that_change_every_epoch(tmp_path, folder):
    group = make_group(tmp_path, random_crop=True)
    with pytest.raises(DatasetError, match="latents cannot be cached: .*random_crop"):
        LatentsOnFirstUse(group, FakeVAE(), seed=3)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from library.demo.shapes import write_shapes_folder

    root = tmp_path_factory.mktemp("first_use_data")
    write_shapes_folder(root / "train" / "1_toy", 4, seed=5)
    return root / "train" / "1_toy"


def first_use_args(model, out, data, **overrides):
    common = dict(train_data_dir=data.parent, caption_extension=".txt", train_batch_size=1,
                  cache_latents_on_first_use=True)
    return base_train_args(model, out, **{**common, **overrides})


def test_training_starts_before_every_image_is_cached(tmp_path, tiny_sd1_ckpt, data):
    for stale in data.glob("*.npz"):
        stale.unlink()
    out = tmp_path / "out"
    proc = run_script("train_network.py", first_use_args(tiny_sd1_ckpt, out, data, cache_latents_to_disk=True,
                                                         max_train_steps=2))
    log = proc.stdout + proc.stderr
    assert "latents are cached on first use (on disk): 4 image(s)" in log
    assert (out / "lora.safetensors").is_file()
    files = sorted(data.glob("*.npz"))
    assert len(files) == 2  # two steps of batch 1 needed two images; the others were never encoded
    stamps = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}
    # a plain --cache_latents_to_disk run takes the files as they are and encodes only the other two
    run_script("train_network.py", base_train_args(tiny_sd1_ckpt, tmp_path / "eager", train_data_dir=data.parent,
                                                   caption_extension=".txt", cache_latents_to_disk=True,
                                                   max_train_steps=1))
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files} == stamps
    assert len(list(data.glob("*.npz"))) == 4
    for stale in data.glob("*.npz"):
        stale.unlink()


@pytest.mark.slow
def test_resume_with_first_use_latents_and_persistent_workers_is_bit_identical(tmp_path, tiny_sd1_ckpt, data):
    for stale in data.glob("*.npz"):
        stale.unlink()
    workers = dict(max_data_loader_n_workers=1, persistent_data_loader_workers=True, max_train_steps=10)
    full = tmp_path / "full"
    proc = run_script("train_network.py", first_use_args(tiny_sd1_ckpt, full, data, save_every_n_steps=3,
                                                         save_state=True, **workers))
    assert "all latents are cached: 4 image(s) encoded on first use" in proc.stdout + proc.stderr
    assert not list(data.glob("*.npz"))  # the cache was in memory
    # step 3 is inside the first epoch (4 images): the resumed run, whose cache starts empty again,
    # first needs the fourth image, then the others, each drawing its own posterior sample
    resumed = tmp_path / "resumed"
    run_script("train_network.py", first_use_args(tiny_sd1_ckpt, resumed, data, resume=full / "lora-step00000003-state",
                                                  **workers))
    a, b = load_file(str(full / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
