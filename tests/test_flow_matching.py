"""The rectified-flow objective (``library/training/flow_matching.py``) and the flow Euler sampler
(``library/sampling/flow.py``), each checked against an independent computation written here."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from library.sampling.flow import flow_shift, flux_mu, flux_schedule, flux_time_shift, sample_flow, sd3_schedule
from library.training import flow_matching as fm
from library.training.flow_matching import (FlowConfig, FlowMatchingObjective, abar_equivalent, loss_weighting,
                                            sd3_sigmas)

CPU = torch.device("cpu")
B = 6


def objective(**kw) -> FlowMatchingObjective:
    return FlowMatchingObjective(FlowConfig(**kw))


def draw(seed: int, fn):
    torch.manual_seed(seed)
    return fn()


# --------------------------------------------------------------------------------------- config
def test_config_defaults_and_from_args():
    c = FlowConfig.from_args(argparse.Namespace())
    assert c == FlowConfig()
    assert (c.timestep_sampling, c.sigmoid_scale, c.discrete_flow_shift, c.model_prediction_type) == \
        ("sigma", 1.0, 3.0, "sigma_scaled")
    assert (c.weighting_scheme, c.logit_mean, c.logit_std, c.mode_scale) == ("uniform", 0.0, 1.0, 1.29)
    assert c.ip_noise_gamma is None and c.ip_noise_gamma_random_strength is False
    c = FlowConfig.from_args(argparse.Namespace(timestep_sampling="shift", discrete_flow_shift=3.1582,
                                                weighting_scheme=None, ip_noise_gamma=0.1, unrelated=1))
    assert (c.timestep_sampling, c.discrete_flow_shift, c.weighting_scheme, c.ip_noise_gamma) == \
        ("shift", 3.1582, "uniform", 0.1)


@pytest.mark.parametrize("kw, flag", [
    (dict(timestep_sampling="logit"), "--timestep_sampling"),
    (dict(model_prediction_type="eps"), "--model_prediction_type"),
    (dict(weighting_scheme="snr"), "--weighting_scheme"),
    (dict(sigmoid_scale=0.0), "--sigmoid_scale"),
    (dict(discrete_flow_shift=-1.0), "--discrete_flow_shift"),
    (dict(logit_std=0.0), "--logit_std"),
    (dict(ip_noise_gamma=-0.1), "--ip_noise_gamma"),
])
def test_config_rejects_bad_values_naming_the_flag(kw, flag):
    with pytest.raises(ValueError, match=flag):
        FlowConfig(**kw)
    with pytest.raises(ValueError, match=flag):
        FlowConfig.from_args(argparse.Namespace(**kw))


# ------------------------------------------------------------------------------ timestep sampling
def test_uniform_exact_and_statistics():
    obj = objective(timestep_sampling="uniform")
    sig, t = draw(1, lambda: obj.sample_sigmas(B, CPU, image_seq_len=1024))
    torch.testing.assert_close(sig, draw(1, lambda: torch.rand(B)), rtol=0, atol=0)
    torch.testing.assert_close(t, sig * 1000, rtol=0, atol=0)
    assert sig.dtype == t.dtype == torch.float32 and sig.shape == (B,)
    big, _ = draw(2, lambda: obj.sample_sigmas(20000, CPU))
    assert 0 <= big.min() and big.max() < 1
    assert big.mean().item() == pytest.approx(0.5, abs=0.01)
    assert big.var().item() == pytest.approx(1 / 12, abs=0.003)


def test_sigmoid_exact_and_statistics():
    obj = objective(timestep_sampling="sigmoid", sigmoid_scale=2.0)
    sig, t = draw(3, lambda: obj.sample_sigmas(B, CPU, image_seq_len=1024))
    n = draw(3, lambda: torch.randn(B))
    torch.testing.assert_close(sig, 1 / (1 + torch.exp(-2.0 * n)))
    torch.testing.assert_close(t, sig * 1000)
    big, _ = draw(4, lambda: obj.sample_sigmas(20000, CPU))
    logit = torch.log(big / (1 - big))
    assert logit.mean().item() == pytest.approx(0.0, abs=0.05)
    assert logit.std().item() == pytest.approx(2.0, rel=0.03)


def test_shift_exact_and_known_point():
    assert flow_shift(0.5, 3.0) == pytest.approx(0.75)
    assert flow_shift(0.0, 3.0) == 0.0 and flow_shift(1.0, 3.0) == pytest.approx(1.0)
    assert flow_shift(0.3, 1.0) == pytest.approx(0.3)
    obj = objective(timestep_sampling="shift", discrete_flow_shift=3.0)
    sig, _ = draw(5, lambda: obj.sample_sigmas(B, CPU, image_seq_len=1024))
    s = 1 / (1 + torch.exp(-draw(5, lambda: torch.randn(B))))
    torch.testing.assert_close(sig, 3 * s / (1 + 2 * s))


def test_flux_shift_mu_and_exact():
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(2176) == pytest.approx((0.5 + 1.15) / 2)
    # at sigma = 1/2 the shift is sigmoid(mu); the endpoints are fixed
    assert flux_time_shift(0.8, 0.5) == pytest.approx(1 / (1 + math.exp(-0.8)))
    assert flux_time_shift(0.8, 0.0) == 0.0 and flux_time_shift(0.8, 1.0) == pytest.approx(1.0)
    assert flux_time_shift(0.8, torch.tensor([0.0])).item() == 0.0
    seq = 1024  # 512x512 px
    obj = objective(timestep_sampling="flux_shift", sigmoid_scale=1.5)
    sig, t = draw(6, lambda: obj.sample_sigmas(B, CPU, image_seq_len=seq))
    s = 1 / (1 + torch.exp(-1.5 * draw(6, lambda: torch.randn(B))))
    mu = 0.5 + (1.15 - 0.5) * (seq - 256) / (4096 - 256)
    torch.testing.assert_close(sig, math.exp(mu) / (math.exp(mu) + (1 / s - 1)))
    torch.testing.assert_close(t, sig * 1000)
    with pytest.raises(ValueError, match="flux_shift"):
        obj.sample_sigmas(B, CPU)


def hand_table(shift: float) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler's training sigmas from their definition, float64."""
    j = np.arange(1000, 0, -1) / 1000
    return shift * j / (1 + (shift - 1) * j)


