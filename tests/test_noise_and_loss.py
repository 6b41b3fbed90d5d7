"""Noise, timestep, loss and weighted-caption options: each checked against a small computation
written here (not the library helper), plus two tiny end-to-end runs that combine them."""

from __future__ import annotations

import argparse
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from library.args import ArgumentError, setup_network_parser
from library.families.ddpm import DDPMObjective
from library.training.loss import LossConfig, training_loss
from library.training.noise import NoiseConfig, apply_noise_offset, pyramid_noise
from library.training.validation import _check_noise_and_loss_flags
from library.training.weighted_captions import apply_token_weights, parse_weighted_caption

T = torch.tensor([10, 500, 999])


def hand_abar() -> np.ndarray:
    """SD's scaled-linear schedule, float64, from its definition."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return np.cumprod(1 - betas)


def per_sample_loss(config: LossConfig, timesteps: torch.Tensor, *, v_pred: bool = False) -> torch.Tensor:
    """The loss of each sample alone, with an l2 base loss of exactly 1 (pred = target + 1)."""
    abar = DDPMObjective(v_pred).alphas_cumprod(torch.device("cpu"))
    out = []
    for t in timesteps:
        target = torch.zeros(1, 4, 2, 2)
        out.append(training_loss(target + 1, target, t.view(1), config, loss_weights=torch.ones(1),
                                 alphas_cumprod=abar))
    return torch.stack(out)


# ------------------------------------------------------------------------------- SNR weightings
def test_min_snr_gamma_eps_and_v():
    abar = hand_abar()[T.numpy()]
    snr = abar / (1 - abar)
    eps = np.minimum(snr, 5.0) / snr
    v = np.minimum(snr, 5.0) / (snr + 1)
    assert eps[0] == pytest.approx(5 / snr[0]) and eps[2] == 1.0  # low noise capped, high noise untouched
    got_eps = per_sample_loss(LossConfig(min_snr_gamma=5.0), T)
    got_v = per_sample_loss(LossConfig(min_snr_gamma=5.0, v_parameterization=True), T, v_pred=True)
    np.testing.assert_allclose(got_eps.numpy(), eps, rtol=1e-4)
    np.testing.assert_allclose(got_v.numpy(), v, rtol=1e-4)


def test_scale_v_pred_like_noise_pred_v_pred_like_and_debiased():
    abar = hand_abar()[T.numpy()]
    s = np.minimum(abar / (1 - abar), 1000.0)
    np.testing.assert_allclose(per_sample_loss(LossConfig(scale_v_pred_loss_like_noise_pred=True,
                                                          v_parameterization=True), T, v_pred=True).numpy(),
                               s / (s + 1), rtol=1e-4)
    np.testing.assert_allclose(per_sample_loss(LossConfig(v_pred_like_loss=0.2), T).numpy(),
                               1 + 0.2 * (s + 1) / s, rtol=1e-4)
    np.testing.assert_allclose(per_sample_loss(LossConfig(debiased_estimation_loss=True), T).numpy(),
                               1 / np.sqrt(s), rtol=1e-4)
    np.testing.assert_allclose(per_sample_loss(LossConfig(debiased_estimation_loss=True, v_parameterization=True),
                                               T, v_pred=True).numpy(), 1 / (s + 1), rtol=1e-4)


def test_prior_loss_weights_multiply_each_sample():
    pred, target = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    loss = training_loss(pred, target, torch.tensor([1, 2]), LossConfig(), loss_weights=torch.tensor([1.0, 0.5]))
    assert loss.item() == pytest.approx((1 + 0.5) / 2)


# ---------------------------------------------------------------------------------- loss types
@pytest.mark.parametrize("loss_type", ["l1", "l2", "huber", "smooth_l1"])
def test_loss_types_closed_form(loss_type):
    d = torch.tensor([-2.0, -0.05, 0.0, 0.3, 1.5]).view(5, 1, 1, 1)
    c = 0.1
    closed = {"l1": lambda x: abs(x), "l2": lambda x: x * x,
              "huber": lambda x: 2 * c * (math.sqrt(x * x + c * c) - c),
              "smooth_l1": lambda x: 2 * (math.sqrt(x * x + c * c) - c)}[loss_type]
    config = LossConfig(loss_type=loss_type, huber_schedule="constant", huber_c=c)
    for value in d.flatten().tolist():
        got = training_loss(torch.tensor(value).view(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([0]),
                            config, loss_weights=torch.ones(1))
        assert got.item() == pytest.approx(closed(value), rel=1e-5, abs=1e-7)


def test_huber_schedules():
    d, c, scale = 0.7, 0.1, 2.0
    abar = hand_abar()

    def expected_c(schedule, t):
        if schedule == "constant":
            return c * scale
        if schedule == "exponential":
            return c ** (t / 1000) * scale  # exp(-(-ln c / 1000) t)
        sigma = math.sqrt((1 - abar[t]) / abar[t])
        return ((1 - c) / (1 + sigma) ** 2 + c) * scale

    for schedule in ("constant", "exponential", "snr"):
        config = LossConfig(loss_type="huber", huber_schedule=schedule, huber_c=c, huber_scale=scale)
        objective = DDPMObjective(False)
        for t in (0, 500, 999):
            got = training_loss(torch.full((1, 1, 1, 1), d), torch.zeros(1, 1, 1, 1), torch.tensor([t]), config,
                                loss_weights=torch.ones(1), alphas_cumprod=objective.alphas_cumprod(torch.device("cpu")))
            ct = expected_c(schedule, t)
            assert got.item() == pytest.approx(2 * ct * (math.sqrt(d * d + ct * ct) - ct), rel=1e-5), (schedule, t)


# --------------------------------------------------------------------------------- masked loss
def test_masked_loss_ignores_masked_out_pixels_and_resizes_by_area():
    target = torch.zeros(1, 4, 8, 8)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # left half trained
    pred = target.clone()
    pred[..., 4:] = 5.0  # errors only in the masked-out right half
    assert training_loss(pred, target, torch.tensor([0]), LossConfig(), loss_weights=torch.ones(1),
                         masks=mask).item() == 0.0
    pred = torch.ones_like(target)
    # masked-out pixels add 0 and the mean still divides by all pixels: half the unmasked loss
    assert training_loss(pred, target, torch.tensor([0]), LossConfig(), loss_weights=torch.ones(1),
                         masks=mask).item() == pytest.approx(0.5)
    grey = torch.full((1, 64, 64), 0.25)
    assert training_loss(pred, target, torch.tensor([0]), LossConfig(), loss_weights=torch.ones(1),
                         masks=grey).item() == pytest.approx(0.25)


# --------------------------------------------------------------------------------------- noise
def test_noise_offset_is_one_value_per_channel_with_the_given_std():
    latents = torch.zeros(4000, 4, 3, 3)
    gen = torch.Generator().manual_seed(1)
    out = apply_noise_offset(latents, torch.zeros_like(latents), 0.1, generator=gen)
    assert torch.equal(out, out[..., :1, :1].expand_as(out))  # constant over h, w
    expected = 0.1 * torch.randn((4000, 4, 1, 1), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out[..., :1, :1], expected)
    assert out[..., 0, 0].std().item() == pytest.approx(0.1, rel=0.05)
    rand = apply_noise_offset(latents, torch.zeros_like(latents), 0.1, random_strength=True,
                              generator=torch.Generator().manual_seed(2))
    # u ~ U(0,1) times N(0,1): std = 0.1 * sqrt(E[u^2]) = 0.1 / sqrt(3)
    assert rand[..., 0, 0].std().item() == pytest.approx(0.1 / math.sqrt(3), rel=0.05)


def test_adaptive_noise_scale_adds_abs_channel_mean():
    latents = torch.zeros(2, 4, 2, 2)
    latents[0, 1] = -3.0
    latents[1, 2] = 2.0
    out = apply_noise_offset(latents, torch.zeros_like(latents), 0.1, adaptive_scale=0.5,
                             generator=torch.Generator().manual_seed(3))
    n = torch.randn((2, 4, 1, 1), generator=torch.Generator().manual_seed(3))
    strength = torch.full((2, 4, 1, 1), 0.1)
    strength[0, 1] += 1.5
    strength[1, 2] += 1.0
    torch.testing.assert_close(out, (strength * n).expand(2, 4, 2, 2))
    negative = apply_noise_offset(latents, torch.zeros_like(latents), 0.1, adaptive_scale=-1.0,
                                  generator=torch.Generator().manual_seed(3))
    assert negative[0, 1].abs().max() == 0 and negative[1, 2].abs().max() == 0  # clamped at 0


def test_multires_noise_levels_and_discount():
    base = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    out = pyramid_noise(base, 2, 0.3, generator=torch.Generator().manual_seed(5), rng=random.Random(7))
    rng, gen = random.Random(7), torch.Generator().manual_seed(5)
    expected = base.clone()
    for i in (1, 2):
        r = 2 + 2 * rng.random()
        size = int(32 / r**i)
        level = torch.randn(2, 4, size, size, generator=gen)
        expected += torch.nn.functional.interpolate(level, size=(32, 32), mode="bilinear") * 0.3**i
    torch.testing.assert_close(out, expected / expected.std())
    assert out.std().item() == pytest.approx(1.0, abs=1e-5)


def test_ip_noise_gamma_perturbs_input_not_target():
    objective = DDPMObjective(False, noise=NoiseConfig(ip_noise_gamma=0.1))
    latents, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([100, 800])
    torch.manual_seed(11)
    noisy, target = objective.noisy_latents_and_target(latents, noise, t)
    torch.manual_seed(11)
    xi = torch.randn(2, 4, 4, 4)
    abar = torch.tensor(hand_abar()[[100, 800]], dtype=torch.float32).view(2, 1, 1, 1)
    assert torch.equal(target, noise)
    torch.testing.assert_close(noisy, abar.sqrt() * latents + (1 - abar).sqrt() * (noise + 0.1 * xi))
    plain, _ = DDPMObjective(False).noisy_latents_and_target(latents, noise, t)
    assert not torch.allclose(plain, noisy)
    v_obj = DDPMObjective(True, noise=NoiseConfig(ip_noise_gamma=0.1))
    _, v_target = v_obj.noisy_latents_and_target(latents, noise, t)
    torch.testing.assert_close(v_target, abar.sqrt() * noise - (1 - abar).sqrt() * latents)


def test_zero_terminal_snr_schedule():
    plain = DDPMObjective(True).alphas_cumprod(torch.device("cpu"))
    zt = DDPMObjective(True, noise=NoiseConfig(zero_terminal_snr=True)).alphas_cumprod(torch.device("cpu"))
    assert zt[-1].item() == 0.0 and plain[-1].item() > 0
    assert zt[0].item() == pytest.approx(plain[0].item(), rel=1e-6)
    assert bool((zt[1:] <= zt[:-1]).all())
    # min-SNR on an eps model stays finite at SNR 0: weight min(g/snr, 1) = 1
    loss = training_loss(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([999]),
                         LossConfig(min_snr_gamma=5.0), loss_weights=torch.ones(1), alphas_cumprod=zt)
    assert loss.item() == 1.0


def test_timestep_bounds():
    torch.manual_seed(0)
    t = DDPMObjective(False, noise=NoiseConfig(min_timestep=200, max_timestep=210)).sample_timesteps(
        2000, torch.device("cpu"))
    assert t.min().item() == 200 and t.max().item() == 209
    const = DDPMObjective(False, noise=NoiseConfig(min_timestep=500, max_timestep=500)).sample_timesteps(
        5, torch.device("cpu"))
    assert const.tolist() == [500] * 5
    full = DDPMObjective(False).sample_timesteps(5000, torch.device("cpu"))
    assert full.min().item() >= 0 and full.max().item() == 999


# --------------------------------------------------------------------------- weighted captions
def test_weighted_caption_parsing():
    got = parse_weighted_caption(r"(a:1.3), [b], ((c)), \(d\)")
    expected = [("a", 1.3), (", ", 1.0), ("b", 1 / 1.1), (", ", 1.0), ("c", 1.1 * 1.1), (", (d)", 1.0)]
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, w), (_, e) in zip(got, expected):
        assert w == pytest.approx(e)
    assert parse_weighted_caption("plain") == [("plain", 1.0)]
    assert parse_weighted_caption("") == [("", 1.0)]
    unclosed = parse_weighted_caption("x (y")
    assert unclosed[0] == ("x ", 1.0) and unclosed[1][1] == pytest.approx(1.1)
    assert parse_weighted_caption("a) b") == [("a) b", 1.0)]  # a stray closer is text
    nested = parse_weighted_caption("((e:2))")
    assert nested[0][0] == "e" and nested[0][1] == pytest.approx(2.2)


def test_token_weights_keep_the_mean():
    hidden = torch.rand(2, 5, 3) + 0.5
    weights = torch.tensor([[1, 1.3, 1, 1, 1], [1, 1, 0.8, 1, 1]])
    out = apply_token_weights(hidden, weights)
    for b in range(2):
        scaled = hidden[b] * weights[b][:, None]
        torch.testing.assert_close(out[b], scaled * hidden[b].mean() / scaled.mean())
        assert out[b].mean().item() == pytest.approx(hidden[b].mean().item(), rel=1e-5)


@pytest.mark.parametrize("v2", [False, True])
def test_tokenize_weighted_strips_syntax_and_places_weights(v2):
    from library.families.sd import text
    from library.families.sd.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(v2=v2)
    ids, weights = text.tokenize_weighted(tok, ["a (red:1.5) cat", "plain dog"], max_token_length=150)
    assert torch.equal(ids, text.tokenize(tok, ["a red cat", "plain dog"], max_token_length=150))
    long = "word, " * 100  # past one chunk: same chunking (and truncation) as the plain tokenizer
    assert torch.equal(text.tokenize_weighted(tok, [f"[{long}]", ""], max_token_length=150)[0],
                       text.tokenize(tok, [long, ""], max_token_length=150))
    assert weights.shape == (2, 152)
    assert weights[0, :4].tolist() == pytest.approx([1.0, 1.0, 1.5, 1.0])  # BOS, a, red, cat
    assert bool((weights[1] == 1).all())


# ---------------------------------------------------------------------------------- validation
def parse(*argv: str) -> argparse.Namespace:
    return setup_network_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv, message", [
    (["--scale_v_pred_loss_like_noise_pred"], "--scale_v_pred_loss_like_noise_pred needs --v_parameterization"),
    (["--v_pred_like_loss", "0.1", "--v_parameterization"], "--v_pred_like_loss cannot be used with --v_parameterization"),
    (["--adaptive_noise_scale", "0.01"], "--adaptive_noise_scale needs --noise_offset"),
    (["--min_timestep", "600", "--max_timestep", "500"], "--min_timestep 600 is above --max_timestep 500"),
    (["--max_timestep", "1001"], "--max_timestep 1001 must be in [1, 1000]"),
    (["--min_snr_gamma", "0"], "--min_snr_gamma 0.0 must be above 0"),
    (["--loss_type", "huber", "--huber_c", "0"], "--huber_c 0.0 must be in (0, 1]"),
    (["--conditioning_data_dir", "."], "--conditioning_data_dir .: mask images are only used with --masked_loss"),
    (["--masked_loss", "--conditioning_data_dir", "no/such/masks"],
     "--conditioning_data_dir no/such/masks: no such folder"),
    (["--masked_loss"], "--masked_loss needs masks: add --conditioning_data_dir DIR"),
])
def test_bad_combinations_are_rejected(argv, message):
    with pytest.raises(ArgumentError) as err:
        _check_noise_and_loss_flags(parse(*argv))
    assert message in str(err.value)


@pytest.mark.parametrize("argv", [
    ["--masked_loss", "--conditioning_data_dir", "."],
    ["--masked_loss", "--alpha_mask"],
    ["--masked_loss", "--dataset_config", "masks.toml"],  # the config's subsets are checked when it is read
    ["--masked_loss", "--dataset_config", "masks.toml", "--conditioning_data_dir", "ignored"],
])
def test_mask_sources_are_accepted(argv):
    _check_noise_and_loss_flags(parse(*argv))


def test_flag_defaults_and_config_from_args():
    args = parse()
    assert (args.loss_type, args.huber_schedule, args.huber_c, args.huber_scale, args.multires_noise_discount) == \
        ("l2", "snr", 0.1, 1.0, 0.3)
    assert LossConfig.from_args(args) == LossConfig()
    assert NoiseConfig.from_args(args) == NoiseConfig()
    args = parse("--noise_offset", "0.1", "--min_timestep", "5", "--min_snr_gamma", "5", "--v_parameterization")
    assert NoiseConfig.from_args(args).noise_offset == 0.1 and NoiseConfig.from_args(args).min_timestep == 5
    config = LossConfig.from_args(args)
    assert config.min_snr_gamma == 5 and config.v_parameterization
    _check_noise_and_loss_flags(args)


# ------------------------------------------------------------------------------ end to end runs
def read_metadata(path) -> dict[str, str]:
    """The ``ss_*`` metadata of a saved network, after checking that every weight is finite."""
    with safe_open(str(path), "pt") as f:
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys()), "NaN/inf in the trained weights"
        return f.metadata()


@pytest.mark.slow
def test_run_with_noise_options_huber_min_snr_and_weighted_captions(tmp_path, tiny_sd1_ckpt):
    from library.demo.shapes import write_shapes_folder
    from tests.train_helpers import base_train_args, run_script

    images = tmp_path / "train" / "2_shape"
    write_shapes_folder(images, 2, seed=1)
    for caption in images.glob("*.txt"):
        caption.write_text("(" + caption.read_text().replace(" on ", ":1.3) on [") + "]")
    out = tmp_path / "out"
    run_script("train_network.py", base_train_args(
        tiny_sd1_ckpt, out, train_data_dir=tmp_path / "train", caption_extension=".txt", max_train_steps=3,
        noise_offset=0.05, noise_offset_random_strength=True, adaptive_noise_scale=0.01,
        multires_noise_iterations=3, multires_noise_discount=0.25, ip_noise_gamma=0.1,
        ip_noise_gamma_random_strength=True, min_timestep=100, max_timestep=900, loss_type="huber",
        huber_schedule="snr", huber_c=0.2, min_snr_gamma=5, debiased_estimation_loss=True, v_pred_like_loss=0.1,
        weighted_captions=True))
    md = read_metadata(out / "lora.safetensors")
    assert md["ss_noise_offset"] == "0.05" and md["ss_noise_offset_random_strength"] == "True"
    assert md["ss_adaptive_noise_scale"] == "0.01"
    assert md["ss_multires_noise_iterations"] == "3" and md["ss_multires_noise_discount"] == "0.25"
    assert md["ss_ip_noise_gamma"] == "0.1" and md["ss_ip_noise_gamma_random_strength"] == "True"
    assert md["ss_loss_type"] == "huber" and md["ss_huber_schedule"] == "snr" and md["ss_huber_c"] == "0.2"
    assert md["ss_min_snr_gamma"] == "5.0" and md["ss_debiased_estimation"] == "True"
    assert md["ss_zero_terminal_snr"] == "False"


@pytest.mark.slow
def test_run_v_pred_zero_terminal_snr_and_alpha_masked_loss(tmp_path, tiny_sd1_ckpt):
    from library.demo.shapes import write_shapes_folder
    from tests.train_helpers import base_train_args, run_script

    images = tmp_path / "train" / "1_shape"
    for path in write_shapes_folder(images, 2, seed=4):
        rgba = Image.open(path).convert("RGBA")
        alpha = np.zeros((64, 64), dtype=np.uint8)
        alpha[:, :32] = 255  # left half trained
        rgba.putalpha(Image.fromarray(alpha))
        rgba.save(path)
    out = tmp_path / "out"
    run_script("train_network.py", base_train_args(
        tiny_sd1_ckpt, out, train_data_dir=tmp_path / "train", caption_extension=".txt", max_train_steps=3,
        v_parameterization=True, zero_terminal_snr=True, scale_v_pred_loss_like_noise_pred=True,
        loss_type="smooth_l1", huber_schedule="exponential", min_timestep=999, max_timestep=999,
        masked_loss=True, alpha_mask=True, cache_latents=True))
    md = read_metadata(out / "lora.safetensors")
    assert md["ss_zero_terminal_snr"] == "True" and md["ss_loss_type"] == "smooth_l1"
    assert md["ss_huber_schedule"] == "exponential" and md["ss_base_model_version"] == "sd_v1_v"
    assert md["ss_noise_offset"] == "None" and md["ss_debiased_estimation"] == "False"
