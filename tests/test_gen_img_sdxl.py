"""gen_img.py --sdxl on the tiny SDXL model: txt2img, seeds, size conditioning (flags and in-prompt),
guidance paths, LoRA (applied / multiplier 0 / merged), SDXL textual inversion, img2img, inpainting,
hires fix, and the errors for a model of the other family."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from library.generation.cli import setup_parser, validate_args
from library.generation.runner import GenerationError, ImageJob, load_generator, run
from library.generation.sdxl import SDXLGenerator, size_ids
from tests.train_helpers import run_script

CPU = torch.device("cpu")


def make_args(ckpt, outdir, *extra, sdxl=True):
    parser = setup_parser()
    args = parser.parse_args(["--ckpt", str(ckpt), "--outdir", str(outdir), "--W", "64", "--H", "64", "--steps", "2",
                              "--console_log_simple", *(["--sdxl"] if sdxl else []), *map(str, extra)])
    validate_args(parser, args)
    return args


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def gen(generator, ckpt, outdir, *extra) -> list:
    return run(make_args(ckpt, outdir, *extra), generator)


def one(generator, ckpt, outdir, prompt, *extra) -> np.ndarray:
    (path,) = gen(generator, ckpt, outdir, "--prompt", prompt, *extra)
    return pixels(path)


def differ(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.fixture(scope="module")
def xl(tiny_sdxl_ckpt, tmp_path_factory) -> SDXLGenerator:
    return load_generator(make_args(tiny_sdxl_ckpt, tmp_path_factory.mktemp("unused"), "--prompt", "x"), CPU)


@pytest.fixture(scope="module")
def sdxl_lora(tiny_sdxl_ckpt, tmp_path_factory):
    """A LoRA over both text encoders and the U-Net, random up weights (so it changes the image)."""
    from library.families.sdxl.loading import load_sdxl_models
    from networks.lora import create_network

    models = load_sdxl_models(tiny_sdxl_ckpt)
    torch.manual_seed(7)
    network = create_network(1.0, 4, 4, None, [models.text_encoder1, models.text_encoder2], models.unet)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "lora_up" in name:
                p.normal_(0, 0.3)
    names = {k.partition(".")[0].split("_")[1] for k in network.state_dict()}
    assert {"te1", "te2", "unet"} <= names  # both encoders and the U-Net are adapted
    path = tmp_path_factory.mktemp("sdxl_lora") / "xl_lora.safetensors"
    network.save_weights(path, metadata={"ss_network_dim": "4"})
    return path


# --- command line -----------------------------------------------------------------------------

def test_cli_txt2img_writes_sdxl_image_with_size_chunks(tiny_sdxl_ckpt, tmp_path):
    run_script("gen_img.py", ["--sdxl", "--ckpt", tiny_sdxl_ckpt, "--outdir", tmp_path, "--W", 64, "--H", 64,
                              "--steps", 2, "--seed", 3, "--original_width", 128, "--crop_top", 8,
                              "--prompt", "a red cat --n blurry --oh 96 --f out", "--console_log_simple"])
    image = Image.open(tmp_path / "out.png")
    assert image.size == (64, 64) and pixels(tmp_path / "out.png").std() > 0
    assert {k: image.text[k] for k in ("original-width", "original-height", "original-width-negative",
                                        "original-height-negative", "crop-top", "crop-left")} == {
        "original-width": "128", "original-height": "96", "original-width-negative": "128",
        "original-height-negative": "96", "crop-top": "8", "crop-left": "0"}


def test_cli_rejects_sdxl_flags_without_sdxl(tiny_sdxl_ckpt):
    bad = run_script("gen_img.py", ["--ckpt", tiny_sdxl_ckpt, "--prompt", "a", "--original_width", 1024],
                     expect_ok=False)
    assert bad.returncode == 2 and "--original_width" in bad.stderr and "--sdxl" in bad.stderr
    bad = run_script("gen_img.py", ["--ckpt", tiny_sdxl_ckpt, "--prompt", "a", "--sdxl", "--v2"], expect_ok=False)
    assert bad.returncode == 2 and "--sdxl" in bad.stderr


def test_wrong_family_gives_one_line_errors(tiny_sd1_ckpt, tiny_sd1_diffusers, tiny_sdxl_ckpt, tiny_sdxl_diffusers,
                                            tmp_path):
    for ckpt in (tiny_sd1_ckpt, tiny_sd1_diffusers):
        with pytest.raises(GenerationError, match="SD 1.x/2.x model, not SDXL: drop --sdxl") as e:
            load_generator(make_args(ckpt, tmp_path, "--prompt", "x"), CPU)
        assert "\n" not in str(e.value)
    for ckpt in (tiny_sdxl_ckpt, tiny_sdxl_diffusers):
        with pytest.raises(GenerationError, match="is an SDXL model: add --sdxl") as e:
            load_generator(make_args(ckpt, tmp_path, "--prompt", "x", sdxl=False), CPU)
        assert "\n" not in str(e.value)


# --- in-process -------------------------------------------------------------------------------

def test_seeds_and_diffusers_folder(xl, tiny_sdxl_ckpt, tiny_sdxl_diffusers, tmp_path):
    a = one(xl, tiny_sdxl_ckpt, tmp_path / "a", "a cat --d 1")
    b = one(xl, tiny_sdxl_ckpt, tmp_path / "b", "a cat --d 1")
    c = one(xl, tiny_sdxl_ckpt, tmp_path / "c", "a cat --d 2")
    assert np.array_equal(a, b) and differ(a, c) > 1
    args = make_args(tiny_sdxl_diffusers, tmp_path / "d", "--prompt", "a cat --d 1")
    (folder,) = run(args, load_generator(args, CPU))
    assert np.abs(pixels(folder) - a).max() <= 1  # the same weights as the single file


def test_size_conditioning_flags_and_prompt_override(xl, tiny_sdxl_ckpt, tmp_path):
    default = one(xl, tiny_sdxl_ckpt, tmp_path / "0", "a cat --d 1")
    prompt_ow = one(xl, tiny_sdxl_ckpt, tmp_path / "1", "a cat --d 1 --ow 512 --oh 256")
    flag_ow = one(xl, tiny_sdxl_ckpt, tmp_path / "2", "a cat --d 1", "--original_width", 512, "--original_height", 256)
    assert differ(default, prompt_ow) > 0.5  # the size conditioning reaches the U-Net
    assert np.array_equal(prompt_ow, flag_ow)
    # In-prompt values win: --ow 64 --oh 64 is the default (the image size) whatever the flags say.
    overridden = one(xl, tiny_sdxl_ckpt, tmp_path / "3", "a cat --d 1 --ow 64 --oh 64", "--original_width", 512,
                     "--original_height", 256)
    assert np.array_equal(overridden, default)
    crop = one(xl, tiny_sdxl_ckpt, tmp_path / "4", "a cat --d 1 --ct 32 --cl 16")
    negative = one(xl, tiny_sdxl_ckpt, tmp_path / "5", "a cat --d 1 --nw 512 --nh 512")
    assert differ(default, crop) > 0.5 and differ(default, negative) > 0.5


def test_every_guidance_path_carries_size_and_pooled_conditioning(xl):
    jobs = [ImageJob(prompt=p, negative_prompt="ugly", width=64, height=64, steps=2, scale=7.5, negative_scale=None,
                     seed=1, strength=1.0, sampler="euler",
                     size_options=(("original_width", 128), ("original_width_negative", 256)))
            for p in ("a cat", "a dog")]

    def check(cond, rows, negative_rows):
        added = cond.unet_kwargs["added_cond_kwargs"]
        assert cond.hidden_states.shape[0] == added["text_embeds"].shape[0] == added["time_ids"].shape[0] == rows
        assert added["time_ids"][:, 1].tolist() == [256.0] * negative_rows + [128.0] * (rows - negative_rows)
        assert added["time_ids"][:, 4:].tolist() == [[64.0, 64.0]] * rows

    cond, uncond, _, guidance = xl._conditioning(jobs)  # CFG: [negative, prompt] rows
    assert guidance == 7.5
    check(cond, 2, 0)
    check(uncond, 2, 2)
    # --negative_scale: [empty, negative, prompt] rows; the empty uncond is a negative row too.
    cond, uncond, _, guidance = xl._conditioning([replace(j, negative_scale=2.0) for j in jobs])
    assert uncond is None and guidance == 1.0
    check(cond, 6, 4)
    cond, uncond, _, _ = xl._conditioning([replace(j, scale=1.0) for j in jobs])
    assert uncond is None
    check(cond, 2, 0)
    # A hires first pass at half size: its own target size, given sizes scaled.
    first = size_ids(jobs[0], negative=False, size=(32, 32, 0.5))
    assert first.tolist() == [[32.0, 64.0, 0.0, 0.0, 32.0, 32.0]]


def test_guidance_modes_generate(xl, tiny_sdxl_ckpt, tmp_path):
    cfg = one(xl, tiny_sdxl_ckpt, tmp_path / "a", "a cat --n ugly --d 1", "--batch_size", 2)
    nscale = one(xl, tiny_sdxl_ckpt, tmp_path / "b", "a cat --n ugly --d 1", "--negative_scale", 3)
    plain = one(xl, tiny_sdxl_ckpt, tmp_path / "c", "a cat --n ugly --d 1 --l 1")
    assert differ(cfg, nscale) > 0.5 and differ(cfg, plain) > 0.5


def test_lora_changes_image_mul0_is_base_and_merge_matches(xl, tiny_sdxl_ckpt, sdxl_lora, tmp_path):
    base = one(xl, tiny_sdxl_ckpt, tmp_path / "b", "a cat --d 4")
    net = ["--network_module", "networks.lora", "--network_weights", sdxl_lora]
    applied = load_generator(make_args(tiny_sdxl_ckpt, tmp_path, "--prompt", "x", *net), CPU)
    with_lora = one(applied, tiny_sdxl_ckpt, tmp_path / "l", "a cat --d 4")
    assert differ(with_lora, base) > 1
    zero = load_generator(make_args(tiny_sdxl_ckpt, tmp_path, "--prompt", "x", *net, "--network_mul", 0), CPU)
    assert np.array_equal(one(zero, tiny_sdxl_ckpt, tmp_path / "z", "a cat --d 4"), base)
    assert np.array_equal(one(applied, tiny_sdxl_ckpt, tmp_path / "a", "a cat --d 4 --am 0"), base)
    merged = load_generator(make_args(tiny_sdxl_ckpt, tmp_path, "--prompt", "x", *net, "--network_merge"), CPU)
    assert np.abs(one(merged, tiny_sdxl_ckpt, tmp_path / "m", "a cat --d 4") - with_lora).max() <= 3


def test_sdxl_textual_inversion(xl, tiny_sdxl_ckpt, tmp_path):
    torch.manual_seed(0)
    emb = tmp_path / "zxqstyle.safetensors"
    save_file({"clip_l": torch.randn(2, 32) * 2, "clip_g": torch.randn(2, 32) * 2}, emb)
    ti = load_generator(make_args(tiny_sdxl_ckpt, tmp_path, "--prompt", "x", "--textual_inversion_embeddings", emb),
                        CPU)
    for tok, te, key in zip(ti.tokenizer, ti.text_encoder, ("clip_l", "clip_g")):
        ids = tok.convert_tokens_to_ids(["zxqstyle", "zxqstyle1"])
        assert torch.equal(te.get_input_embeddings().weight[ids], load_file(emb)[key])
    with_token = one(ti, tiny_sdxl_ckpt, tmp_path / "a", "a zxqstyle cat --d 1")
    without = one(ti, tiny_sdxl_ckpt, tmp_path / "b", "a cat --d 1")
    assert differ(with_token, without) > 0.5
    assert np.array_equal(without, one(xl, tiny_sdxl_ckpt, tmp_path / "c", "a cat --d 1"))

    sd_format = tmp_path / "sdemb.safetensors"
    save_file({"emb_params": torch.randn(1, 32)}, sd_format)
    with pytest.raises(GenerationError, match="clip_l, clip_g.*SD 1.x/2.x embedding"):
        load_generator(make_args(tiny_sdxl_ckpt, tmp_path, "--prompt", "x", "--textual_inversion_embeddings",
                                 sd_format), CPU)
    narrow = tmp_path / "narrow.safetensors"
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 16)}, narrow)
    with pytest.raises(GenerationError, match="'clip_g' vectors have width 16 but text encoder 2 has 32"):
        load_generator(make_args(tiny_sdxl_ckpt, tmp_path, "--prompt", "x", "--textual_inversion_embeddings",
                                 narrow), CPU)


def test_img2img_inpaint_and_hires_fix(xl, tiny_sdxl_ckpt, tmp_path):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.allclose(xl.encode_images(x), xl.vae.encode(x).latent_dist.mean * 0.13025)
    src = tmp_path / "src.png"
    y, xx = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([xx * 4, y * 4, (xx + y) * 2], -1).astype(np.uint8)).save(src)
    reference = np.asarray(xl.decode(xl.encode_images(
        torch.from_numpy(pixels(src).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]))[0], dtype=np.int16)
    same = one(xl, tiny_sdxl_ckpt, tmp_path / "s", "a cat", "--image_path", src, "--strength", 0.0)
    assert np.array_equal(same, reference)
    changed = one(xl, tiny_sdxl_ckpt, tmp_path / "c", "a cat --t 1", "--image_path", src, "--steps", 3)
    assert differ(changed, reference) > 1

    job = ImageJob(prompt="a cat", negative_prompt="", width=64, height=64, steps=3, scale=7.5, negative_scale=None,
                   seed=1, strength=1.0, sampler="euler")
    init = xl.encode_images(x)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1
    latents = xl._denoise([job], xl._conditioning([job]), [torch.Generator().manual_seed(1)], width=64, height=64,
                          steps=3, init=init, strength=1.0, mask=mask)
    assert torch.equal(latents[..., :4], init[..., :4]) and (latents[..., 4:] - init[..., 4:]).abs().mean() > 0.05

    paths = gen(xl, tiny_sdxl_ckpt, tmp_path / "h", "--W", 96, "--H", 64, "--highres_fix_scale", 0.5,
                "--highres_fix_steps", 2, "--highres_fix_save_1st", "--prompt", "a cat --d 2 --f hi")
    assert [(p.name, Image.open(p).size) for p in paths] == [("hi_1st.png", (48, 32)), ("hi.png", (96, 64))]


def test_clip_skip_other_than_2_warns_once(xl, tiny_sdxl_ckpt, tmp_path, caplog, monkeypatch):
    import library.generation.sdxl as sdxl_module

    monkeypatch.setattr(sdxl_module, "_warned_clip_skip", False)
    default = one(xl, tiny_sdxl_ckpt, tmp_path / "a", "a cat --d 1")
    skip1 = gen(xl, tiny_sdxl_ckpt, tmp_path / "b", "--prompt", "a cat --d 1", "--clip_skip", 1,
                "--images_per_prompt", 2)
    assert np.array_equal(default, pixels(skip1[0]))  # ignored: always the penultimate layer
    assert caplog.text.count("--clip_skip 1 is ignored") == 1


def test_sd_model_ignores_in_prompt_sdxl_options_with_a_warning(tiny_sd1_ckpt, tmp_path, caplog, monkeypatch):
    import library.generation.runner as runner

    monkeypatch.setattr(runner, "_warned_size_options", False)
    sd = load_generator(make_args(tiny_sd1_ckpt, tmp_path, "--prompt", "x", sdxl=False), CPU)
    (plain,) = run(make_args(tiny_sd1_ckpt, tmp_path / "a", "--prompt", "a cat --d 1", sdxl=False), sd)
    (sized,) = run(make_args(tiny_sd1_ckpt, tmp_path / "b", "--prompt", "a cat --d 1 --ow 512 --ct 8", sdxl=False), sd)
    assert np.array_equal(pixels(plain), pixels(sized))
    assert "SDXL size conditioning: ignored for SD 1.x/2.x" in caplog.text
    assert "original-width" not in Image.open(sized).text