def test_sigma_table_matches_scheduler_definition_and_is_cached():
    obj = objective(discrete_flow_shift=3.0)
    timesteps, sigmas = obj.table(CPU)
    np.testing.assert_allclose(sigmas.numpy(), hand_table(3.0), rtol=1e-6)
    torch.testing.assert_close(timesteps, sigmas * 1000)
    again = obj.table("cpu")
    assert again[0] is timesteps and again[1] is sigmas  # no per-step copy


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode", "cosmap"])
def test_sigma_mode_indexes_the_diffusers_table(scheme):
    from diffusers import FlowMatchEulerDiscreteScheduler

    obj = objective(weighting_scheme=scheme, logit_mean=0.3, logit_std=1.2, mode_scale=1.29,
                    discrete_flow_shift=2.0)
    sig, t = draw(7, lambda: obj.sample_sigmas(256, CPU, image_seq_len=1024))

    torch.manual_seed(7)
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.randn(256) * 1.2 + 0.3)
    elif scheme == "mode":
        r = torch.rand(256)
        u = 1 - r - 1.29 * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    else:
        u = torch.rand(256)
    idx = (u * 1000).long()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=2.0)
    torch.testing.assert_close(sig, sched.sigmas[idx].float(), rtol=0, atol=0)
    torch.testing.assert_close(t, sched.timesteps[idx].float(), rtol=0, atol=0)
    assert 0 < sig.min() and sig.max() <= 1


