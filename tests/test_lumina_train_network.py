"""lumina_train_network.py and lumina_minimal_inference.py end to end, as a user runs them:
subprocesses on a tiny Lumina-Image 2.0 setup (NextDiT, Gemma-2, FLUX AE, an offline tokenizer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from library.demo.shapes import write_shapes_folder
from tests.train_helpers import base_train_args, read_metadata, run_script, tensorboard_events

SCRIPT = "lumina_train_network.py"


@pytest.fixture(scope="module")
def tiny_lumina(tmp_path_factory):
    from library.demo.tiny_lumina import write_tiny_lumina_setup

    return write_tiny_lumina_setup(tmp_path_factory.mktemp("tiny_lumina"))


def lumina_args(files, out: Path, data: Path, **overrides) -> list[str]:
    values = dict(train_data_dir=data, caption_extension=".txt", cache_latents=True,
                  network_module="networks.lora_lumina", gemma2_max_token_length=32, learning_rate=3e-3,
                  pretrained_model_name_or_path=None)
    values.update(overrides)
    return files.train_args() + base_train_args(files.dit, out, **values)


def _models(files, *extra: str):
    from library.families.lumina.args import setup_lumina_network_parser
    from library.families.lumina.family import LuminaFamily

    family = LuminaFamily()
    args = setup_lumina_network_parser().parse_args(files.train_args() + ["--gemma2_max_token_length", "32", *extra])
    family.validate_args(args)
    return family, family.load_models(args, torch.device("cpu"), torch.float32), args


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("lumina_data")
    images = write_shapes_folder(root / "train" / "2_sks", 4, seed=3, trigger="sks")
    return root / "train", images


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_lumina, dataset):
    """Gemma-2 + DiT trained 3 epochs (12 steps) with their own learning rates, a preview and TensorBoard logs."""
    root = tmp_path_factory.mktemp("lumina_run")
    prompts = root / "prompts.txt"
    prompts.write_text("sks, a red circle --w 64 --h 64 --s 3 --d 7 --l 4.0 --ctr 0.5\n")
    out = root / "out"
    run_script(SCRIPT, lumina_args(tiny_lumina, out, dataset[0], max_train_steps=None, max_train_epochs=3,
                                   save_every_n_epochs=3, network_dim=8, network_alpha=4, text_encoder_lr=1e-3,
                                   logging_dir=root / "logs", sample_prompts=prompts, sample_every_n_epochs=3))
    return root, out


def test_lora_file_has_the_lumina_names_and_metadata(trained, tiny_lumina):
    import networks.lora_lumina as lora_lumina

    _, out = trained
    saved = load_file(str(out / "lora.safetensors"))
    _, models, _ = _models(tiny_lumina)
    expected = lora_lumina.create_network(1.0, 8, 4, None, models.text_encoders[0], models.denoiser).state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    names = {k.split(".")[0] for k in saved}
    assert {"lora_unet_layers_0_attention_qkv", "lora_unet_noise_refiner_1_adaLN_modulation_1",
            "lora_unet_context_refiner_0_feed_forward_w2", "lora_unet_final_layer_linear",
            "lora_te_layers_0_self_attn_q_proj", "lora_te_layers_1_mlp_down_proj"} <= names
    ups = [v for k, v in saved.items() if k.endswith("lora_up.weight")]
    assert all(v.abs().sum() > 0 for v in ups)  # every module trained away from its zero init

    md = read_metadata(out / "lora.safetensors")
    assert md["ss_base_model_version"] == "lumina2"
    assert md["modelspec.architecture"] == "lumina-2/lora"
    assert md["modelspec.implementation"] == "https://github.com/Alpha-VLLM/Lumina-Image-2.0"
    assert "modelspec.prediction_type" not in md and md["modelspec.resolution"] == "64x64"
    assert md["ss_network_module"] == "networks.lora_lumina"
    assert (md["ss_timestep_sampling"], md["ss_model_prediction_type"], md["ss_discrete_flow_shift"]) == (
        "shift", "raw", "6.0")
    for key in ("ss_weighting_scheme", "ss_logit_mean", "ss_logit_std", "ss_mode_scale", "ss_sigmoid_scale",
                "ss_gemma2_max_token_length", "ss_system_prompt", "sshs_model_hash"):
        assert key in md, key
    samples = list((out / "sample").glob("lora_e000003_00_*_7.png"))
    assert len(samples) == 1 and Image.open(samples[0]).size == (64, 64)


def test_gemma_and_the_dit_get_their_learning_rates(trained):
    root, _ = trained
    acc = tensorboard_events(root / "logs")
    assert {t for t in acc.Tags()["scalars"] if t.startswith("lr/")} == {"lr/textencoder", "lr/unet"}
    assert all(e.value == pytest.approx(1e-3) for e in acc.Scalars("lr/textencoder"))
    assert all(e.value == pytest.approx(3e-3) for e in acc.Scalars("lr/unet"))
    assert len(acc.Scalars("loss/current")) == 12


def test_training_lowers_the_denoising_loss_and_changes_generation(trained, tiny_lumina, dataset):
    import networks.lora_lumina as lora_lumina
    from library.demo.evaluate import family_denoising_loss, load_images
    from library.families.lumina.generation import LuminaSampler
    from library.sampling.prompts import SamplePrompt

    _, out = trained
    family, models, args = _models(tiny_lumina)
    gemma2 = models.text_encoders[0]
    images = load_images(dataset[1])
    captions = [p.with_suffix(".txt").read_text() for p in dataset[1]]
    latents = family.encode_images(models, images)

    def loss() -> float:
        batch = {"input_ids": family.make_tokenize_fn(models, args)(captions)}
        return family_denoising_loss(family, models, args, latents, family.encode_text(models, batch, args))

    sampler = LuminaSampler(models.denoiser, models.vae, gemma2, models.tokenizers[0], max_length=32)
    prompt = SamplePrompt("sks, a red circle", width=64, height=64, steps=4, scale=3.5, cfg_trunc_ratio=1.0)

    def image() -> np.ndarray:
        return np.asarray(sampler.generate(prompt, generator=torch.Generator().manual_seed(1), device="cpu",
                                           dtype=torch.float32, progress=False), dtype=np.int16)

    before, image_before = loss(), image()
    network, _ = lora_lumina.create_network_from_weights(1.0, out / "lora.safetensors", None, gemma2,
                                                         models.denoiser, for_inference=True)
    network.apply_to(gemma2, models.denoiser, True, True)
    after, image_after = loss(), image()
    assert after < 0.9 * before, (before, after)
    assert np.abs(image_after - image_before).mean() > 1.0
    network.set_multiplier(0.0)
    assert np.array_equal(image(), image_before)


def test_resume_continues_bit_identically(tmp_path, tiny_lumina, dataset):
    common = dict(max_train_steps=6, network_dim=4, network_alpha=2, network_train_unet_only=True,
                  save_every_n_steps=3, save_state=True, network_dropout=0.1, timestep_sampling="nextdit_shift")
    full = tmp_path / "full"
    run_script(SCRIPT, lumina_args(tiny_lumina, full, dataset[0], **common))
    resumed = tmp_path / "resumed"
    run_script(SCRIPT, lumina_args(tiny_lumina, resumed, dataset[0], resume=full / "lora-step00000003-state", **common))
    a, b = load_file(str(full / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys() and not any(k.startswith("lora_te_") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_text_encoder_outputs_and_latents_cached_on_disk_in_kohya_layout(tmp_path, tiny_lumina):
    data = tmp_path / "data"
    images = write_shapes_folder(data / "3_sks", 2, seed=5, trigger="sks")
    common = dict(max_train_steps=2, network_train_unet_only=True, cache_text_encoder_outputs_to_disk=True,
                  cache_latents_to_disk=True, system_prompt="You draw shapes.")
    first = tmp_path / "first"
    run_script(SCRIPT, lumina_args(tiny_lumina, first, data, **common))
    te_file = images[0].with_name(images[0].stem + "_lumina_te.npz")
    latent_file = images[0].with_name(images[0].stem + "_0064x0064_lumina.npz")
    with np.load(te_file) as npz:
        assert set(npz.files) == {"hidden_state", "attention_mask", "input_ids", "system_prompt_hash",
                                  "caption_sha256"}
        assert npz["hidden_state"].shape == (32, 64) and npz["input_ids"].shape == (32,)
        assert npz["attention_mask"].dtype == np.bool_ and npz["input_ids"][0] == 2  # <bos>
    with np.load(latent_file) as npz:
        assert {"latents_8x8", "original_size_8x8", "crop_ltrb_8x8"} <= set(npz.files)
        assert npz["latents_8x8"].shape == (16, 8, 8)
    stamps = {p: p.stat().st_mtime_ns for p in (te_file, latent_file)}

    second = tmp_path / "second"
    run_script(SCRIPT, lumina_args(tiny_lumina, second, data, **common))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # reused, not rewritten
    a, b = load_file(str(first / "lora.safetensors")), load_file(str(second / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Another system prompt makes the text-encoder files stale: they are encoded again.
    with np.load(te_file) as npz:
        old_ids = npz["input_ids"].copy()
    run_script(SCRIPT, lumina_args(tiny_lumina, tmp_path / "third", data, **{**common, "system_prompt": ""}))
    with np.load(te_file) as npz:
        assert not np.array_equal(npz["input_ids"], old_ids)
    assert latent_file.stat().st_mtime_ns == stamps[latent_file]


def test_caching_tools_with_lumina_write_the_files_training_accepts(tmp_path, tiny_lumina):
    from tools import cache_latents, cache_text_encoder_outputs

    data = tmp_path / "data"
    images = write_shapes_folder(data / "2_sks", 2, seed=6, trigger="sks")
    argv = lumina_args(tiny_lumina, tmp_path / "out", data, max_train_steps=1, network_train_unet_only=True,
                       cache_text_encoder_outputs_to_disk=True, cache_latents_to_disk=True,
                       system_prompt="You draw shapes.")
    cache_text_encoder_outputs.main(["--lumina", *argv])
    cache_latents.main(["--lumina", *argv])
    files = sorted(data.rglob("*.npz"))
    assert sorted(f.name for f in files) == sorted(
        [p.stem + "_lumina_te.npz" for p in images] + [p.stem + "_0064x0064_lumina.npz" for p in images])
    assert not (tmp_path / "out").exists()  # the tools train nothing and save nothing
    stamps = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}
    run_script(SCRIPT, argv)
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files} == stamps  # all valid: nothing re-encoded
    assert (tmp_path / "out" / "lora.safetensors").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--network_module", "networks.lora_flux"], "networks.lora_lumina"),
    (["--min_snr_gamma", "5"], "--min_snr_gamma does not apply to Lumina-Image 2.0"),
    (["--weighted_captions"], "--weighted_captions is not supported"),
    (["--blocks_to_swap", "2", "--cpu_offload_checkpointing", "--gradient_checkpointing"], "exclude each other"),
    (["--gemma2_max_token_length", "0"], "--gemma2_max_token_length 0 must be 1 or more"),
    (["--discrete_flow_shift", "0"], "--discrete_flow_shift must be > 0"),
])
def test_bad_flag_combinations_are_refused_before_loading(tmp_path, tiny_lumina, dataset, extra, message):
    import lumina_train_network

    argv = lumina_args(tiny_lumina, tmp_path / "out", dataset[0]) + extra
    with pytest.raises(SystemExit) as info:
        lumina_train_network.main(argv)
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_missing_model_files_are_named(tmp_path, tiny_lumina, dataset):
    import lumina_train_network

    argv = lumina_args(tiny_lumina, tmp_path / "out", dataset[0])
    argv[argv.index("--gemma2") + 1] = str(tmp_path / "nope.safetensors")
    with pytest.raises(SystemExit, match="--gemma2 .*nope.safetensors: no such file"):
        lumina_train_network.main(argv)
    argv = lumina_args(tiny_lumina, tmp_path / "out", dataset[0])
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(tiny_lumina.gemma2)  # the wrong file
    with pytest.raises(SystemExit, match="error: .*not a Lumina-Image 2.0 DiT file"):
        lumina_train_network.main(argv)


def test_minimal_inference_applies_and_merges_loras(tmp_path, trained, tiny_lumina):
    import lumina_minimal_inference
    from library.families.lumina.inference import run

    _, out = trained
    lora = out / "lora.safetensors"

    def generate(folder: str, *extra: str) -> np.ndarray:
        args = lumina_minimal_inference.setup_parser().parse_args([
            "--pretrained_model_name_or_path", str(tiny_lumina.dit), "--gemma2_path", str(tiny_lumina.gemma2),
            "--ae_path", str(tiny_lumina.ae), "--tokenizer_cache_dir", str(tiny_lumina.tokenizer_cache_dir),
            "--prompt", "sks, a red circle", "--image_width", "64", "--image_height", "64", "--steps", "3",
            "--seed", "3", "--dtype", "float", "--gemma2_dtype", "float", "--ae_dtype", "float",
            "--gemma2_max_token_length", "32", "--cfg_trunc_ratio", "1.0", "--output_dir", str(tmp_path / folder),
            *extra])
        (path,) = run(args)
        image = Image.open(path)
        assert image.text["prompt"] == "sks, a red circle" and image.text["seed"] == "3"
        assert path.name.startswith("image_") and image.text["cfg_trunc_ratio"] == "1.0"
        return np.asarray(image, dtype=np.int16)

    base = generate("base")
    applied = generate("applied", "--lora_weights", f"{lora};1.0")
    merged = generate("merged", "--lora_weights", f"{lora};1.0", "--merge_lora_weights")
    off = generate("off", "--lora_weights", f"{lora};0")
    assert np.abs(applied - base).mean() > 1.0
    assert np.abs(merged - applied).max() <= 3
    assert np.array_equal(off, base)
