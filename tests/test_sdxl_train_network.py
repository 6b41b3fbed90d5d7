"""sdxl_train_network.py end to end, as a user runs it: subprocesses on a tiny SDXL model."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from library.demo.shapes import write_shapes_folder
from tests.train_helpers import base_train_args, run_script, read_metadata, tensorboard_events

SCRIPT = "sdxl_train_network.py"


def sdxl_args(model: Path, out: Path, data: Path, **overrides) -> list[str]:
    values = dict(train_data_dir=data, caption_extension=".txt", bucket_reso_steps=32, cache_latents=True)
    values.update(overrides)
    return base_train_args(model, out, **values)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("sdxl_data")
    images = write_shapes_folder(root / "train" / "5_sks", 4, seed=3, trigger="sks")
    return root / "train", images


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sdxl_ckpt, dataset):
    """A run training both text encoders (two learning rates) and the U-Net, with previews and logs."""
    root = tmp_path_factory.mktemp("sdxl_run")
    prompts = root / "prompts.txt"
    prompts.write_text("sks, a red circle --w 64 --h 64 --s 2 --d 7\n")
    out = root / "out"
    run_script(SCRIPT, sdxl_args(tiny_sdxl_ckpt, out, dataset[0], max_train_steps=None, max_train_epochs=4,
                                 save_every_n_epochs=2, learning_rate=3e-3, network_dim=8, network_alpha=4,
                                 text_encoder_lr=["1e-3", "2e-3"], logging_dir=root / "logs",
                                 sample_prompts=prompts, sample_every_n_epochs=4))
    return root, out


def test_lora_file_has_sgm_and_two_text_encoder_names(trained, tiny_sdxl_ckpt):
    from library.families.sdxl.loading import load_sdxl_models
    import networks.lora as lora

    _, out = trained
    saved = load_file(str(out / "lora.safetensors"))
    models = load_sdxl_models(tiny_sdxl_ckpt)
    expected = lora.create_network(1.0, 8, 4, models.vae, models.text_encoders, models.unet).state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    prefixes = {k.split(".")[0].split("_")[1] for k in saved}
    assert prefixes == {"unet", "te1", "te2"}
    unet_names = {k.split(".")[0] for k in saved if k.startswith("lora_unet_")}
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for n in unet_names), sorted(unet_names)[:3]
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" not in unet_names  # tiny: 2 levels
    # layers_per_block 1: input_blocks.1 = level 0, .2 = its downsampler, .3 = level 1 with attention
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k" in unet_names
    assert max(v.abs().max().item() for k, v in saved.items() if "lora_up" in k and "te2" in k) > 0


def test_metadata_and_file_names(trained):
    _, out = trained
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["lora-000002.safetensors", "lora.safetensors"]
    assert len(list((out / "sample").glob("lora_e000004_00_*_7.png"))) == 1
    metadata = read_metadata(out / "lora.safetensors")
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert metadata["modelspec.resolution"] == "64x64"


def test_each_text_encoder_gets_its_learning_rate(trained):
    root, _ = trained
    acc = tensorboard_events(root / "logs")
    assert all(e.value == pytest.approx(1e-3) for e in acc.Scalars("lr/textencoder1"))
    assert all(e.value == pytest.approx(2e-3) for e in acc.Scalars("lr/textencoder2"))
    assert all(e.value == pytest.approx(3e-3) for e in acc.Scalars("lr/unet"))


@torch.no_grad()
def _denoising_loss(model: Path, lora_file: Path | None, images: list[Path]) -> float:
    """Mean epsilon-prediction error on the images at fixed timesteps and noise (with the LoRA if given)."""
    from PIL import Image

    from library.families.sdxl.family import SDXLFamily
    import networks.lora as lora

    family = SDXLFamily()
    args = argparse.Namespace(pretrained_model_name_or_path=str(model), vae=None, tokenizer_cache_dir=None,
                              xformers=False, v_parameterization=False, max_token_length=None,
                              weighted_captions=False, disable_mmap_load_safetensors=False)
    from library.training.noise import NoiseConfig

    args.__dict__.update({f: getattr(NoiseConfig(), f, None) for f in ()})
    models = family.load_models(argparse.Namespace(**vars(args), **_noise_defaults()), "cpu", torch.float32)
    if lora_file is not None:
        network, _ = lora.create_network_from_weights(1.0, str(lora_file), models.vae, models.text_encoders,
                                                      models.denoiser, for_inference=True)
        network.apply_to(models.text_encoders, models.denoiser)
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32))
                          .permute(2, 0, 1) / 127.5 - 1 for p in images])
    captions = [p.with_suffix(".txt").read_text() for p in images]
    latents = models.vae.encode(pixels).latent_dist.mean
    tokenize = family.make_tokenize_fn(models, args)
    n = len(images)
    batch = {"captions": captions, "input_ids": tokenize(captions),
             "original_sizes_hw": torch.tensor([[64, 64]] * n), "crop_top_lefts": torch.zeros(n, 2, dtype=torch.long),
             "target_sizes_hw": torch.tensor([[64, 64]] * n)}
    cond = family.encode_text(models, batch, args)
    losses = []
    for t in (200, 500, 800):
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(t))
        p = family.predict(models, latents, cond, batch, args, timesteps=torch.full((n,), t), noise=noise)
        losses.append(torch.nn.functional.mse_loss(p.pred, p.target).item())
    return sum(losses) / len(losses)


def _noise_defaults() -> dict:
    from library.args import add_noise_and_loss_arguments

    parser = argparse.ArgumentParser()
    add_noise_and_loss_arguments(parser)
    return vars(parser.parse_args([]))


def test_training_lowers_the_denoising_loss(trained, tiny_sdxl_ckpt, dataset):
    _, out = trained
    before = _denoising_loss(tiny_sdxl_ckpt, None, dataset[1])
    after = _denoising_loss(tiny_sdxl_ckpt, out / "lora.safetensors", dataset[1])
    assert after < 0.9 * before, (before, after)


# --- text-encoder output caching ------------------------------------------------------------------

def test_cached_text_encoder_outputs_on_disk_are_written_and_reused(tmp_path, tiny_sdxl_ckpt, dataset):
    data, images = dataset
    cached = dict(network_train_unet_only=True, cache_text_encoder_outputs_to_disk=True,
                  cache_latents_to_disk=True, max_train_steps=4)
    run_script(SCRIPT, sdxl_args(tiny_sdxl_ckpt, tmp_path / "a", data, **cached))
    te_files = sorted(data.rglob("*_te_outputs.npz"))
    assert [f.name for f in te_files] == [p.stem + "_te_outputs.npz" for p in images]
    with np.load(te_files[0]) as npz:
        assert {"hidden_state1", "hidden_state2", "pool2"} <= set(npz.files)
        assert npz["hidden_state1"].shape == (77, 32) and npz["pool2"].shape == (32,)
        assert npz["hidden_state1"].dtype == np.float32
    assert len(list(data.rglob("*_0064x0064_sdxl.npz"))) == len(images)
    stamps = {f: f.stat().st_mtime_ns for f in data.rglob("*.npz")}

    run_script(SCRIPT, sdxl_args(tiny_sdxl_ckpt, tmp_path / "b", data, **cached))
    assert {f: f.stat().st_mtime_ns for f in data.rglob("*.npz")} == stamps  # reused, not rewritten
    first, second = load_file(str(tmp_path / "a" / "lora.safetensors")), load_file(str(tmp_path / "b" / "lora.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)

    # In memory, the same outputs: the same LoRA as from the disk cache, and close to encoding every step.
    run_script(SCRIPT, sdxl_args(tiny_sdxl_ckpt, tmp_path / "c", data, network_train_unet_only=True,
                                 cache_text_encoder_outputs=True, max_train_steps=4))
    run_script(SCRIPT, sdxl_args(tiny_sdxl_ckpt, tmp_path / "d", data, network_train_unet_only=True,
                                 max_train_steps=4))
    memory, uncached = (load_file(str(tmp_path / n / "lora.safetensors")) for n in ("c", "d"))
    for key in first:
        torch.testing.assert_close(memory[key], first[key], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(uncached[key], first[key], rtol=1e-3, atol=1e-5)
    assert not any(k.startswith("lora_te") for k in first)


def parse_sdxl(argv: list[str]) -> argparse.Namespace:
    from library.args import setup_sdxl_network_parser
    from library.config_file import parse_args_with_config

    return parse_args_with_config(setup_sdxl_network_parser(), argv)


@pytest.mark.parametrize("extra, message", [
    ({}, "--network_train_unet_only"),
    ({"network_train_unet_only": True, "shuffle_caption": True}, "shuffle_caption"),
    ({"network_train_unet_only": True, "caption_dropout_rate": 0.1}, "caption_dropout_rate"),
    ({"network_train_unet_only": True, "token_warmup_step": 5}, "token_warmup_step"),
])
def test_incompatible_caching_options_are_refused_before_loading(tmp_path, tiny_sdxl_ckpt, dataset, extra, message):
    from library.args import ArgumentError
    from library.training.validation import validate_training_args

    args = parse_sdxl(sdxl_args(tiny_sdxl_ckpt, tmp_path / "out", dataset[0], cache_text_encoder_outputs=True,
                                **extra))
    with pytest.raises(ArgumentError, match=message):
        validate_training_args(args)


def test_v2_flag_is_refused(tmp_path, tiny_sdxl_ckpt, dataset):
    from library.args import ArgumentError
    from library.families.sdxl.family import SDXLFamily

    args = parse_sdxl(sdxl_args(tiny_sdxl_ckpt, tmp_path / "out", dataset[0], v2=True))
    with pytest.raises(ArgumentError, match="--v2"):
        SDXLFamily().validate_args(args)


def test_toml_subset_with_shuffle_is_refused(tmp_path, tiny_sdxl_ckpt, dataset):
    config = tmp_path / "dataset.toml"
    config.write_text(f"""
[general]
resolution = 64
bucket_reso_steps = 32
[[datasets]]
[[datasets.subsets]]
image_dir = "{(dataset[0] / '5_sks').as_posix()}"
caption_extension = ".txt"
shuffle_caption = true
""")
    args = base_train_args(tiny_sdxl_ckpt, tmp_path / "out", dataset_config=config, network_train_unet_only=True,
                           cache_text_encoder_outputs=True)
    proc = run_script(SCRIPT, args, expect_ok=False)
    assert proc.returncode != 0 and "shuffle_caption" in proc.stderr + proc.stdout


# --- other inputs -----------------------------------------------------------------------------

def test_diffusers_folder_trains(tmp_path, tiny_sdxl_diffusers, dataset):
    run_script(SCRIPT, sdxl_args(tiny_sdxl_diffusers, tmp_path / "out", dataset[0], max_train_steps=2))
    saved = load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert any(k.startswith("lora_unet_middle_block_1_") for k in saved)
