"""flux_train_network.py end to end, as a user runs it: subprocesses on a tiny FLUX.1 setup."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from library.demo.shapes import write_shapes_folder
from tests.train_helpers import base_train_args, run_script, read_metadata, tensorboard_events

SCRIPT = "flux_train_network.py"


def flux_args(files, out: Path, data: Path, **overrides) -> list[str]:
    values = dict(train_data_dir=data, caption_extension=".txt", bucket_reso_steps=32, cache_latents=True,
                  network_module="networks.lora_flux", t5xxl_max_token_length=32, learning_rate=3e-3,
                  pretrained_model_name_or_path=None)
    values.update(overrides)
    return files.train_args() + base_train_args(files.dit, out, **values)


def parsed_args(files, *extra: str):
    from library.args import setup_flux_network_parser

    return setup_flux_network_parser().parse_args(files.train_args() + ["--t5xxl_max_token_length", "32", *extra])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("flux_data")
    images = write_shapes_folder(root / "train" / "5_sks", 4, seed=3, trigger="sks")
    return root / "train", images


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_flux, dataset):
    """CLIP-L + DiT trained with two text-encoder learning rates, previews and TensorBoard logs."""
    root = tmp_path_factory.mktemp("flux_run")
    prompts = root / "prompts.txt"
    prompts.write_text("sks, a red circle --w 64 --h 64 --s 3 --d 7 --g 3.0\n")
    out = root / "out"
    run_script(SCRIPT, flux_args(tiny_flux, out, dataset[0], max_train_steps=None, max_train_epochs=3,
                                 save_every_n_epochs=3, network_dim=8, network_alpha=4,
                                 text_encoder_lr=["1e-3", "2e-3"], logging_dir=root / "logs",
                                 sample_prompts=prompts, sample_every_n_epochs=3, guidance_scale=1.0,
                                 model_prediction_type="raw", timestep_sampling="shift"))
    return root, out


def _models(files, *extra: str):
    from library.families.flux.family import FluxFamily

    family = FluxFamily()
    args = parsed_args(files, *extra)
    family.validate_args(args)
    return family, family.load_models(args, torch.device("cpu"), torch.float32), args


def test_lora_file_has_the_flux_names_and_metadata(trained, tiny_flux):
    import networks.lora_flux as lora_flux

    _, out = trained
    saved = load_file(str(out / "lora.safetensors"))
    _, models, _ = _models(tiny_flux)
    expected = lora_flux.create_network(1.0, 8, 4, None, models.text_encoders, models.denoiser).state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    names = {k.split(".")[0] for k in saved}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names and "lora_unet_single_blocks_1_linear1" in names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert not any(n.startswith("lora_te3_") for n in names)  # T5 only with train_t5xxl=True

    md = read_metadata(out / "lora.safetensors")
    assert md["ss_base_model_version"] == "flux1"
    assert md["modelspec.architecture"] == "flux-1-dev/lora"
    assert md["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert "modelspec.prediction_type" not in md
    assert md["ss_network_module"] == "networks.lora_flux"
    assert (md["ss_guidance_scale"], md["ss_timestep_sampling"], md["ss_model_prediction_type"]) == ("1.0", "shift", "raw")
    for key in ("ss_model_type", "ss_apply_t5_attn_mask", "ss_weighting_scheme", "ss_logit_mean", "ss_logit_std",
                "ss_mode_scale", "ss_sigmoid_scale", "ss_discrete_flow_shift", "sshs_model_hash"):
        assert key in md, key
    samples = list((out / "sample").glob("lora_e000003_00_*_7.png"))
    assert len(samples) == 1 and Image.open(samples[0]).size == (64, 64)


def test_each_text_encoder_and_the_dit_get_their_learning_rate(trained):
    root, _ = trained
    acc = tensorboard_events(root / "logs")
    tags = acc.Tags()["scalars"]
    # --text_encoder_lr CLIP-L T5: train_t5xxl is off, so T5 has no modules and no group
    assert {t for t in tags if t.startswith("lr/")} == {"lr/textencoder1", "lr/unet"}
    assert all(e.value == pytest.approx(1e-3) for e in acc.Scalars("lr/textencoder1"))
    assert all(e.value == pytest.approx(3e-3) for e in acc.Scalars("lr/unet"))
    assert len(acc.Scalars("loss/current")) == 30


def test_training_lowers_the_denoising_loss_and_changes_generation(trained, tiny_flux, dataset):
    import networks.lora_flux as lora_flux
    from library.demo.evaluate import family_denoising_loss, load_images
    from library.families.flux.generation import FluxSampler
    from library.sampling.prompts import SamplePrompt

    _, out = trained
    family, models, args = _models(tiny_flux, "--model_prediction_type", "raw")
    images = load_images(dataset[1])
    captions = [p.with_suffix(".txt").read_text() for p in dataset[1]]
    latents = family.encode_images(models, images)

    def loss() -> float:
        batch = {"input_ids": family.make_tokenize_fn(models, args)(captions)}
        return family_denoising_loss(family, models, args, latents, family.encode_text(models, batch, args))

    sampler = FluxSampler(models.denoiser, models.vae, *models.text_encoders, *models.tokenizers, t5_max_length=32)
    prompt = SamplePrompt("sks, a red circle", width=64, height=64, steps=4, scale=1.0, guidance_scale=3.5)

    def image() -> np.ndarray:
        return np.asarray(sampler.generate(prompt, generator=torch.Generator().manual_seed(1), device="cpu",
                                           dtype=torch.float32, progress=False), dtype=np.int16)

    before, image_before = loss(), image()
    network, _ = lora_flux.create_network_from_weights(1.0, out / "lora.safetensors", None, models.text_encoders,
                                                       models.denoiser, for_inference=True)
    network.apply_to(models.text_encoders, models.denoiser, True, True)
    after, image_after = loss(), image()
    assert after < 0.9 * before, (before, after)
    assert np.abs(image_after - image_before).mean() > 1.0
    network.set_multiplier(0.0)
    assert np.array_equal(image(), image_before)


def test_resume_continues_bit_identically(tmp_path, tiny_flux, dataset):
    common = dict(max_train_steps=6, network_dim=4, network_alpha=2, network_train_unet_only=True,
                  save_every_n_steps=3, save_state=True, network_dropout=0.1)
    full = tmp_path / "full"
    run_script(SCRIPT, flux_args(tiny_flux, full, dataset[0], **common))
    resumed = tmp_path / "resumed"
    run_script(SCRIPT, flux_args(tiny_flux, resumed, dataset[0], resume=full / "lora-step00000003-state", **common))
    a, b = load_file(str(full / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_text_encoder_outputs_and_latents_cached_on_disk_in_kohya_layout(tmp_path, tiny_flux):
    data = tmp_path / "data"
    images = write_shapes_folder(data / "3_sks", 2, seed=5, trigger="sks")
    common = dict(max_train_steps=3, network_train_unet_only=True, cache_text_encoder_outputs_to_disk=True,
                  cache_latents_to_disk=True, apply_t5_attn_mask=True)
    first = tmp_path / "first"
    run_script(SCRIPT, flux_args(tiny_flux, first, data, **common))
    te_file = images[0].with_name(images[0].stem + "_flux_te.npz")
    latent_file = images[0].with_name(images[0].stem + "_0064x0064_flux.npz")
    with np.load(te_file) as npz:
        assert set(npz.files) == {"l_pooled", "t5_out", "txt_ids", "t5_attn_mask", "apply_t5_attn_mask",
                                  "caption_sha256"}
        assert npz["t5_out"].shape == (32, 32) and npz["txt_ids"].shape == (32, 3)
        assert npz["t5_attn_mask"].dtype == np.bool_ and bool(npz["apply_t5_attn_mask"]) is True
    with np.load(latent_file) as npz:
        assert {"latents_8x8", "original_size_8x8", "crop_ltrb_8x8"} <= set(npz.files)
        assert npz["latents_8x8"].shape == (16, 8, 8)
    stamps = {p: p.stat().st_mtime_ns for p in (te_file, latent_file)}

    second = tmp_path / "second"
    run_script(SCRIPT, flux_args(tiny_flux, second, data, **common))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # reused, not rewritten
    a, b = load_file(str(first / "lora.safetensors")), load_file(str(second / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Another --apply_t5_attn_mask makes the text-encoder files stale: they are encoded again.
    run_script(SCRIPT, flux_args(tiny_flux, tmp_path / "third", data, **{**common, "apply_t5_attn_mask": False}))
    with np.load(te_file) as npz:
        assert bool(npz["apply_t5_attn_mask"]) is False
    assert latent_file.stat().st_mtime_ns == stamps[latent_file]


def _loss_curve(logs: Path) -> list[float]:
    acc = tensorboard_events(logs)
    return [e.value for e in acc.Scalars("loss/current")]


@pytest.mark.slow
def test_block_swap_and_fp8_follow_the_plain_loss_curve(tmp_path, tiny_flux, dataset):
    """Block swap is exact (the same arithmetic, other memory); fp8 weights stay close to bf16."""
    common = dict(max_train_steps=8, network_train_unet_only=True, cache_text_encoder_outputs=True,
                  mixed_precision="bf16", gradient_checkpointing=True)
    curves = {}
    for name, extra in {"plain": {}, "swap": {"blocks_to_swap": 2}, "fp8": {"fp8_base": True}}.items():
        run_script(SCRIPT, flux_args(tiny_flux, tmp_path / name, dataset[0], logging_dir=tmp_path / f"logs_{name}",
                                     **common, **extra))
        curves[name] = np.array(_loss_curve(tmp_path / f"logs_{name}"))
    assert len(curves["plain"]) == 8
    np.testing.assert_allclose(curves["swap"], curves["plain"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(curves["fp8"], curves["plain"], rtol=0.1, atol=0.02)
    assert not np.allclose(curves["fp8"], curves["plain"], rtol=1e-6, atol=0)  # fp8 really was on


def test_schnell_model_trains_without_guidance(tmp_path, tiny_flux_schnell, dataset):
    out = tmp_path / "out"
    run_script(SCRIPT, flux_args(tiny_flux_schnell, out, dataset[0], max_train_steps=2, network_train_unet_only=True))
    md = read_metadata(out / "lora.safetensors")
    assert md["modelspec.architecture"] == "flux-1-schnell/lora"
    assert not any(k.startswith("lora_te1_") for k in load_file(str(out / "lora.safetensors")))


@pytest.mark.parametrize("extra, message", [
    (["--network_module", "networks.lora"], "networks.lora_flux"),
    (["--min_snr_gamma", "5"], "--min_snr_gamma does not apply to FLUX"),
    (["--model_type", "chroma"], "not Chroma"),  # a FLUX.1 file given as Chroma
    (["--blocks_to_swap", "2", "--cpu_offload_checkpointing", "--gradient_checkpointing"], "exclude each other"),
    (["--cache_text_encoder_outputs", "--network_train_unet_only", "--network_args", "train_t5xxl=True"],
     "cannot be cached"),
    (["--timestep_sampling", "flux_shift", "--sigmoid_scale", "-1"], "--sigmoid_scale"),
])
def test_bad_flag_combinations_are_refused_before_loading(tmp_path, tiny_flux, dataset, extra, message):
    import flux_train_network

    argv = flux_args(tiny_flux, tmp_path / "out", dataset[0]) + extra
    with pytest.raises(SystemExit) as info:
        flux_train_network.main(argv)
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_missing_text_encoder_file_is_named(tmp_path, tiny_flux, dataset):
    import flux_train_network

    argv = flux_args(tiny_flux, tmp_path / "out", dataset[0])
    argv[argv.index("--t5xxl") + 1] = str(tmp_path / "nope.safetensors")
    with pytest.raises(SystemExit, match="--t5xxl .*nope.safetensors: no such file"):
        flux_train_network.main(argv)


def test_minimal_inference_applies_and_merges_loras(tmp_path, trained, tiny_flux):
    import flux_minimal_inference
    from library.generation.flux import run

    _, out = trained
    lora = out / "lora.safetensors"

    def generate(folder: str, *extra: str) -> np.ndarray:
        args = flux_minimal_inference.setup_parser().parse_args([
            "--ckpt_path", str(tiny_flux.dit), "--clip_l", str(tiny_flux.clip_l), "--t5xxl", str(tiny_flux.t5xxl),
            "--ae", str(tiny_flux.ae), "--tokenizer_cache_dir", str(tiny_flux.tokenizer_cache_dir),
            "--prompt", "sks, a red circle", "--width", "64", "--height", "64", "--steps", "3", "--seed", "3",
            "--dtype", "float32", "--t5xxl_max_token_length", "32", "--output_dir", str(tmp_path / folder), *extra])
        (path,) = run(args)
        image = Image.open(path)
        assert image.text["prompt"] == "sks, a red circle" and image.text["seed"] == "3"
        return np.asarray(image, dtype=np.int16)

    base = generate("base")
    applied = generate("applied", "--lora_weights", f"{lora};1.0")
    merged = generate("merged", "--lora_weights", f"{lora};1.0", "--merge_lora_weights")
    off = generate("off", "--lora_weights", f"{lora};0")
    assert np.abs(applied - base).mean() > 1.0
    assert np.abs(merged - applied).max() <= 3
    assert np.array_equal(off, base)


def test_train_t5xxl_trains_t5_modules_too(tmp_path, tiny_flux, dataset):
    out = tmp_path / "out"
    run_script(SCRIPT, flux_args(tiny_flux, out, dataset[0], max_train_steps=2, network_args=["train_t5xxl=True"],
                                 text_encoder_lr=["1e-3", "2e-3"]))
    saved = load_file(str(out / "lora.safetensors"))
    t5_ups = [v for k, v in saved.items() if k.startswith("lora_te3_") and k.endswith("lora_up.weight")]
    assert len(t5_ups) == 2 * 7  # 2 layers x (q, k, v, o, wi_0, wi_1, wo)
    assert all(v.abs().sum() > 0 for v in t5_ups)  # trained away from the zero init
    assert any(k.startswith("lora_te1_") for k in saved)
