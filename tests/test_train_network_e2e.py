"""train_network.py end to end, as a user runs it: a subprocess on a tiny SD model and dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import toml
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.io_utils import addnet_hashes
from tests.fixtures.tiny_data import write_shapes_folder
from tests.train_helpers import base_train_args, denoising_loss, load_images, run_script

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


@pytest.mark.slow
def test_dataset_toml_and_config_file_with_v2_diffusers(tmp_path, tiny_sd2_diffusers):
    write_shapes_folder(tmp_path / "imgs", 3, seed=2)
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(toml.dumps({
        "general": {"caption_extension": ".txt", "shuffle_caption": True, "keep_tokens": 1},
        "datasets": [{"resolution": 64, "batch_size": 1,
                      "subsets": [{"image_dir": str(tmp_path / "imgs"), "num_repeats": 2}]}],
    }))
    out = tmp_path / "out"
    config = tmp_path / "args.toml"
    config.write_text(toml.dumps({
        "model": {"pretrained_model_name_or_path": str(tiny_sd2_diffusers), "v2": True, "v_parameterization": True},
        "training": {"output_dir": str(out), "output_name": "v2lora", "max_train_steps": 3, "seed": 3,
                     "learning_rate": 1e-3, "max_data_loader_n_workers": 0, "network_module": "networks.lora",
                     "network_dim": 4, "dataset_config": str(dataset), "save_every_n_steps": 2},
    }))
    # command line beats the file: network_dim 2
    run_script("train_network.py", ["--config_file", config, "--network_dim", "2", "--console_log_simple"])
    saved = load_file(str(out / "v2lora.safetensors"))
    assert {tuple(v.shape)[0] for k, v in saved.items() if k.endswith("lora_down.weight")} == {2}
    proj_in = [v for k, v in saved.items() if k.endswith("proj_in.lora_down.weight")]
    assert proj_in and all(v.ndim == 4 for v in proj_in)  # SD2 proj_in LoRA is conv-shaped, as the reference
    metadata = read_metadata(out / "v2lora.safetensors")
    assert metadata["ss_base_model_version"] == "sd_v2_v"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert "ss_datasets" in metadata
    assert (out / "v2lora-step00000002.safetensors").is_file()


@pytest.mark.slow
def test_resume_continues_to_identical_weights(tmp_path, tiny_sd1_ckpt):
    write_shapes_folder(tmp_path / "train" / "2_toy", 3, seed=4)
    common = dict(train_data_dir=tmp_path / "train", caption_extension=".txt", max_train_steps=6,
                  save_every_n_steps=3, save_state=True, network_dropout=0.1, train_batch_size=1)
    full = tmp_path / "full"
    run_script("train_network.py", base_train_args(tiny_sd1_ckpt, full, **common))
    state = full / "lora-step00000003-state"
    assert json.loads((state / "train_state.json").read_text())["current_step"] == 3

    resumed = tmp_path / "resumed"
    run_script("train_network.py", base_train_args(tiny_sd1_ckpt, resumed, resume=state, **common))
    a = load_file(str(full / "lora.safetensors"))
    b = load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and the weights really moved between step 3 and 6, so the comparison means something
    mid = load_file(str(full / "lora-step00000003.safetensors"))
    assert any(not torch.equal(mid[k], a[k]) for k in a)


def test_output_config_writes_non_defaults_and_exits(tmp_path):
    config = tmp_path / "saved"
    run_script("train_network.py", ["--config_file", config, "--output_config", "--network_dim", "16",
                                    "--learning_rate", "0.0005", "--shuffle_caption"])
    written = toml.load(tmp_path / "saved.toml")
    assert written == {"network_dim": 16, "learning_rate": 0.0005, "shuffle_caption": True}


def test_unknown_config_key_fails_with_suggestion(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('network_dimm = 8\n')
    proc = run_script("train_network.py", ["--config_file", config], expect_ok=False)
    assert proc.returncode != 0
    assert "unknown argument 'network_dimm'" in proc.stderr and "network_dim" in proc.stderr


def test_conflicting_flags_fail_fast(tmp_path, tiny_sd1_ckpt):
    write_shapes_folder(tmp_path / "train" / "1_x", 1)
    args = base_train_args(tiny_sd1_ckpt, tmp_path / "out", train_data_dir=tmp_path / "train",
                           network_train_unet_only=True, network_train_text_encoder_only=True)
    proc = run_script("train_network.py", args, expect_ok=False)
    assert proc.returncode != 0
    assert "--network_train_unet_only and --network_train_text_encoder_only" in proc.stderr
    assert not (tmp_path / "out").exists()