def test_sigma_mode_logit_normal_statistics():
    obj = objective(weighting_scheme="logit_normal", logit_mean=-0.5, logit_std=0.8, discrete_flow_shift=1.0)
    sig, _ = draw(8, lambda: obj.sample_sigmas(20000, CPU))
    # shift 1: the table is j/1000, so index i gives sigma 1 - i/1000 = 1 - floor(1000 u)/1000 ~ 1 - u
    logit = torch.log((1 - sig).clamp(1e-4) / sig.clamp(max=1 - 1e-4))
    assert logit.mean().item() == pytest.approx(-0.5, abs=0.05)
    assert logit.std().item() == pytest.approx(0.8, rel=0.05)


def test_sigma_mode_clamps_indices(monkeypatch):
    monkeypatch.setattr(fm, "timestep_density", lambda *a, **k: torch.tensor([0.0, 1.0, -0.2, 1.3, 0.9995]))
    obj = objective(discrete_flow_shift=3.0)
    sig, _ = obj.sample_sigmas(5, CPU)
    table = obj.table(CPU)[1]
    torch.testing.assert_close(sig, table[torch.tensor([0, 999, 0, 999, 999])])


def test_fixed_validation_timesteps():
    t = torch.tensor([200, 400, 600, 800])
    sig = FlowMatchingObjective.sigmas_from_timesteps(t)
    assert sig.dtype == torch.float32
    torch.testing.assert_close(sig, torch.tensor([0.2, 0.4, 0.6, 0.8]))


# --------------------------------------------------------------------------- noising and targets
def test_noisy_and_target():
    x0, eps = torch.randn(B, 4, 3, 3), torch.randn(B, 4, 3, 3)
    sig = torch.linspace(0.05, 0.95, B)
    noisy, target = objective().noisy_and_target(x0, eps, sig)
    s = sig.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * x0 + s * eps)
    torch.testing.assert_close(target, eps - x0)


@pytest.mark.parametrize("random_strength", [False, True])
def test_ip_noise_gamma_in_the_input_only(random_strength):
    x0, eps = torch.randn(B, 4, 3, 3), torch.randn(B, 4, 3, 3)
    sig = torch.linspace(0.05, 0.95, B)
    obj = objective(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=random_strength)
    noisy, target = draw(9, lambda: obj.noisy_and_target(x0, eps, sig))

    torch.manual_seed(9)
    g = 0.1 * torch.rand(B, 1, 1, 1) if random_strength else 0.1
    xi = torch.randn(B, 4, 3, 3)
    s = sig.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * x0 + s * (eps + g * xi))
    torch.testing.assert_close(target, eps - x0)
    # validation: no perturbation, no draw
    state = torch.get_rng_state()
    clean, _ = obj.noisy_and_target(x0, eps, sig, perturb=False)
    assert torch.equal(state, torch.get_rng_state())
    torch.testing.assert_close(clean, (1 - s) * x0 + s * eps)


def test_training_step_draw_order():
    obj = objective(timestep_sampling="sigmoid", ip_noise_gamma=0.2)
    x0 = torch.randn(B, 2, 2, 2)

    def step():
        noise = obj.sample_noise(x0)
        sig, _ = obj.sample_sigmas(B, CPU)
        noisy, _ = obj.noisy_and_target(x0, noise, sig)
        return noisy

    torch.manual_seed(10)
    eps, n, xi = torch.randn(B, 2, 2, 2), torch.randn(B), torch.randn(B, 2, 2, 2)
    s = torch.sigmoid(n).view(-1, 1, 1, 1)
    torch.testing.assert_close(draw(10, step), (1 - s) * x0 + s * (eps + 0.2 * xi))


# ------------------------------------------------------------------------------ preconditioning
def preconditioning_case():
    x0, eps = torch.randn(B, 4, 3, 3, dtype=torch.float64), torch.randn(B, 4, 3, 3, dtype=torch.float64)
    sig = torch.linspace(0.05, 1.0, B, dtype=torch.float64)
    return x0, eps, sig


