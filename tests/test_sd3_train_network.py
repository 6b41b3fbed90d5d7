"""sd3_train_network.py end to end, as a user runs it: subprocesses on tiny SD3 / SD3.5 setups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from library.demo.shapes import write_shapes_folder
from tests.train_helpers import base_train_args, run_script, read_metadata, tensorboard_events

SCRIPT = "sd3_train_network.py"


def sd3_args(files, out: Path, data: Path, **overrides) -> list[str]:
    values = dict(train_data_dir=data, caption_extension=".txt", bucket_reso_steps=32, cache_latents=True,
                  network_module="networks.lora_sd3", t5xxl_max_token_length=32, learning_rate=3e-3,
                  pretrained_model_name_or_path=None)
    values.update(overrides)
    return files.train_args() + base_train_args(files.checkpoint, out, **values)


def _models(files, *extra: str):
    from library.args import setup_sd3_network_parser
    from library.families.sd3.family import SD3Family

    family = SD3Family()
    args = setup_sd3_network_parser().parse_args(files.train_args() + ["--t5xxl_max_token_length", "32", *extra])
    family.validate_args(args)
    return family, family.load_models(args, torch.device("cpu"), torch.float32), args


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("sd3_data")
    images = write_shapes_folder(root / "train" / "5_sks", 4, seed=3, trigger="sks")
    return root / "train", images


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd3, dataset):
    """SD3.5-Medium-style: both CLIPs and the MMDiT trained, three text-encoder lrs, previews, logs."""
    root = tmp_path_factory.mktemp("sd3_run")
    prompts = root / "prompts.txt"
    prompts.write_text("sks, a red circle --w 64 --h 64 --s 3 --d 7 --l 4\n")
    out = root / "out"
    run_script(SCRIPT, sd3_args(tiny_sd3, out, dataset[0], max_train_steps=None, max_train_epochs=3,
                                network_dim=8, network_alpha=4, text_encoder_lr=["1e-3", "2e-3", "3e-3"],
                                logging_dir=root / "logs", sample_prompts=prompts, sample_every_n_epochs=3,
                                weighting_scheme="logit_normal"))
    return root, out


def test_lora_file_has_the_sd3_names_and_metadata(trained, tiny_sd3):
    import networks.lora_sd3 as lora_sd3

    _, out = trained
    saved = load_file(str(out / "lora.safetensors"))
    _, models, _ = _models(tiny_sd3)
    sd3 = models.extra["sd3"]
    expected = lora_sd3.create_network(1.0, 8, 4, None, [sd3.clip_l, sd3.clip_g, sd3.t5], sd3.mmdit).state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    names = {k.split(".")[0] for k in saved}
    assert {"lora_unet_joint_blocks_0_x_block_attn2_qkv", "lora_unet_joint_blocks_0_context_block_attn_qkv",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te2_text_model_encoder_layers_1_mlp_fc2"} <= names
    assert not any(n.startswith("lora_te3_") for n in names)
    md = read_metadata(out / "lora.safetensors")
    assert md["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert md["modelspec.implementation"] == "diffusers"
    assert md["ss_base_model_version"] == "sd35_medium"
    assert md["ss_network_module"] == "networks.lora_sd3"
    assert (md["ss_weighting_scheme"], md["ss_apply_lg_attn_mask"], md["ss_training_shift"]) == (
        "logit_normal", "False", "1.0")
    samples = list((out / "sample").glob("lora_e000003_00_*_7.png"))
    assert len(samples) == 1 and Image.open(samples[0]).size == (64, 64)


def test_each_clip_gets_its_learning_rate(trained):
    root, _ = trained
    acc = tensorboard_events(root / "logs")
    tags = {t for t in acc.Tags()["scalars"] if t.startswith("lr/")}
    assert tags == {"lr/textencoder1", "lr/textencoder2", "lr/unet"}  # T5 has no modules: no group
    assert all(e.value == pytest.approx(1e-3) for e in acc.Scalars("lr/textencoder1"))
    assert all(e.value == pytest.approx(2e-3) for e in acc.Scalars("lr/textencoder2"))


def test_training_lowers_the_denoising_loss_and_changes_generation(trained, tiny_sd3, dataset):
    import networks.lora_sd3 as lora_sd3
    from library.demo.evaluate import family_denoising_loss, load_images
    from library.families.sd3.generation import SD3Sampler
    from library.sampling.prompts import SamplePrompt

    _, out = trained
    family, models, args = _models(tiny_sd3)
    sd3 = models.extra["sd3"]
    images = load_images(dataset[1])
    captions = [p.with_suffix(".txt").read_text() for p in dataset[1]]
    latents = family.encode_images(models, images)

    def loss() -> float:
        batch = {"input_ids": family.make_tokenize_fn(models, args)(captions)}
        return family_denoising_loss(family, models, args, latents, family.encode_text(models, batch, args))

    sampler = SD3Sampler(sd3.mmdit, sd3.vae, sd3.clip_l, sd3.clip_g, sd3.t5, tuple(models.tokenizers), t5_max_length=32)
    prompt = SamplePrompt("sks, a red circle", width=64, height=64, steps=4, scale=4.0)

    def image() -> np.ndarray:
        return np.asarray(sampler.generate(prompt, generator=torch.Generator().manual_seed(1), device="cpu",
                                           dtype=torch.float32, progress=False), dtype=np.int16)

    before, image_before = loss(), image()
    encoders = [sd3.clip_l, sd3.clip_g, sd3.t5]
    network, _ = lora_sd3.create_network_from_weights(1.0, out / "lora.safetensors", None, encoders, sd3.mmdit,
                                                      for_inference=True)
    network.apply_to(encoders, sd3.mmdit, True, True)
    after, image_after = loss(), image()
    assert after < 0.9 * before, (before, after)
    assert np.abs(image_after - image_before).mean() > 1.0
    network.set_multiplier(0.0)
    assert np.array_equal(image(), image_before)


def test_text_encoder_outputs_and_latents_cached_on_disk_in_kohya_layout(tmp_path, tiny_sd3):
    data = tmp_path / "data"
    images = write_shapes_folder(data / "3_sks", 2, seed=5, trigger="sks")
    common = dict(max_train_steps=3, network_train_unet_only=True, cache_text_encoder_outputs_to_disk=True,
                  cache_latents_to_disk=True, apply_lg_attn_mask=True)
    first = tmp_path / "first"
    run_script(SCRIPT, sd3_args(tiny_sd3, first, data, **common))
    te_file = images[0].with_name(images[0].stem + "_sd3_te.npz")
    latent_file = images[0].with_name(images[0].stem + "_0064x0064_sd3.npz")
    with np.load(te_file) as npz:
        assert set(npz.files) == {"lg_out", "lg_pooled", "t5_out", "clip_l_attn_mask", "clip_g_attn_mask",
                                  "t5_attn_mask", "apply_lg_attn_mask", "apply_t5_attn_mask", "caption_sha256"}
        assert npz["lg_out"].shape == (77, 28) and npz["t5_out"].shape == (32, 32) and npz["lg_pooled"].shape == (28,)
        assert bool(npz["apply_lg_attn_mask"]) is True and bool(npz["apply_t5_attn_mask"]) is False
    with np.load(latent_file) as npz:
        assert npz["latents_8x8"].shape == (16, 8, 8)
    stamps = {p: p.stat().st_mtime_ns for p in (te_file, latent_file)}
    second = tmp_path / "second"
    run_script(SCRIPT, sd3_args(tiny_sd3, second, data, **common))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    a, b = load_file(str(first / "lora.safetensors")), load_file(str(second / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Per-encoder dropout applies to cached outputs as well: the same run with it trains otherwise.
    third = tmp_path / "third"
    run_script(SCRIPT, sd3_args(tiny_sd3, third, data, **common, clip_g_dropout_rate=0.9))
    c = load_file(str(third / "lora.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_separate_text_encoder_files_and_block_swap(tmp_path, tiny_sd3_separate, dataset):
    """An SD3 Medium file without text encoders trains with --clip_l/--clip_g/--t5xxl; block swap is exact."""
    common = dict(max_train_steps=3, network_train_unet_only=True, gradient_checkpointing=True)
    plain, swapped = tmp_path / "plain", tmp_path / "swap"
    run_script(SCRIPT, sd3_args(tiny_sd3_separate, plain, dataset[0], **common))
    run_script(SCRIPT, sd3_args(tiny_sd3_separate, swapped, dataset[0], blocks_to_swap=2, **common))
    a, b = load_file(str(plain / "lora.safetensors")), load_file(str(swapped / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_metadata(plain / "lora.safetensors")["modelspec.architecture"] == "stable-diffusion-3-medium/lora"


@pytest.mark.parametrize("extra, message", [
    (["--network_module", "networks.lora_flux"], "networks.lora_sd3"),
    (["--debiased_estimation_loss"], "--debiased_estimation_loss does not apply to SD3"),
    (["--clip_l_dropout_rate", "1.5"], "--clip_l_dropout_rate 1.5 must be in [0, 1]"),
    (["--cache_text_encoder_outputs", "--network_train_unet_only", "--network_args", "train_t5xxl=True"],
     "cannot be cached"),
    (["--weighting_scheme", "logit_normal", "--logit_std", "0"], "--logit_std"),
])
def test_bad_flag_combinations_are_refused_before_loading(tmp_path, tiny_sd3, dataset, extra, message):
    import sd3_train_network

    with pytest.raises(SystemExit) as info:
        sd3_train_network.main(sd3_args(tiny_sd3, tmp_path / "out", dataset[0]) + extra)
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_missing_text_encoders_name_the_flag(tmp_path, tiny_sd3_separate, dataset):
    from library.demo.tiny_sd3_encoders import TinySD3Files

    files = TinySD3Files(checkpoint=tiny_sd3_separate.checkpoint,
                         tokenizer_cache_dir=tiny_sd3_separate.tokenizer_cache_dir, variant="sd3_medium")
    proc = run_script(SCRIPT, sd3_args(files, tmp_path / "out", dataset[0]), expect_ok=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]  # one line, no traceback
    assert last.startswith("error: ") and "holds no CLIP-L" in last and "--clip_l" in last
    assert "Traceback" not in proc.stderr


def test_minimal_inference_applies_and_merges_loras(tmp_path, trained, tiny_sd3):
    import sd3_minimal_inference
    from library.generation.sd3 import run

    _, out = trained
    lora = out / "lora.safetensors"

    def generate(folder: str, *extra: str) -> np.ndarray:
        args = sd3_minimal_inference.setup_parser().parse_args([
            "--ckpt_path", str(tiny_sd3.checkpoint), "--tokenizer_cache_dir", str(tiny_sd3.tokenizer_cache_dir),
            "--prompt", "sks, a red circle", "--width", "64", "--height", "64", "--steps", "3", "--seed", "3",
            "--cfg_scale", "4", "--t5xxl_token_length", "32", "--output_dir", str(tmp_path / folder), *extra])
        (path,) = run(args)
        image = Image.open(path)
        assert image.text["prompt"] == "sks, a red circle" and image.text["scale"] == "4.0"
        return np.asarray(image, dtype=np.int16)

    base = generate("base")
    applied = generate("applied", "--lora_weights", f"{lora};1.0")
    merged = generate("merged", "--lora_weights", f"{lora};1.0", "--merge_lora_weights")
    off = generate("off", "--lora_weights", f"{lora};0")
    assert np.abs(applied - base).mean() > 1.0
    assert np.abs(merged - applied).max() <= 3
    assert np.array_equal(off, base)
