"""train_network.py runs with a dataset TOML, an args TOML, resume, and flag errors (subprocesses)."""

from __future__ import annotations

import json

import pytest
import toml
import torch
from safetensors.torch import load_file

from library.demo.shapes import write_shapes_folder
from tests.train_helpers import base_train_args, run_script, read_metadata


@pytest.mark.slow
def test_dataset_toml_and_config_file_with_v2_diffusers(tmp_path, tiny_sd2_diffusers):
    write_shapes_folder(tmp_path / "imgs", 3, seed=2)
    write_shapes_folder(tmp_path / "reg", 2, seed=9, caption_extension=None)
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(toml.dumps({
        "general": {"caption_extension": ".txt", "shuffle_caption": True, "keep_tokens": 1},
        "datasets": [{"resolution": 64, "batch_size": 1,
                      "subsets": [{"image_dir": str(tmp_path / "imgs"), "num_repeats": 2},
                                  {"image_dir": str(tmp_path / "reg"), "is_reg": True, "class_tokens": "shape"}]}],
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
    run_script("train_network.py", ["--config_file", config, "--network_dim", "2", "--console_log_simple",
                                    "--prior_loss_weight", "0.5", "--gradient_checkpointing",
                                    "--mixed_precision", "bf16", "--fp8_base", "--save_state_on_train_end"])
    saved = load_file(str(out / "v2lora.safetensors"))
    assert {tuple(v.shape)[0] for k, v in saved.items() if k.endswith("lora_down.weight")} == {2}
    proj_in = [v for k, v in saved.items() if k.endswith("proj_in.lora_down.weight")]
    assert proj_in and all(v.ndim == 4 for v in proj_in)  # SD2 proj_in LoRA is conv-shaped, as the reference
    metadata = read_metadata(out / "v2lora.safetensors")
    assert metadata["ss_base_model_version"] == "sd_v2_v"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert "ss_datasets" in metadata
    assert metadata["ss_num_reg_images"] == "2" and metadata["ss_prior_loss_weight"] == "0.5"
    assert metadata["ss_mixed_precision"] == "bf16" and metadata["ss_fp8_base"] == "True"
    assert (out / "v2lora-step00000002.safetensors").is_file()
    assert not (out / "v2lora-step00000002-state").exists()  # states only at the end
    assert json.loads((out / "v2lora-state" / "train_state.json").read_text()) == {
        "current_epoch": 1, "current_step": 3, "optimizer": "torch.optim.adamw.AdamW"}


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

    # DataLoader worker processes (the default) see the same batches: same final weights
    workers = tmp_path / "workers"
    run_script("train_network.py", base_train_args(tiny_sd1_ckpt, workers, max_data_loader_n_workers=2,
                                                   persistent_data_loader_workers=True,
                                                   **{**common, "save_state": False}))
    c = load_file(str(workers / "lora.safetensors"))
    for key in a:
        assert torch.equal(a[key], c[key]), key


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


def test_debug_dataset_prints_batches_and_trains_nothing(tmp_path, tiny_sd1_ckpt):
    write_shapes_folder(tmp_path / "train" / "2_toy", 2, seed=5)
    out = tmp_path / "out"
    proc = run_script("train_network.py", base_train_args(tiny_sd1_ckpt, out, train_data_dir=tmp_path / "train",
                                                          caption_extension=".txt", debug_dataset=True))
    printed = proc.stdout + proc.stderr
    assert "a " in printed and "background" in printed  # the captions are shown
    assert not out.exists() or not any(out.iterdir())