def test_precondition_raw_and_additive():
    x0, eps, sig = preconditioning_case()
    out = torch.randn_like(x0)
    for kind, expected in (("raw", lambda noisy: out), ("additive", lambda noisy: out + noisy)):
        obj = objective(model_prediction_type=kind, weighting_scheme="sigma_sqrt")
        noisy, target = obj.noisy_and_target(x0, eps, sig)
        pred, tgt, w = obj.precondition(out, noisy, sig, x0, eps)
        torch.testing.assert_close(pred, expected(noisy))
        torch.testing.assert_close(tgt, target)
        assert w is None  # the reference weights only sigma_scaled


def test_precondition_sigma_scaled_is_the_x0_estimate():
    x0, eps, sig = preconditioning_case()
    obj = objective(model_prediction_type="sigma_scaled")
    noisy, _ = obj.noisy_and_target(x0, eps, sig)
    pred, target, w = obj.precondition(eps - x0, noisy, sig, x0, eps)  # the true velocity
    torch.testing.assert_close(pred, x0, rtol=0, atol=1e-12)
    assert target is x0 and w is None
    out = torch.randn_like(x0)
    pred, _, _ = obj.precondition(out, noisy, sig, x0, eps)
    torch.testing.assert_close(pred, noisy - sig.view(-1, 1, 1, 1) * out)


def test_loss_weighting_values():
    sig = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(loss_weighting("sigma_sqrt", sig), torch.tensor([100.0, 4.0, 1 / 0.81]))
    cosmap = 2 / (math.pi * (1 - 2 * sig + 2 * sig**2))
    torch.testing.assert_close(loss_weighting("cosmap", sig), cosmap)
    assert loss_weighting("cosmap", torch.tensor([0.5])).item() == pytest.approx(4 / math.pi)
    for scheme in ("uniform", "none", "logit_normal", "mode"):
        assert loss_weighting(scheme, sig) is None
    # sigma = 0 (uniform sampling, SD3 t = 0): finite, so 0 loss * weight stays 0, not NaN
    w0 = loss_weighting("sigma_sqrt", torch.tensor([0.0]))
    assert torch.isfinite(w0).all() and (w0 * 0.0).item() == 0.0
    obj = objective(weighting_scheme="cosmap")
    x0, eps, s = preconditioning_case()
    _, _, w = obj.precondition(torch.zeros_like(x0), x0, s, x0, eps)
    torch.testing.assert_close(w, (2 / (math.pi * (1 - 2 * s + 2 * s**2))).float())


def test_abar_equivalent():
    sig = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    abar = abar_equivalent(sig)
    assert abar[0] == 1.0 and abar[-1] == 0.0 and abar[2] == 0.5
    inner = sig[1:-1]
    torch.testing.assert_close((abar / (1 - abar))[1:-1], ((1 - inner) / inner) ** 2)
    torch.testing.assert_close(FlowMatchingObjective.abar_equivalent(sig), abar)


# -------------------------------------------------------------------------------------------- SD3
def test_sd3_sigmas_exact_and_bounds():
    kw = dict(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, training_shift=3.0)
    sig, t = draw(11, lambda: sd3_sigmas(500, CPU, min_timestep=200, max_timestep=300, **kw))
    torch.manual_seed(11)
    u = torch.sigmoid(torch.randn(500))
    u = 3 * u / (1 + 2 * u)
    torch.testing.assert_close(t, (u * 100 + 200).long().float(), rtol=0, atol=0)
    torch.testing.assert_close(sig, t / 1000)
    assert t.min() >= 200 and t.max() <= 300 and torch.equal(t, t.round())
    sig, t = draw(12, lambda: sd3_sigmas(8, CPU, min_timestep=500, max_timestep=500, **kw))
    assert torch.equal(t, torch.full((8,), 500.0))
    sig, t = draw(13, lambda: sd3_sigmas(4000, CPU, min_timestep=None, max_timestep=None,
                                         **{**kw, "weighting_scheme": "mode", "mode_scale": 3.0}))
    assert t.min() >= 0 and t.max() <= 1000 and sig.max() <= 1.0


