"""fine_tune.py, train_db.py and sdxl_train.py end to end on tiny models: what is trained, what is saved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.demo.shapes import write_shapes_folder
from tests.train_helpers import base_train_args, run_script

UNET, VAE, TE = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."


def ft_args(model: Path, out: Path, **overrides) -> list[str]:
    values = dict(network_module=None, network_dim=None, network_alpha=None, learning_rate=2e-4, cache_latents=True,
                  save_model_as="safetensors", output_name="model")
    values.update(overrides)
    return base_train_args(model, out, **values)


def split(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def metadata_dataset(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    """A fine-tuning dataset: images + a metadata json with captions (made by the finetune/ script)."""
    from finetune import merge_captions_to_metadata

    root = tmp_path_factory.mktemp("ft_data")
    images = write_shapes_folder(root / "images", 4, seed=3, trigger="sks", caption_extension=".caption")
    meta = root / "meta.json"
    merge_captions_to_metadata.main([str(root / "images"), str(meta)])
    return root / "images", meta, images


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, tiny_sd1_ckpt, metadata_dataset):
    images_dir, meta, _ = metadata_dataset
    out = tmp_path_factory.mktemp("ft_out")
    run_script("fine_tune.py", ft_args(tiny_sd1_ckpt, out, train_data_dir=images_dir, in_json=meta,
                                       max_train_steps=12, save_state=True, save_every_n_steps=6))
    return out


def test_fine_tune_saves_the_checkpoint_layout_with_untrained_parts_unchanged(fine_tuned, tiny_sd1_ckpt):
    source, saved = load_file(str(tiny_sd1_ckpt)), load_file(str(fine_tuned / "model.safetensors"))
    assert saved.keys() == source.keys()
    assert all(saved[k].shape == source[k].shape and saved[k].dtype == source[k].dtype for k in source)
    for prefix in (VAE, TE):  # not trained: bit-identical, extras included
        assert all(torch.equal(saved[k], source[k]) for k in split(source, prefix)), prefix
    unet_changed = [k for k in split(source, UNET) if not torch.equal(saved[k], source[k])]
    assert len(unet_changed) > len(split(source, UNET)) // 2
    with safe_open(str(fine_tuned / "model.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"] == "stable-diffusion-v1"
    assert md["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert not any(k.startswith("ss_") for k in md)


def test_saved_checkpoint_reloads_identically_and_in_diffusers(fine_tuned, tiny_sd1_diffusers):
    from diffusers import StableDiffusionPipeline

    from library.families.sd.loading import load_sd_models

    path = fine_tuned / "model.safetensors"
    ours = load_sd_models(str(path), v2=False)
    reloaded = ours.ldm_state_dict()
    saved = load_file(str(path))
    assert all(torch.equal(reloaded[k], saved[k]) for k in saved)
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_sd1_diffusers), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    theirs = pipe.unet.state_dict()
    assert all(torch.allclose(v, theirs[k]) for k, v in ours.unet.state_dict().items())


def test_fine_tuning_lowers_the_loss_and_changes_generation(fine_tuned, tiny_sd1_ckpt, metadata_dataset, tmp_path):
    from library.demo.evaluate import denoising_loss, load_images

    _, _, images = metadata_dataset
    captions = [p.with_suffix(".caption").read_text() for p in images]
    pixels = load_images(images)
    before = denoising_loss(tiny_sd1_ckpt, None, pixels, captions)
    after = denoising_loss(fine_tuned / "model.safetensors", None, pixels, captions)
    assert after < 0.9 * before, (before, after)

    def image(ckpt: Path, folder: str) -> np.ndarray:
        from PIL import Image

        run_script("gen_img.py", ["--ckpt", ckpt, "--outdir", tmp_path / folder, "--W", "64", "--H", "64", "--steps",
                                  "3", "--seed", "5", "--prompt", captions[0], "--sequential_file_name"])
        return np.asarray(Image.open(next((tmp_path / folder).glob("*.png"))).convert("RGB"), dtype=np.int16)

    assert np.abs(image(fine_tuned / "model.safetensors", "after") - image(tiny_sd1_ckpt, "before")).mean() > 1.0


def test_resume_and_diffusers_format_continue_the_same_run(fine_tuned, tiny_sd1_ckpt, metadata_dataset, tmp_path):
    from library.families.sd.loading import load_sd_models

    images_dir, meta, _ = metadata_dataset
    out = tmp_path / "resumed"
    run_script("fine_tune.py", ft_args(tiny_sd1_ckpt, out, train_data_dir=images_dir, in_json=meta, max_train_steps=12,
                                       resume=fine_tuned / "model-step00000006-state", save_model_as="diffusers"))
    folder = out / "model"
    assert (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file()
    from_folder = load_sd_models(str(folder), v2=False).ldm_state_dict()
    uninterrupted = load_file(str(fine_tuned / "model.safetensors"))
    for key in split(uninterrupted, UNET):
        assert torch.equal(from_folder[key], uninterrupted[key]), key


def test_train_text_encoder_with_its_own_lr_and_ckpt_format(tmp_path, tiny_sd1_ckpt, metadata_dataset):
    images_dir, meta, _ = metadata_dataset
    out = tmp_path / "te"
    run_script("fine_tune.py", ft_args(tiny_sd1_ckpt, out, train_data_dir=images_dir, in_json=meta, max_train_steps=3,
                                       train_text_encoder=True, learning_rate_te=1e-3, save_model_as="ckpt",
                                       logging_dir=tmp_path / "logs"))
    saved = torch.load(str(out / "model.ckpt"), map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (2, 3)  # 2 batches per epoch
    source = load_file(str(tiny_sd1_ckpt))
    te = split(source, TE + "transformer.text_model.encoder.")
    assert any(not torch.equal(saved["state_dict"][k], te[k]) for k in te)
    assert all(torch.equal(saved["state_dict"][k], source[k]) for k in split(source, VAE))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*"))))
    acc.Reload()
    assert {t for t in acc.Tags()["scalars"] if t.startswith("lr/")} == {"lr/unet", "lr/textencoder"}
    assert all(e.value == pytest.approx(1e-3) for e in acc.Scalars("lr/textencoder"))


@pytest.fixture(scope="module")
def db_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("db_data")
    write_shapes_folder(root / "train" / "3_sks star", 2, seed=4, trigger="sks")
    write_shapes_folder(root / "reg" / "1_star", 2, seed=9)
    return root


def test_dreambooth_stops_text_encoder_training_after_n_steps(tmp_path, tiny_sd1_ckpt, db_dataset):
    out = tmp_path / "db"
    run_script("train_db.py", ft_args(tiny_sd1_ckpt, out, train_data_dir=db_dataset / "train",
                                      reg_data_dir=db_dataset / "reg", caption_extension=".txt", max_train_steps=4,
                                      save_every_n_steps=2, stop_text_encoder_training=2, prior_loss_weight=0.5))
    source, at_2, final = (load_file(str(p)) for p in (tiny_sd1_ckpt, out / "model-step00000002.safetensors",
                                                       out / "model.safetensors"))
    te = list(split(source, TE + "transformer.text_model.encoder."))
    assert any(not torch.equal(at_2[k], source[k]) for k in te)  # trained for 2 steps ...
    assert all(torch.equal(final[k], at_2[k]) for k in te)  # ... then frozen
    assert any(not torch.equal(final[k], at_2[k]) for k in split(source, UNET))  # the U-Net goes on


def test_prior_loss_weight_scales_the_regularization_images_loss(tiny_sd1_ckpt, db_dataset):
    """The loss of a batch is the mean of per-sample losses times the sample weights: reg images count
    --prior_loss_weight times, checked against the per-sample losses of the same batch."""
    from library.args import setup_db_parser
    from library.data.collate import collate_batch
    from library.dataset_config import build_dataset_group
    from library.families.sd.family import StableDiffusionFamily
    from library.training.loss import LossConfig, training_loss

    args = setup_db_parser().parse_args(["--pretrained_model_name_or_path", str(tiny_sd1_ckpt), "--train_data_dir",
                                         str(db_dataset / "train"), "--reg_data_dir", str(db_dataset / "reg"),
                                         "--caption_extension", ".txt", "--resolution", "64", "--train_batch_size",
                                         "8", "--prior_loss_weight", "0.3", "--seed", "1", "--output_dir", "x"])
    family = StableDiffusionFamily()
    models = family.load_models(args, torch.device("cpu"), torch.float32)
    group, _ = build_dataset_group(args, tokenize=family.make_tokenize_fn(models, args))
    group.set_current_epoch(1)
    batch = collate_batch([group[0]])
    weights = batch["loss_weights"]
    assert sorted(set(weights.tolist())) == [pytest.approx(0.3), 1.0]  # reg and train images in one batch
    with torch.no_grad():
        latents = family.encode_images(models, batch["images"])
        cond = family.encode_text(models, batch, args)
        torch.manual_seed(0)
        prediction = family.predict(models, latents, cond, batch, args)
    config = LossConfig.from_args(args)
    total = training_loss(prediction.pred, prediction.target, prediction.timesteps, config, loss_weights=weights)
    per_sample = ((prediction.pred - prediction.target) ** 2).mean(dim=(1, 2, 3))
    assert float(total) == pytest.approx(float((per_sample * weights).mean()), rel=1e-5)
    assert float(total) != pytest.approx(float(per_sample.mean()), rel=1e-3)


def test_sdxl_train_block_lr_freezes_blocks_and_trains_both_text_encoders(tmp_path, tiny_sdxl_ckpt, db_dataset):
    from library.families.sdxl.loading import load_sdxl_models

    lrs = ["0"] * 23
    lrs[1:10] = ["1e-3"] * 9  # input blocks only
    out = tmp_path / "sdxl"
    run_script("sdxl_train.py", ft_args(tiny_sdxl_ckpt, out, train_data_dir=db_dataset / "train",
                                        caption_extension=".txt", max_train_steps=3, bucket_reso_steps=32,
                                        block_lr=",".join(lrs), train_text_encoder=True, learning_rate_te1=1e-3,
                                        learning_rate_te2=2e-3))
    source, saved = load_file(str(tiny_sdxl_ckpt)), load_file(str(out / "model.safetensors"))
    assert saved.keys() == source.keys()
    assert torch.equal(saved["conditioner.embedders.1.model.logit_scale"], source["conditioner.embedders.1.model.logit_scale"])
    changed = {k for k in split(source, UNET) if not torch.equal(saved[k], source[k])}
    assert changed and all(k.startswith(UNET + "input_blocks.") for k in changed)
    for prefix in ("conditioner.embedders.0.", "conditioner.embedders.1.model.transformer."):
        assert any(not torch.equal(saved[k], source[k]) for k in split(source, prefix)), prefix
    load_sdxl_models(str(out / "model.safetensors"))  # loads back through our loader


@pytest.mark.parametrize("extra, message", [
    (["--fp8_base", "--mixed_precision", "bf16"], "--fp8_base"),
    (["--block_lr", "1e-4,1e-4"], "--block_lr has 2 values"),
])
def test_fine_tune_refusals(tmp_path, tiny_sdxl_ckpt, db_dataset, extra, message):
    import sdxl_train

    with pytest.raises(SystemExit) as info:
        sdxl_train.main(ft_args(tiny_sdxl_ckpt, tmp_path / "out", train_data_dir=db_dataset / "train",
                                caption_extension=".txt", bucket_reso_steps=32, max_train_steps=1) + extra)
    assert message in str(info.value)


@pytest.mark.parametrize("fused", [["--fused_backward_pass"], ["--fused_optimizer_groups", "3"]])
def test_fused_optimizer_steps_give_the_plain_loop_weights(tmp_path, tiny_sdxl_ckpt, db_dataset, fused):
    """The optimizer steps inside backward (each weight as its gradient is ready, or in 3 groups) and
    the plain loop end with the same U-Net: the memory saving changes nothing else."""
    common = ft_args(tiny_sdxl_ckpt, tmp_path / "plain", train_data_dir=db_dataset / "train", caption_extension=".txt",
                     max_train_steps=3, bucket_reso_steps=32, optimizer_type="AdaFactor", max_grad_norm=0)
    run_script("sdxl_train.py", common)
    run_script("sdxl_train.py", [*common[:common.index("--output_dir") + 1], str(tmp_path / "fused"),
                                 *common[common.index("--output_dir") + 2:], *fused])
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    other = load_file(str(tmp_path / "fused" / "model.safetensors"))
    unet = split(plain, UNET)
    assert any(not torch.equal(v, load_file(str(tiny_sdxl_ckpt))[k]) for k, v in unet.items())  # it trained
    for key in unet:
        torch.testing.assert_close(other[key], plain[key], rtol=1e-5, atol=1e-6)


def test_no_token_padding_encodes_only_up_to_the_longest_caption(tiny_sd1_ckpt, tmp_path, db_dataset):
    from library.families.sd import text
    from library.families.sd.loading import load_sd_models

    sd = load_sd_models(str(tiny_sd1_ckpt), v2=False)
    captions = ["sks", "a red circle on a blue background"]
    ids = text.tokenize_unpadded(sd.tokenizer, captions)
    padded = text.tokenize(sd.tokenizer, captions, None)
    length = ids.shape[-1]
    assert ids.shape == (2, 1, length) and length < 77
    assert torch.equal(ids[:, 0], padded[:, 0, :length])
    with torch.no_grad():
        short = text.encode(sd.text_encoder, ids, clip_skip=None)
        full = text.encode(sd.text_encoder, padded, clip_skip=None)
    # CLIP attends causally: the positions a short encoding has are the padded encoding's first ones
    torch.testing.assert_close(short, full[:, :length], rtol=1e-5, atol=1e-6)
    run_script("train_db.py", ft_args(tiny_sd1_ckpt, tmp_path / "out", train_data_dir=db_dataset / "train",
                                      caption_extension=".txt", max_train_steps=2, no_token_padding=True))
    assert (tmp_path / "out" / "model.safetensors").is_file()
