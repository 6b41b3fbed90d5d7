"""train_network.py end to end, as a user runs it: a subprocess on a tiny SD model and dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from library.io_utils import addnet_hashes
from library.demo.shapes import write_shapes_folder
from library.demo.evaluate import denoising_loss, load_images
from tests.train_helpers import base_train_args, run_script

REFERENCE_METADATA = json.loads(
    (Path(__file__).resolve().parents[2] / "shared/reference/lora_metadata_sd1_example.json").read_text())


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def trained_cli_run(tmp_path_factory, tiny_sd1_ckpt):
    """One kohya-style CLI-only run (DreamBooth folders), shared by the assertions below."""
    root = tmp_path_factory.mktemp("cli_run")
    images = write_shapes_folder(root / "train" / "5_sks", 4, seed=1, trigger="sks")
    out = root / "out"
    args = base_train_args(tiny_sd1_ckpt, out, train_data_dir=root / "train", caption_extension=".txt",
                           max_train_steps=None, max_train_epochs=6, save_every_n_epochs=2,
                           learning_rate=3e-3, network_dim=8, network_alpha=4)
    run_script("train_network.py", args)
    return root, out, images


@pytest.mark.slow
def test_cli_run_writes_kohya_file_names(trained_cli_run):
    _, out, _ = trained_cli_run
    names = sorted(p.name for p in out.iterdir())
    # 5 repeats x 4 images / batch 2 = 10 steps an epoch, 6 epochs; epoch saves at 2 and 4, final as lora.
    assert names == ["lora-000002.safetensors", "lora-000004.safetensors", "lora.safetensors"]


@pytest.mark.slow
def test_saved_lora_keys_shapes_and_hashes(trained_cli_run, tiny_sd1_ckpt):
    from library.families.sd.loading import load_sd_models
    import networks.lora as lora

    _, out, _ = trained_cli_run
    saved = load_file(str(out / "lora.safetensors"))
    sd = load_sd_models(str(tiny_sd1_ckpt), v2=False)
    expected = lora.create_network(1.0, 8, 4, sd.vae, sd.text_encoder, sd.unet).state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in saved)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in saved)
    assert all(float(v) == 4.0 for k, v in saved.items() if k.endswith(".alpha"))
    # trained: some up weights moved away from their zero init
    assert max(v.abs().max().item() for k, v in saved.items() if "lora_up" in k) > 0

    metadata = read_metadata(out / "lora.safetensors")
    model_hash, legacy_hash = addnet_hashes(saved, metadata)
    assert metadata["sshs_model_hash"] == model_hash
    assert metadata["sshs_legacy_hash"] == legacy_hash


@pytest.mark.slow
def test_metadata_matches_reference_keys(trained_cli_run):
    _, out, _ = trained_cli_run
    metadata = read_metadata(out / "lora.safetensors")
    missing = set(REFERENCE_METADATA) - set(metadata)
    assert not missing, f"metadata keys of the reference LoRA missing from ours: {sorted(missing)}"
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "8" and metadata["ss_network_alpha"] == "4.0"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.resolution"] == "64x64"
    assert metadata["ss_num_train_images"] == "20"  # 4 images x 5 repeats
    assert json.loads(metadata["ss_dataset_dirs"]) == {"5_sks": {"n_repeats": 5, "img_count": 4}}
    assert metadata["ss_steps"] == "60" and metadata["ss_epoch"] == "6"
    assert json.loads(metadata["ss_tag_frequency"])["5_sks"]["sks"] == 4
    epoch2 = read_metadata(out / "lora-000002.safetensors")
    assert epoch2["ss_steps"] == "20" and epoch2["ss_epoch"] == "2"


@pytest.mark.slow
def test_training_lowers_denoising_loss(trained_cli_run, tiny_sd1_ckpt):
    root, out, images = trained_cli_run
    pixels = load_images(images)
    captions = [p.with_suffix(".txt").read_text() for p in images]
    before = denoising_loss(tiny_sd1_ckpt, None, pixels, captions)
    after = denoising_loss(tiny_sd1_ckpt, out / "lora.safetensors", pixels, captions)
    halfway = denoising_loss(tiny_sd1_ckpt, out / "lora-000002.safetensors", pixels, captions)
    assert after < halfway < before, (before, halfway, after)
    assert after < 0.9 * before