@pytest.mark.parametrize("kw, flag", [
    (dict(min_timestep=600, max_timestep=500), "--min_timestep"),
    (dict(max_timestep=1001), "--max_timestep"),
    (dict(training_shift=0.0), "--training_shift"),
    (dict(weighting_scheme="x"), "--weighting_scheme"),
])
def test_sd3_sigmas_rejects_bad_values(kw, flag):
    base = dict(weighting_scheme="uniform", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, training_shift=1.0)
    with pytest.raises(ValueError, match=flag):
        sd3_sigmas(2, CPU, **{**base, **kw})


# --------------------------------------------------------------------------------------- schedules
def test_flux_schedule_endpoints_and_monotonic():
    plain = flux_schedule(20, 4096, shift=False)
    shifted = flux_schedule(20, 4096, shift=True)
    for sched in (plain, shifted):
        assert len(sched) == 21 and sched[0] == 1.0 and sched[-1] == 0.0
        assert all(a > b for a, b in zip(sched, sched[1:]))
    np.testing.assert_allclose(plain, np.linspace(1, 0, 21))
    # mu > 0 moves every interior step towards noise
    assert all(s > p for s, p in zip(shifted[1:-1], plain[1:-1]))
    assert shifted[10] == pytest.approx(1 / (1 + math.exp(-1.15)))
    with pytest.raises(ValueError):
        flux_schedule(0, 256, shift=True)


def test_sd3_schedule():
    sched = sd3_schedule(4, shift=3.0)
    np.testing.assert_allclose(sched, [3 * t / (1 + 2 * t) for t in (1, 0.75, 0.5, 0.25, 0)])
    assert sched[0] == 1.0 and sched[-1] == 0.0


# ----------------------------------------------------------------------------------------- sampler
def test_sample_flow_recovers_a_point_mass_exactly():
    torch.manual_seed(14)
    x0, eps = torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5)
    seen = []

    def velocity(x, sigma):
        seen.append(sigma)
        assert isinstance(sigma, float)
        return (x - x0) / sigma  # = eps - x0 on the straight path from eps to x0

    out = sample_flow(velocity, eps, flux_schedule(7, 1024, shift=True), progress=False)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    assert len(seen) == 7 and seen[0] == 1.0 and 0.0 not in seen
    # a velocity given as eps - x0 directly gives the same result
    out2 = sample_flow(lambda x, s: eps - x0, eps, sd3_schedule(5), progress=False)
    torch.testing.assert_close(out2, x0, rtol=0, atol=1e-5)
    assert out.dtype == torch.float32


def test_sample_flow_cfg_combination():
    torch.manual_seed(15)
    x_cond, x_uncond, eps = torch.randn(3, 1, 4, 4).unbind(0)
    scale = 2.5

    def guided(x, sigma):
        return (x - x_cond) / sigma, (x - x_uncond) / sigma

    out = sample_flow(guided, eps, flux_schedule(6, 256, shift=False), cfg_scale=scale, progress=False)
    # v_u + w (v_c - v_u) is the point-mass field of x_u + w (x_c - x_u)
    torch.testing.assert_close(out, x_uncond + scale * (x_cond - x_uncond), rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="v_cond, v_uncond"):
        sample_flow(lambda x, s: x, eps, [1.0, 0.0], cfg_scale=2.0, progress=False)
    with pytest.raises(TypeError, match="cfg_scale=1"):
        sample_flow(guided, eps, [1.0, 0.0], progress=False)
    with pytest.raises(ValueError, match="two sigmas"):
        sample_flow(guided, eps, [1.0], progress=False)
