"""gen_img.py on the tiny SD models: txt2img, seeds, naming/PNG chunks, networks, img2img/inpaint,
hires fix, textual inversion. Subprocess runs only where the command line itself is under test."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from library.generation.cli import SAMPLER_CHOICES, setup_parser, validate_args
from library.generation.runner import GenerationError, load_generator, run
from tests.train_helpers import REPO, run_script

CPU = torch.device("cpu")


def make_args(ckpt, outdir, *extra):
    parser = setup_parser()
    args = parser.parse_args(["--ckpt", str(ckpt), "--outdir", str(outdir), "--W", "64", "--H", "64", "--steps", "2",
                              "--console_log_simple", *map(str, extra)])
    validate_args(parser, args)
    return args


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def gen(generator, ckpt, outdir, *extra) -> list[Path]:
    return run(make_args(ckpt, outdir, *extra), generator)


@pytest.fixture(scope="module")
def base(tiny_sd1_ckpt, tmp_path_factory):
    return load_generator(make_args(tiny_sd1_ckpt, tmp_path_factory.mktemp("unused"), "--prompt", "x"), CPU)


@pytest.fixture(scope="module")
def lora_files(tiny_sd1_ckpt, tmp_path_factory) -> list[Path]:
    """Two tiny LoRA files with random up weights (so they change the image)."""
    from library.families.sd.loading import load_sd_models
    from networks.lora import create_network

    models = load_sd_models(tiny_sd1_ckpt, v2=False)
    folder = tmp_path_factory.mktemp("loras")
    paths = []
    for k in range(2):
        torch.manual_seed(100 + k)
        network = create_network(1.0, 4, 4, models.vae, models.text_encoder, models.unet)
        with torch.no_grad():
            for name, p in network.named_parameters():
                if "lora_up" in name:
                    p.normal_(0, 0.3)
        path = folder / f"lora{k}.safetensors"
        network.save_weights(path, metadata={"ss_network_dim": "4", "ss_output_name": f"lora{k}"})
        paths.append(path)
    return paths


# --- command line (subprocess) ---------------------------------------------------------------

def test_help_is_fast_and_unimplemented_flags_are_rejected():
    env = {"PYTHONPATH": str(REPO)}
    code = "import sys, gen_img; sys.argv=['gen_img.py','--help']; gen_img.main()"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0 and "--highres_fix_scale" in proc.stdout
    assert "torch" not in {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()[1:]}
    bad = run_script("gen_img.py", ["--ckpt", "x", "--prompt", "a", "--from_module", "m"], expect_ok=False)
    assert bad.returncode == 2 and "--from_module" in bad.stderr


def test_sampler_choices_match_the_core():
    from library.sampling.schedulers import SAMPLER_NAMES

    assert set(SAMPLER_CHOICES) == set(SAMPLER_NAMES)


def test_txt2img_cli_naming_chunks_and_reproducibility(tiny_sd1_ckpt, tmp_path):
    common = ["--ckpt", tiny_sd1_ckpt, "--W", 64, "--H", 64, "--steps", 2, "--seed", 7, "--images_per_prompt", 2,
              "--prompt", "a red cat --n blurry --l 5", "--sampler", "euler_a", "--negative_scale", 2,
              "--console_log_simple"]
    run_script("gen_img.py", [*common, "--outdir", tmp_path / "a", "--batch_size", 2])
    run_script("gen_img.py", [*common, "--outdir", tmp_path / "b", "--batch_size", 2, "--sequential_file_name"])
    a = sorted((tmp_path / "a").iterdir())
    b = sorted((tmp_path / "b").iterdir())
    assert [p.name for p in b] == ["im_000001.png", "im_000002.png"]
    assert len(a) == 2 and all(re.fullmatch(r"im_\d{14}_\d{3}_\d+\.png", p.name) for p in a)
    info = Image.open(a[0]).text
    assert info["prompt"] == "a red cat" and info["negative-prompt"] == "blurry"
    assert info["sampler"] == "euler_a" and info["steps"] == "2" and info["scale"] == "5.0"
    assert info["negative-scale"] == "2.0" and a[0].name.endswith(f"_{info['seed']}.png")
    for pa, pb in zip(a, b):
        assert Image.open(pb).text["seed"] == Image.open(pa).text["seed"]
        assert np.array_equal(pixels(pa), pixels(pb))
    assert not np.array_equal(pixels(a[0]), pixels(a[1]))


def test_networks_cli_merge_show_meta(tiny_sd1_ckpt, lora_files, tmp_path):
    args = ["--ckpt", tiny_sd1_ckpt, "--W", 64, "--H", 64, "--steps", 2, "--prompt", "a cat --d 3 --f merged",
            "--network_module", "networks.lora", "networks.lora", "--network_weights", *lora_files,
            "--network_mul", 0.7, 0.5, "--console_log_simple"]
    proc = run_script("gen_img.py", [*args, "--outdir", tmp_path, "--network_merge", "--network_show_meta"])
    assert "ss_output_name: lora0" in proc.stdout and "ss_output_name: lora1" in proc.stdout
    assert (tmp_path / "merged.png").is_file()
    bad = run_script("gen_img.py", [*args[:-1], "--outdir", tmp_path, "--network_merge", "--prompt", "a --am 1,1"],
                     expect_ok=False)
    assert bad.returncode != 0 and "--network_merge" in bad.stderr


def test_hires_fix_cli(tiny_sd1_ckpt, tmp_path):
    run_script("gen_img.py", ["--ckpt", tiny_sd1_ckpt, "--outdir", tmp_path, "--W", 128, "--H", 96, "--steps", 2,
                              "--highres_fix_scale", 0.5, "--highres_fix_steps", 2, "--highres_fix_save_1st",
                              "--strength", 0.5, "--prompt", "a cat --f hi", "--seed", 1, "--console_log_simple"])
    assert Image.open(tmp_path / "hi.png").size == (128, 96)
    assert Image.open(tmp_path / "hi_1st.png").size == (64, 48)


def test_img2img_inpaint_cli_original_names(tiny_sd1_ckpt, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("one", "two"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src / f"{name}.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    run_script("gen_img.py", ["--ckpt", tiny_sd1_ckpt, "--outdir", out, "--steps", 3, "--image_path", src,
                              "--mask_path", tmp_path / "mask.png", "--strength", 1.0, "--use_original_file_name",
                              "--prompt", "a cat", "--seed", 2, "--sampler", "euler", "--console_log_simple"])
    assert sorted(p.name for p in out.iterdir()) == ["one.png", "two.png"]


# --- in-process ------------------------------------------------------------------------------

def test_seeds(base, tiny_sd1_ckpt, tmp_path):
    a = gen(base, tiny_sd1_ckpt, tmp_path / "a", "--prompt", "a cat", "--seed", 1, "--n_iter", 2, "--iter_same_seed")
    b = gen(base, tiny_sd1_ckpt, tmp_path / "b", "--prompt", "a cat", "--seed", 2)
    c = gen(base, tiny_sd1_ckpt, tmp_path / "c", "--prompt", "a cat", "--seed", 1, "--n_iter", 2)
    seeds = [Image.open(p).text["seed"] for p in a + c]
    assert seeds[0] == seeds[1] == seeds[2] != seeds[3]  # iter_same_seed repeats; otherwise new draws
    assert np.array_equal(pixels(a[0]), pixels(a[1]))
    assert np.array_equal(pixels(a[0]), pixels(c[0]))
    assert not np.array_equal(pixels(a[0]), pixels(b[0]))
    # An image depends on its seed, not on its batch (up to float rounding of batched kernels).
    batched = gen(base, tiny_sd1_ckpt, tmp_path / "d", "--prompt", "a cat", "--seed", 1, "--images_per_prompt", 2,
                  "--batch_size", 2, "--sampler", "euler_a")
    single = gen(base, tiny_sd1_ckpt, tmp_path / "e", "--prompt", "a cat", "--seed", 1, "--images_per_prompt", 2,
                 "--sampler", "euler_a")
    for pb, ps in zip(batched, single):
        assert Image.open(pb).text["seed"] == Image.open(ps).text["seed"]
        assert np.abs(pixels(pb) - pixels(ps)).max() <= 2


@pytest.mark.parametrize("sampler", SAMPLER_CHOICES)
def test_every_sampler(base, tiny_sd1_ckpt, tmp_path, sampler):
    (path,) = gen(base, tiny_sd1_ckpt, tmp_path, "--prompt", "a cat --d 1", "--sampler", sampler)
    image = pixels(path)
    assert image.shape == (64, 64, 3) and image.std() > 0


def test_prompt_file_options(base, tiny_sd1_ckpt, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("# comment\na {red|blue} cat --w 72 --h 64 --s 3 --d 5 --nl none --f first\n\n"
                       "{e$$dog|bird} --n ugly --l 1\n", encoding="utf-8")
    paths = gen(base, tiny_sd1_ckpt, tmp_path / "o", "--from_file", prompts, "--seed", 3, "--negative_scale", 1.5)
    names = [p.name for p in paths]
    assert names[0] == "first.png" and Image.open(paths[0]).size == (72, 64)
    info = Image.open(paths[0]).text
    assert info["prompt"] in ("a red cat", "a blue cat") and info["seed"] == "5" and "negative-scale" not in info
    assert [Image.open(p).text["prompt"] for p in paths[1:]] == ["dog", "bird"]
    assert Image.open(paths[1]).text["negative-scale"] == "1.5"
    with pytest.raises(GenerationError, match="--zz"):
        gen(base, tiny_sd1_ckpt, tmp_path / "o", "--prompt", "a --zz 1")


def test_lora_changes_image_mul0_is_base_and_merge_matches(base, tiny_sd1_ckpt, lora_files, tmp_path):
    plain = gen(base, tiny_sd1_ckpt, tmp_path / "p", "--prompt", "a cat --d 4")[0]
    net = ["--network_module", "networks.lora", "--network_weights", lora_files[0]]
    applied_args = make_args(tiny_sd1_ckpt, tmp_path / "u", "--prompt", "x", *net)
    applied = load_generator(applied_args, CPU)
    zero = gen(applied, tiny_sd1_ckpt, tmp_path / "z", "--prompt", "a cat --d 4 --am 0")[0]
    one = gen(applied, tiny_sd1_ckpt, tmp_path / "o", "--prompt", "a cat --d 4")[0]
    assert np.array_equal(pixels(zero), pixels(plain))
    assert np.abs(pixels(one) - pixels(plain)).mean() > 1
    merged = load_generator(make_args(tiny_sd1_ckpt, tmp_path / "m", "--prompt", "x", *net, "--network_merge"), CPU)
    m = gen(merged, tiny_sd1_ckpt, tmp_path / "m", "--prompt", "a cat --d 4")[0]
    assert np.abs(pixels(m) - pixels(one)).max() <= 3
    with pytest.raises(GenerationError, match="--am"):
        gen(applied, tiny_sd1_ckpt, tmp_path / "z", "--prompt", "a cat --am 1,1")


def test_img2img_strength_zero_returns_input_and_inpaint_keeps_unmasked(base, tiny_sd1_ckpt, tmp_path):
    # A smooth image the tiny (random) VAE reproduces as well as it reproduces anything.
    roundtrip_src = tmp_path / "src.png"
    y, x = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)).save(roundtrip_src)
    vae_only = base.decode(base.encode_images(
        torch.from_numpy(pixels(roundtrip_src).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]))[0]
    reference = np.asarray(vae_only, dtype=np.int16)
    (same,) = gen(base, tiny_sd1_ckpt, tmp_path / "s", "--image_path", roundtrip_src, "--strength", 0.0, "--prompt",
                  "a cat")
    assert np.array_equal(pixels(same), reference)  # no denoising step: exactly the VAE round trip
    (changed,) = gen(base, tiny_sd1_ckpt, tmp_path / "c", "--image_path", roundtrip_src, "--prompt", "a cat --t 1",
                     "--steps", 3)
    assert np.abs(pixels(changed) - reference).mean() > 1



@pytest.mark.parametrize("sampler,strength", [("euler", 1.0), ("ddim", 0.6), ("euler_a", 0.8)])
def test_inpaint_blending_keeps_unmasked_latents(base, sampler, strength):
    """The kept region (mask 0) ends exactly at the init latents; the masked region is generated."""
    from library.generation.runner import ImageJob

    job = ImageJob(prompt="a cat", negative_prompt="", width=64, height=64, steps=4, scale=7.5, negative_scale=None,
                   seed=1, strength=strength, sampler=sampler)
    torch.manual_seed(0)
    init = base.encode_images(torch.rand(1, 3, 64, 64) * 2 - 1)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1
    latents = base._denoise([job], base._conditioning([job]), [torch.Generator().manual_seed(1)], width=64, height=64,
                            steps=4, init=init, strength=strength, mask=mask)
    assert torch.equal(latents[..., :4], init[..., :4])
    assert (latents[..., 4:] - init[..., 4:]).abs().mean() > 0.05


def test_textual_inversion(tiny_sd1_ckpt, base, tmp_path):
    folder = tmp_path / "emb"
    folder.mkdir()
    torch.manual_seed(0)
    save_file({"emb_params": torch.randn(2, 32) * 2}, folder / "zxqstyle.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(1, 32) * 2}}, folder / "qqvthing.pt")
    args = make_args(tiny_sd1_ckpt, tmp_path, "--prompt", "x", "--textual_inversion_embeddings",
                     folder / "zxqstyle.safetensors", folder / "qqvthing.pt")
    ti = load_generator(args, CPU)
    tok = ti.tokenizer
    assert tok.convert_tokens_to_ids(["zxqstyle", "zxqstyle1", "qqvthing"]) == [49408, 49409, 49410]
    assert ti.embeddings.expand("a (zxqstyle:1.2) cat") == "a (zxqstyle zxqstyle1:1.2) cat"
    with_token = gen(ti, tiny_sd1_ckpt, tmp_path / "a", "--prompt", "a zxqstyle cat --d 1")[0]
    without = gen(ti, tiny_sd1_ckpt, tmp_path / "b", "--prompt", "a cat --d 1")[0]
    base_without = gen(base, tiny_sd1_ckpt, tmp_path / "c", "--prompt", "a cat --d 1")[0]
    assert np.abs(pixels(with_token) - pixels(without)).mean() > 0.5
    assert np.array_equal(pixels(without), pixels(base_without))

    save_file({"emb_params": torch.randn(1, 32)}, folder / "cat.safetensors")
    with pytest.raises(GenerationError, match="already exists"):
        load_generator(make_args(tiny_sd1_ckpt, tmp_path, "--prompt", "x", "--textual_inversion_embeddings",
                                 folder / "cat.safetensors"), CPU)
    save_file({"emb_params": torch.randn(1, 16)}, folder / "narrow.safetensors")
    with pytest.raises(GenerationError, match="width 16"):
        load_generator(make_args(tiny_sd1_ckpt, tmp_path, "--prompt", "x", "--textual_inversion_embeddings",
                                 folder / "narrow.safetensors"), CPU)


def test_sd2_and_diffusers_folder(tiny_sd2_ckpt, tiny_sd1_diffusers, tmp_path):
    for ckpt, extra in ((tiny_sd2_ckpt, ["--v2", "--v_parameterization"]), (tiny_sd1_diffusers, [])):
        args = make_args(ckpt, tmp_path / ckpt.name, "--prompt", "a cat --d 1", "--clip_skip", 2, *extra)
        (path,) = run(args, load_generator(args, CPU))
        assert Image.open(path).size == (64, 64)


def test_hires_fix_latent_upscaling_and_interactive(base, tiny_sd1_ckpt, tmp_path, monkeypatch, caplog):
    (path,) = gen(base, tiny_sd1_ckpt, tmp_path / "h", "--W", 96, "--H", 64, "--highres_fix_scale", 0.5,
                  "--highres_fix_steps", 2, "--highres_fix_latents_upscaling", "--prompt", "a cat --d 2")
    assert Image.open(path).size == (96, 64)
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("a cat --d 1\nbad --zz 1\n\na dog --f dog\n"))
    paths = gen(base, tiny_sd1_ckpt, tmp_path / "i", "--interactive")
    assert len(paths) == 2 and paths[1].name == "dog.png"
    assert "--zz" in caplog.text


def test_xformers_missing_is_explained(tiny_sd1_ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # import fails like a missing package
    with pytest.raises(GenerationError, match="pip install xformers"):
        load_generator(make_args(tiny_sd1_ckpt, tmp_path, "--prompt", "x", "--xformers"), CPU)
