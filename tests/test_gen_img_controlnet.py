"""gen_img.py with ControlNet (SD 1.x and SDXL ControlNets) and ControlNet-LLLite (SDXL) on the tiny models.

Control models here are untrained but not neutral (their zero layers are filled with random values),
so they visibly change the image; what is checked is how the flags apply them: output changes with
control, multiplier 0 and ratio 0 give exactly the image without control, a partial ratio lies in
between, guide images are used in order, and the canny preprocessing matches OpenCV.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from library.demo.shapes import shape_image
from library.generation.cli import setup_parser, validate_args
from library.generation.control import ControlNetUnit, Controls
from library.generation.control_images import ControlInputError, canny_edges, guide_tensor, parse_prep
from library.generation.runner import GenerationError, load_generator, run
from tests.train_helpers import run_script

CPU = torch.device("cpu")


def make_args(ckpt, outdir, *extra, sdxl=False):
    parser = setup_parser()
    args = parser.parse_args(["--ckpt", str(ckpt), "--outdir", str(outdir), "--W", "64", "--H", "64", "--steps", "4",
                              "--sampler", "euler", "--seed", "3", "--console_log_simple", "--prompt", "a shape",
                              *(["--sdxl"] if sdxl else []), *map(str, extra)])
    validate_args(parser, args)
    return args


def generate(ckpt, outdir, *extra, sdxl=False) -> list[np.ndarray]:
    args = make_args(ckpt, outdir, *extra, sdxl=sdxl)
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in run(args, load_generator(args, CPU))]


def differ(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.fixture(scope="module")
def guides(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("guides")
    paths = []
    for i, picture in enumerate([("square", "red", "blue"), ("circle", "yellow", "black")]):
        paths.append(folder / f"guide{i}.png")
        shape_image(*picture).save(paths[-1])
    return paths


def random_controlnet(unet, path: Path, seed: int) -> Path:
    """A ControlNet from ``unet`` whose zero convolutions are random, written as a .safetensors file."""
    from library.controlnet.loading import controlnet_from_unet
    from library.controlnet.saving import save_controlnet

    controlnet = controlnet_from_unet(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
            elif name.startswith("controlnet_cond_embedding.conv_out"):  # the guide image's way in: strong
                param.copy_(torch.randn(param.shape, generator=g) * 2.0)
    save_controlnet(controlnet, path)
    return path


@pytest.fixture(scope="module")
def sd_controlnet(tiny_sd1_ckpt, tmp_path_factory) -> Path:
    from library.families.sd.loading import load_sd_models

    return random_controlnet(load_sd_models(tiny_sd1_ckpt, v2=False).unet,
                             tmp_path_factory.mktemp("cn") / "sd_cn.safetensors", 1)


@pytest.fixture(scope="module")
def sdxl_models(tiny_sdxl_ckpt):
    from library.families.sdxl.loading import load_sdxl_models

    return load_sdxl_models(tiny_sdxl_ckpt)


@pytest.fixture(scope="module")
def sdxl_controlnet(sdxl_models, tmp_path_factory) -> Path:
    return random_controlnet(sdxl_models.unet, tmp_path_factory.mktemp("cnxl") / "sdxl_cn.safetensors", 2)


@pytest.fixture(scope="module")
def lllite_file(sdxl_models, tmp_path_factory) -> Path:
    from networks.control_net_lllite import create_network

    network = create_network(sdxl_models.unet, cond_emb_dim=8, mlp_dim=8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in network.unet_modules:
            module.up[0].weight.copy_(torch.randn(module.up[0].weight.shape, generator=g))
    path = tmp_path_factory.mktemp("lllite") / "lllite.safetensors"
    network.save_weights(path, metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/control-net-lllite"})
    return path


# --- ControlNet v1.x (SD 1.x) ------------------------------------------------------------------

def test_sd_controlnet_multiplier_and_ratio(tiny_sd1_ckpt, sd_controlnet, guides, tmp_path):
    plain = generate(tiny_sd1_ckpt, tmp_path / "plain")[0]
    control = ["--control_net_models", sd_controlnet, "--guide_image_path", guides[0]]
    full = generate(tiny_sd1_ckpt, tmp_path / "full", *control)[0]
    assert differ(full, plain) > 2.0
    off = generate(tiny_sd1_ckpt, tmp_path / "m0", *control, "--control_net_multipliers", 0)[0]
    assert np.array_equal(off, plain)
    never = generate(tiny_sd1_ckpt, tmp_path / "r0", *control, "--control_net_ratios", 0)[0]
    assert np.array_equal(never, plain)
    half = generate(tiny_sd1_ckpt, tmp_path / "r05", *control, "--control_net_ratios", 0.5)[0]
    assert differ(half, plain) > 0.5 and differ(half, full) > 0.5
    weaker = generate(tiny_sd1_ckpt, tmp_path / "m05", *control, "--control_net_multipliers", 0.5)[0]
    assert 0 < differ(weaker, plain) < differ(full, plain)


def test_sd_controlnet_canny_prep_guides_in_order_and_guidance_paths(tiny_sd1_ckpt, sd_controlnet, guides, tmp_path):
    control = ["--control_net_models", sd_controlnet]
    # guide 1 (a yellow circle on black) has edges; the ControlNet sees them instead of the picture
    raw = generate(tiny_sd1_ckpt, tmp_path / "raw", *control, "--guide_image_path", guides[1])[0]
    canny = generate(tiny_sd1_ckpt, tmp_path / "canny", *control, "--guide_image_path", guides[1],
                     "--control_net_preps", "canny_63_191")[0]
    assert differ(raw, canny) > 0.05
    # image k of the run gets guide k (cycling): the second image of a two-guide run is the one-guide run of guide 1
    both = generate(tiny_sd1_ckpt, tmp_path / "both", *control, "--guide_image_path", *guides, "--prompt",
                    "a shape --d 5,6", "--images_per_prompt", 2)
    second = generate(tiny_sd1_ckpt, tmp_path / "second", *control, "--guide_image_path", guides[1], "--prompt",
                      "a shape --d 6")[0]
    assert np.array_equal(both[1], second) and differ(both[0], both[1]) > 0
    # a folder of guide images is the same list; batches, --negative_scale and hires fix run with control
    batched = generate(tiny_sd1_ckpt, tmp_path / "batched", *control, "--guide_image_path", guides[0].parent,
                       "--prompt", "a shape --d 5,6", "--images_per_prompt", 2, "--batch_size", 2)
    assert differ(batched[0], both[0]) < 1.0 and differ(batched[1], both[1]) < 1.0
    negative = generate(tiny_sd1_ckpt, tmp_path / "neg", *control, "--guide_image_path", guides[0],
                        "--negative_scale", 3, "--prompt", "a shape --n blurry")[0]
    assert differ(negative, raw) > 0.5
    hires = generate(tiny_sd1_ckpt, tmp_path / "hires", *control, "--guide_image_path", guides[0],
                     "--highres_fix_scale", 0.5, "--highres_fix_steps", 2)[0]
    assert hires.shape == (64, 64, 3)


# --- hires fix: --highres_fix_disable_control_net ---------------------------------------------------

def control_per_pass(generator, ckpt, outdir, *extra, sdxl=False) -> tuple[np.ndarray, dict[int, list[bool]]]:
    """The image, and per pass (latent width: 4 = the 32-px first pass, 8 = the 64-px second) whether
    each U-Net call had control: ControlNet residuals in its arguments, or LLLite modules holding a
    control embedding."""
    seen: dict[int, list[bool]] = {}

    def hook(module, args, kwargs):
        controlled = "down_block_additional_residuals" in kwargs or any(
            m.cond_emb is not None for unit in generator.controls.lllites for m in unit.network.unet_modules)
        seen.setdefault(args[0].shape[-1], []).append(controlled)

    handle = generator.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        (path,) = run(make_args(ckpt, outdir, "--highres_fix_scale", 0.5, "--highres_fix_steps", 2, *extra, sdxl=sdxl),
                      generator)
    finally:
        handle.remove()
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16), seen


@pytest.mark.parametrize("kind", ["controlnet", "lllite"])
def test_highres_fix_disable_control_net_leaves_the_second_pass_uncontrolled(kind, tiny_sd1_ckpt, tiny_sdxl_ckpt,
                                                                              sd_controlnet, lllite_file, guides,
                                                                              tmp_path):
    sdxl = kind == "lllite"
    ckpt = tiny_sdxl_ckpt if sdxl else tiny_sd1_ckpt
    flag = "--control_net_lllite_models" if sdxl else "--control_net_models"
    control = [flag, lllite_file if sdxl else sd_controlnet, "--guide_image_path", guides[0]]
    controlled = load_generator(make_args(ckpt, tmp_path, *control, sdxl=sdxl), CPU)
    both, both_calls = control_per_pass(controlled, ckpt, tmp_path / "both", *control, sdxl=sdxl)
    first, first_calls = control_per_pass(controlled, ckpt, tmp_path / "first", *control,
                                          "--highres_fix_disable_control_net", sdxl=sdxl)
    # first pass: --highres_fix_steps 2 calls; second: int(--steps 4 x --strength 0.8) = 3 calls (euler)
    assert both_calls == {4: [True, True], 8: [True, True, True]}
    assert first_calls == {4: [True, True], 8: [False, False, False]}
    plain, plain_calls = control_per_pass(load_generator(make_args(ckpt, tmp_path, sdxl=sdxl), CPU), ckpt,
                                          tmp_path / "plain", sdxl=sdxl)
    assert plain_calls == {4: [False, False], 8: [False, False, False]}
    # control only in pass 1: neither the fully controlled image nor the uncontrolled one
    assert differ(first, both) > 0.5 and differ(first, plain) > 0.5
    # the next image's first pass is controlled again (the flag switches nothing off for good)
    _, again = control_per_pass(controlled, ckpt, tmp_path / "again", *control, sdxl=sdxl)
    assert again == both_calls


# --- SDXL ControlNet and ControlNet-LLLite -----------------------------------------------------------

def test_sdxl_controlnet_changes_the_image_and_multiplier_zero_does_not(tiny_sdxl_ckpt, sdxl_controlnet, guides,
                                                                       tmp_path):
    plain = generate(tiny_sdxl_ckpt, tmp_path / "plain", sdxl=True)[0]
    control = ["--control_net_models", sdxl_controlnet, "--guide_image_path", guides[0]]
    assert differ(generate(tiny_sdxl_ckpt, tmp_path / "cn", *control, sdxl=True)[0], plain) > 2.0
    off = generate(tiny_sdxl_ckpt, tmp_path / "m0", *control, "--control_net_multipliers", 0, sdxl=True)[0]
    assert np.array_equal(off, plain)


def test_lllite_multiplier_ratio_and_guides(tiny_sdxl_ckpt, lllite_file, guides, tmp_path):
    plain = generate(tiny_sdxl_ckpt, tmp_path / "plain", sdxl=True)[0]
    control = ["--control_net_lllite_models", lllite_file]
    full = generate(tiny_sdxl_ckpt, tmp_path / "full", *control, "--guide_image_path", guides[0], sdxl=True)[0]
    assert differ(full, plain) > 2.0
    other = generate(tiny_sdxl_ckpt, tmp_path / "other", *control, "--guide_image_path", guides[1], sdxl=True)[0]
    assert differ(full, other) > 1.0  # the image follows the guide, not just the network
    for flag in ("--control_net_multipliers", "--control_net_ratios"):
        off = generate(tiny_sdxl_ckpt, tmp_path / flag[2:], *control, "--guide_image_path", guides[0], flag, 0,
                       sdxl=True)[0]
        assert np.array_equal(off, plain), flag
    half = generate(tiny_sdxl_ckpt, tmp_path / "half", *control, "--guide_image_path", guides[0],
                    "--control_net_ratios", 0.5, sdxl=True)[0]
    assert differ(half, plain) > 0.5 and differ(half, full) > 0.05  # the first steps decide most of the picture
    cfg = generate(tiny_sdxl_ckpt, tmp_path / "cfg", *control, "--guide_image_path", guides[0], "--scale", 1,
                   sdxl=True)[0]
    assert cfg.std() > 0


def test_lllite_size_not_a_multiple_of_32_is_a_clear_error(tiny_sdxl_ckpt, lllite_file, guides, tmp_path):
    args = make_args(tiny_sdxl_ckpt, tmp_path, "--control_net_lllite_models", lllite_file, "--guide_image_path",
                     guides[0], "--W", 72, sdxl=True)
    with pytest.raises(GenerationError, match="72x64 must have sides that are multiples of 16"):  # tiny: 2 levels
        run(args, load_generator(args, CPU))


# --- preprocessing, ratio rule, errors ------------------------------------------------------------

def test_canny_prep_is_opencv_canny_as_rgb(guides):
    image = Image.open(guides[1]).convert("RGB")  # a yellow circle on black: clear edges
    gray = np.asarray(image.convert("L"))
    for spec, (low, high) in (("canny", (63, 191)), ("canny_100", (100, 191)), ("canny_10_50", (10, 50))):
        edges = np.asarray(parse_prep(spec)(image))
        assert edges.shape == (64, 64, 3)
        expected = cv2.Canny(gray, low, high)
        assert all(np.array_equal(edges[..., c], expected) for c in range(3)), spec
        assert set(np.unique(edges)) <= {0, 255} and edges.max() == 255
    assert parse_prep("none") is None and parse_prep(None) is None
    assert np.array_equal(np.asarray(canny_edges(image)), np.asarray(parse_prep("canny")(image)))
    for bad in ("sobel", "canny_a_b", "canny_200_100", "canny_1_2_3"):
        with pytest.raises(ControlInputError, match="control_net_preps"):
            parse_prep(bad)
    # guide tensors: resized to the pass size, then preprocessed, RGB in [0, 1]
    hint = guide_tensor([image], 32, 48, parse_prep("canny"))
    assert hint.shape == (1, 3, 48, 32) and set(torch.unique(hint).tolist()) <= {0.0, 1.0}


def test_ratio_is_the_fraction_of_steps_from_the_first(guides):
    unit = ControlNetUnit(model=None, ratio=0.5)
    never = ControlNetUnit(model=None, ratio=0.0)
    off = ControlNetUnit(model=None, multiplier=0.0)
    controls = Controls(controlnets=[unit, never, off], guides=[Image.open(guides[0])])
    active = []
    for step in range(10):
        controls.on_step(step, 10)
        active.append((unit.active, never.active, off.active))
    assert [a[0] for a in active] == [True] * 5 + [False] * 5
    assert not any(a[1] or a[2] for a in active)


def test_flag_errors(tiny_sdxl_ckpt, tiny_sd1_ckpt, lllite_file, sd_controlnet, guides, tmp_path):
    base = ["--ckpt", tiny_sdxl_ckpt, "--prompt", "a"]
    cases = [
        (["--sdxl", "--control_net_models", sd_controlnet, "--control_net_lllite_models", lllite_file,
          "--guide_image_path", guides[0]], "cannot be used together"),
        (["--control_net_lllite_models", lllite_file, "--guide_image_path", guides[0]], "add --sdxl"),
        (["--sdxl", "--control_net_lllite_models", lllite_file], "--guide_image_path"),
        (["--sdxl", "--control_net_lllite_models", lllite_file, "--guide_image_path", tmp_path / "nope.png"],
         "no such file"),
        (["--sdxl", "--control_net_lllite_models", lllite_file, "--guide_image_path", guides[0],
          "--control_net_multipliers", 1, 1], "only 1 control model"),
        (["--sdxl", "--control_net_lllite_models", lllite_file, "--guide_image_path", guides[0],
          "--control_net_ratios", 1.5], "between 0 and 1"),
    ]
    for extra, message in cases:
        bad = run_script("gen_img.py", [*base, *extra], expect_ok=False)
        assert bad.returncode == 2 and message in bad.stderr, (extra, bad.stderr[-500:])
    # files of the wrong kind: one-line errors naming the flag
    with pytest.raises(GenerationError, match="--control_net_lllite_models .*not a ControlNet-LLLite file"):
        load_generator(make_args(tiny_sdxl_ckpt, tmp_path, "--control_net_lllite_models", sd_controlnet,
                                 "--guide_image_path", guides[0], sdxl=True), CPU)
    with pytest.raises(GenerationError, match="--control_net_models .*ControlNet-LLLite file"):
        load_generator(make_args(tiny_sd1_ckpt, tmp_path, "--control_net_models", lllite_file, "--guide_image_path",
                                 guides[0]), CPU)
    with pytest.raises(GenerationError, match="control_net_preps"):
        load_generator(make_args(tiny_sd1_ckpt, tmp_path, "--control_net_models", sd_controlnet, "--guide_image_path",
                                 guides[0], "--control_net_preps", "sobel"), CPU)
