"""train_network.py end to end, as a user runs it: a subprocess on a tiny SD model and dataset."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from library.io_utils import addnet_hashes
from library.demo.shapes import write_shapes_folder
from library.demo.evaluate import denoising_loss, load_images
from tests.train_helpers import base_train_args, run_script, read_metadata, tensorboard_events
from tests.reference import load_reference

REFERENCE_METADATA = load_reference("lora_metadata_sd1_example.json")


@pytest.fixture(scope="module")
def trained_cli_run(tmp_path_factory, tiny_sd1_ckpt):
    """One kohya-style CLI-only run (DreamBooth folders), shared by the assertions below."""
    root = tmp_path_factory.mktemp("cli_run")
    images = write_shapes_folder(root / "train" / "5_sks", 4, seed=1, trigger="sks")
    out = root / "out"
    prompts = root / "prompts.txt"
    prompts.write_text("# previews\nsks, a red circle --w 64 --h 64 --s 3 --d 5\nsks --n blurry --w 64 --h 64 --s 2\n")
    args = base_train_args(tiny_sd1_ckpt, out, train_data_dir=root / "train", caption_extension=".txt",
                           max_train_steps=None, max_train_epochs=6, save_every_n_epochs=2,
                           learning_rate=3e-3, network_dim=8, network_alpha=4, logging_dir=root / "logs",
                           sample_prompts=prompts, sample_every_n_epochs=3, sample_sampler="euler")
    run_script("train_network.py", args)
    return root, out, images


@pytest.mark.slow
def test_cli_run_writes_kohya_file_names(trained_cli_run):
    _, out, _ = trained_cli_run
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    # 5 repeats x 4 images / batch 2 = 10 steps an epoch, 6 epochs; epoch saves at 2 and 4, final as lora.
    assert names == ["lora-000002.safetensors", "lora-000004.safetensors", "lora.safetensors"]
    samples = sorted(p.name for p in (out / "sample").iterdir())
    assert len(samples) == 4  # 2 prompts at epochs 3 and 6
    assert [n.split("_")[1:3] for n in samples] == [["e000003", "00"], ["e000003", "01"], ["e000006", "00"],
                                                     ["e000006", "01"]]
    assert samples[0].endswith("_5.png")  # the prompt's --d seed is in the name


@pytest.mark.slow
def test_tensorboard_has_every_step(trained_cli_run):
    root, _, _ = trained_cli_run
    events = list((root / "logs").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = tensorboard_events(root / "logs")
    current = acc.Scalars("loss/current")
    assert [e.step for e in current] == list(range(1, 61))
    assert all(e.value > 0 for e in current)
    assert len(acc.Scalars("loss/epoch_average")) == 6
    assert all(e.value == pytest.approx(3e-3) for e in acc.Scalars("lr/textencoder"))
    assert len(acc.Scalars("lr/unet")) == 60


@pytest.mark.slow
def test_continue_from_weights_takes_rank_from_file(trained_cli_run, tiny_sd1_ckpt):
    root, out, _ = trained_cli_run
    out2 = root / "continued"
    run_script("train_network.py", base_train_args(
        tiny_sd1_ckpt, out2, train_data_dir=root / "train", caption_extension=".txt", max_train_steps=1,
        network_weights=out / "lora.safetensors", dim_from_weights=True, network_dim=2, learning_rate=1e-9))
    start, end = load_file(str(out / "lora.safetensors")), load_file(str(out2 / "lora.safetensors"))
    assert {k: v.shape for k, v in start.items()} == {k: v.shape for k, v in end.items()}  # rank 8, not 2
    for key in start:  # one step at lr 1e-9: the trained weights were loaded, not re-initialised
        assert torch.allclose(start[key], end[key], atol=1e-6), key


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
