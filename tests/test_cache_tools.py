"""tools/cache_latents.py and tools/cache_text_encoder_outputs.py write the files training reads.

Each tool runs with a trainer's command line; then the trainer runs with the same flags and
``--cache_*_to_disk``. A cache file the trainer found invalid would be re-encoded and atomically
replaced (a new inode and mtime), so unchanged files prove it accepted them. The latent files are
also byte-identical to those a training run writes itself (same seed: the latents are a sample
of the VAE posterior).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import sdxl_train_network
import train_network
from tests.data_helpers import write_folder
from tools import cache_latents, cache_text_encoder_outputs


def dataset(root: Path) -> Path:
    folder = root / "img"
    write_folder(folder / "2_thing", [(64, 64), (80, 64), (64, 96)], ["a red cube", "a blue ball", "a green cone"])
    return folder


def common(model: Path, images: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(images), "--resolution", "64",
            "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
            "--seed", "42", "--console_log_simple", "--console_log_level", "WARNING"]


def train_args(out: Path) -> list[str]:
    return ["--output_dir", str(out), "--network_module", "networks.lora", "--network_dim", "2",
            "--max_train_steps", "1", "--max_data_loader_n_workers", "0", "--optimizer_type", "AdamW"]


def snapshot(files: list[Path]) -> dict[Path, tuple[int, int]]:
    return {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}


def test_cached_latents_are_the_trainers(tiny_sd1_ckpt, tmp_path):
    images = dataset(tmp_path / "tool")
    cache_latents.main(common(tiny_sd1_ckpt, images))
    files = sorted(images.rglob("*.npz"))
    assert [f.name for f in files] == ["img0_0064x0064_sd.npz", "img1_0080x0064_sd.npz", "img2_0064x0096_sd.npz"]
    before = snapshot(files)
    train_network.main(common(tiny_sd1_ckpt, images) + train_args(tmp_path / "out") + ["--cache_latents_to_disk"])
    assert snapshot(files) == before  # every file valid: nothing re-encoded
    assert (tmp_path / "out" / "last.safetensors").is_file()

    fresh = tmp_path / "trainer" / "img"
    shutil.copytree(images, fresh, ignore=shutil.ignore_patterns("*.npz"))
    train_network.main(common(tiny_sd1_ckpt, fresh) + train_args(tmp_path / "out2") + ["--cache_latents_to_disk"])
    for f in files:
        assert (fresh / f.relative_to(images)).read_bytes() == f.read_bytes(), f.name


def test_cached_text_encoder_outputs_are_the_trainers(tiny_sdxl_ckpt, tmp_path):
    images = dataset(tmp_path)
    cache_text_encoder_outputs.main(["--sdxl", *common(tiny_sdxl_ckpt, images), "--text_encoder_batch_size", "2"])
    files = sorted(images.rglob("*_te_outputs.npz"))
    assert [f.name for f in files] == ["img0_te_outputs.npz", "img1_te_outputs.npz", "img2_te_outputs.npz"]
    assert not list(images.rglob("*_sdxl.npz"))  # latents are the other tool's
    before = snapshot(files)
    sdxl_train_network.main(common(tiny_sdxl_ckpt, images) + train_args(tmp_path / "out")
                            + ["--cache_text_encoder_outputs_to_disk", "--network_train_unet_only"])
    assert snapshot(files) == before
    assert (tmp_path / "out" / "last.safetensors").is_file()


def test_sd_has_no_text_encoder_cache(tiny_sd1_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="no text encoder output cache: add --sdxl"):
        cache_text_encoder_outputs.main(common(tiny_sd1_ckpt, dataset(tmp_path)))
