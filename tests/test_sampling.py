"""Tests for library/sampling: prompt files, schedulers, the denoising loop, previews."""

from __future__ import annotations

import json
import logging
import random
import re
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from library.sampling.pipeline import Conditioning, LatentDiffusionSampler, concat_batch, sample_latents
from library.sampling.previews import (
    eval_mode,
    preserved_rng_state,
    sample_image_name,
    should_sample,
    write_sample_images,
)
from library.sampling.prompts import (
    PromptDefaults,
    PromptFileError,
    PromptOption,
    SAMPLE_PROMPT_OPTIONS,
    SamplePrompt,
    load_prompts,
    parse_prompt_line,
)
from library.sampling.schedulers import (
    SAMPLER_NAMES,
    ExactLMSDiscreteScheduler,
    make_scheduler,
    zero_terminal_snr_betas,
)

SD = PromptDefaults(sampler="ddim")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- prompt files ------------------------------------------------------------------------------

def test_txt_every_option_comments_and_defaults(tmp_path):
    path = write(tmp_path, "p.txt", "\n".join([
        "# a comment",
        "",
        "a cat, masterpiece --n ugly, blurry --W 768 --h 523 --d 42 --s 20 --l 5.5 --g 3.5 --ss Euler_A"
        " --cn ctrl.png --ctr 0.25 --rcfg 1.0 --fs 3.0",
        "   ",
        "  # indented comment",
        "a dog",
    ]))
    first, second = load_prompts(path, defaults=SD)
    assert first == SamplePrompt(
        prompt="a cat, masterpiece", negative_prompt="ugly, blurry", width=768, height=520, seed=42, steps=20,
        scale=5.5, sampler="euler_a", guidance_scale=3.5, controlnet_image="ctrl.png", cfg_trunc_ratio=0.25,
        renorm_cfg=1.0, flow_shift=3.0, index=0, source=f"{path}:3",
    )
    assert second == SamplePrompt(prompt="a dog", negative_prompt="", width=512, height=512, seed=None, steps=30,
                                  scale=7.5, sampler="ddim", index=1, source=f"{path}:6")


def test_txt_unknown_option_names_file_line_and_valid_options(tmp_path):
    path = write(tmp_path, "p.txt", "ok\n# c\na cat --x 3\n")
    with pytest.raises(PromptFileError) as e:
        load_prompts(path, defaults=SD)
    msg = str(e.value)
    assert f"{path}:3" in msg and "--x" in msg
    assert all(f"--{flag}" in msg for flag in ("n", "w", "h", "d", "s", "l", "g", "ss", "cn"))


@pytest.mark.parametrize("line, option", [
    ("a --w abc", "--w"), ("a --h 1.5", "--h"), ("a --d -1", "--d"), ("a --s ten", "--s"),
    ("a --l x", "--l"), ("a --g", "--g"), ("a --ss", "--ss"), ("a --d", "--d"),
])
def test_txt_bad_value_names_option_and_line(tmp_path, line, option):
    path = write(tmp_path, "p.txt", f"fine\n{line}\n")
    with pytest.raises(PromptFileError) as e:
        load_prompts(path, defaults=SD)
    assert f"{path}:2" in str(e.value) and option in str(e.value)


def test_sizes_floored_and_steps_clamped(caplog):
    p = parse_prompt_line("x --w 30 --h 100 --s 5000", defaults=SD)
    assert (p.width, p.height, p.steps) == (64, 96, 1000)
    assert "outside 1..1000" in caplog.text
    assert parse_prompt_line("x --s 0").steps == 1


def test_defaults_are_parameters_for_other_families():
    flux = PromptDefaults(width=1024, height=1024, steps=20, scale=1.0, guidance_scale=3.5, size_multiple=16)
    p = parse_prompt_line("x --w 520", defaults=flux)
    assert (p.width, p.height, p.steps, p.scale, p.guidance_scale) == (512, 1024, 20, 1.0, 3.5)


def test_parse_prompt_line_with_extended_option_table():
    options = {**SAMPLE_PROMPT_OPTIONS, "t": PromptOption("t", "strength", float, "img2img strength")}
    p = parse_prompt_line("--t 0.5 --n bad", options=options)  # options only: empty prompt
    assert p.prompt == "" and p.negative_prompt == "bad" and p.extras == {"strength": 0.5}


def test_sampler_names_checked_when_given(tmp_path):
    path = write(tmp_path, "p.txt", "a --ss k_euler\nb --ss eulr\n")
    with pytest.raises(PromptFileError, match=r"p\.txt:2: unknown sampler 'eulr'.*dpmsolver\+\+"):
        load_prompts(path, defaults=SD, samplers=SAMPLER_NAMES)


def test_toml_defaults_and_subset_override(tmp_path):
    path = write(tmp_path, "p.toml", """
[prompt]
negative_prompt = "lowres"
width = 768
sample_steps = 20
scale = 6

[[prompt.subset]]
prompt = "a cat"

[[prompt.subset]]
prompt = "a dog"
width = 640
negative_prompt = "blurry"
seed = 7
sample_sampler = "k_lms"
guidance_scale = 2.0
controlnet_image = "c.png"
height = 330
""")
    cat, dog = load_prompts(path, defaults=SD)
    assert (cat.prompt, cat.negative_prompt, cat.width, cat.height, cat.steps, cat.scale, cat.seed, cat.sampler) == (
        "a cat", "lowres", 768, 512, 20, 6.0, None, "ddim")
    # The subset re-specifies keys of [prompt] (the reference raises on this; we override).
    assert (dog.width, dog.height, dog.negative_prompt, dog.seed, dog.sampler, dog.guidance_scale,
            dog.controlnet_image, dog.index) == (640, 328, "blurry", 7, "k_lms", 2.0, "c.png", 1)


def test_toml_errors(tmp_path):
    path = write(tmp_path, "p.toml",
                 '[prompt]\n[[prompt.subset]]\nprompt = "a"\n[[prompt.subset]]\nprompt = "b"\nwidht = 5\n')
    with pytest.raises(PromptFileError, match=r"subset\]\] #2: unknown key\(s\) 'widht'; valid keys: prompt"):
        load_prompts(path)
    with pytest.raises(PromptFileError, match="no \\[\\[prompt.subset\\]\\] entries"):
        load_prompts(write(tmp_path, "q.toml", '[prompt]\nwidth = 5\n'))
    with pytest.raises(PromptFileError, match="invalid TOML"):
        load_prompts(write(tmp_path, "r.toml", '[prompt\n'))
    with pytest.raises(PromptFileError, match=r"#1: missing 'prompt'"):
        load_prompts(write(tmp_path, "s.toml", '[[prompt.subset]]\nwidth = 512\n'))


def test_json_all_keys_and_errors(tmp_path):
    entries = [
        {"prompt": "a", "negative_prompt": "n", "width": 600, "height": 704.0, "seed": None, "sample_steps": 12,
         "scale": 4, "guidance_scale": 1.5, "sample_sampler": "DPMSolver++", "controlnet_image": "c.png",
         "cfg_trunc_ratio": 0.5, "renorm_cfg": 2, "flow_shift": 1.5},
        {"prompt": "b", "seed": "3"},
    ]
    a, b = load_prompts(write(tmp_path, "p.json", json.dumps(entries)), defaults=SD)
    assert (a.width, a.height, a.seed, a.steps, a.scale, a.sampler, a.guidance_scale, a.flow_shift) == (
        600, 704, None, 12, 4.0, "dpmsolver++", 1.5, 1.5)
    assert (b.seed, b.sampler, b.index) == (3, "ddim", 1)
    with pytest.raises(PromptFileError, match=r"entry #1: bad value 'abc' for 'width'"):
        load_prompts(write(tmp_path, "q.json", '[{"prompt": "a", "width": "abc"}]'))
    with pytest.raises(PromptFileError, match=r"bad value True for 'sample_steps'"):
        load_prompts(write(tmp_path, "q.json", '[{"prompt": "a", "sample_steps": true}]'))
    with pytest.raises(PromptFileError, match=r"r\.json:3: invalid JSON"):
        load_prompts(write(tmp_path, "r.json", '[\n{"prompt": "a"},\n}'))
    with pytest.raises(PromptFileError, match="expected a JSON list"):
        load_prompts(write(tmp_path, "s.json", '{"prompt": "a"}'))


def test_unsupported_suffix_and_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match="use .txt, .toml or .json"):
        load_prompts(tmp_path / "p.yaml")
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "none.txt")


# --- schedulers --------------------------------------------------------------------------------

def toy_model(x, t, cond):
    """Linear in the latents and the conditioning; enough to drive any scheduler."""
    return 0.1 * x + cond


def run_loop(scheduler, *, steps=3, seed=0, guidance=2.0, **kw):
    return sample_latents(toy_model, scheduler, shape=(1, 4, 8, 8), steps=steps, cond=torch.zeros(1, 1, 1, 1),
                          uncond=torch.full((1, 1, 1, 1), 0.1), guidance_scale=guidance,
                          generator=torch.Generator().manual_seed(seed), device="cpu", dtype=torch.float32,
                          progress=False, **kw)


@pytest.mark.parametrize("v_pred", [False, True])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_constructs_and_runs(name, v_pred):
    scheduler = make_scheduler(name, v_parameterization=v_pred)
    cfg = scheduler.config
    assert cfg.prediction_type == ("v_prediction" if v_pred else "epsilon")
    assert (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (
        1000, 0.00085, 0.012, "scaled_linear")
    assert not cfg.get("clip_sample", False)
    out = run_loop(scheduler)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in SAMPLER_NAMES if not n.startswith("k_")])
def test_zero_terminal_snr(name):
    scheduler = make_scheduler(name, v_parameterization=True, zero_terminal_snr=True)
    cfg = scheduler.config
    assert cfg.get("rescale_betas_zero_snr") or cfg.trained_betas is not None
    assert scheduler.alphas_cumprod[-1] <= 1.01 * 2.0**-24  # float32 cumprod rounding
    if "timestep_spacing" in cfg:
        assert cfg.timestep_spacing == "trailing"
    scheduler.set_timesteps(3)
    assert scheduler.timesteps[0] == 999  # sampling starts from the pure-noise timestep
    assert torch.isfinite(run_loop(make_scheduler(name, v_parameterization=True, zero_terminal_snr=True))).all()


def test_zero_terminal_snr_without_v_pred_warns(caplog):
    make_scheduler("euler", v_parameterization=False, zero_terminal_snr=True)
    assert "zero_terminal_snr without v_parameterization" in caplog.text


def test_k_aliases_and_unknown_name():
    for alias in ("k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"):
        assert type(make_scheduler(alias, v_parameterization=False)) is type(
            make_scheduler(alias[2:], v_parameterization=False))
    assert make_scheduler("DPMSolver++", v_parameterization=False).config.algorithm_type == "dpmsolver++"
    with pytest.raises(ValueError, match=r"unknown sampler 'plms'; valid samplers: ddim, pndm, .*k_dpm_2_a"):
        make_scheduler("plms", v_parameterization=False)


def test_zero_snr_betas_keep_first_alpha_and_zero_last():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    rescaled = zero_terminal_snr_betas()
    abar = np.cumprod(1 - rescaled)
    assert abar[-1] == 0 and np.isclose(abar[0], 1 - betas[0]) and np.all((rescaled > 0) & (rescaled <= 1))


def test_exact_lms_coefficients_match_numeric_integral():
    scheduler = make_scheduler("lms", v_parameterization=False)
    assert isinstance(scheduler, ExactLMSDiscreteScheduler)
    scheduler.set_timesteps(10)
    s = scheduler.sigmas.double().numpy()
    t, order = 5, 4
    coeffs = [scheduler.get_lms_coefficient(order, t, j) for j in range(order)]
    assert np.isclose(sum(coeffs), s[t + 1] - s[t])  # Lagrange basis sums to 1
    taus = np.linspace(s[t], s[t + 1], 20001)
    for j, c in enumerate(coeffs):
        basis = np.prod([(taus - s[t - k]) / (s[t - j] - s[t - k]) for k in range(order) if k != j], axis=0)
        assert np.isclose(c, np.trapezoid(basis, taus), rtol=1e-6)


# --- denoising loop ----------------------------------------------------------------------------

class RecordingScheduler:
    """A scheduler stub: x <- x - 0.1 * model_output; records what the loop hands it."""

    order = 1
    init_noise_sigma = 1.0

    def __init__(self):
        self.outputs, self.inputs = [], []

    def set_timesteps(self, n, device=None):
        self.timesteps = torch.arange(n, 0, -1)

    def scale_model_input(self, x, t):
        return x

    def step(self, model_output, t, sample, return_dict=False):
        self.inputs.append(sample.clone())
        self.outputs.append(model_output.clone())
        return (sample - 0.1 * model_output,)


def test_initial_noise_comes_from_cpu_generator():
    scheduler = RecordingScheduler()
    out = sample_latents(toy_model, scheduler, shape=(2, 4, 8, 8), steps=0, cond=torch.zeros(2, 1, 1, 1), uncond=None,
                         guidance_scale=1.0, generator=torch.Generator().manual_seed(5), device="cpu",
                         dtype=torch.float32, progress=False)
    assert torch.equal(out, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("name", ["ddim", "euler_a", "dpm_2_a"])
def test_same_seed_same_latents(name):
    a = run_loop(make_scheduler(name, v_parameterization=False), seed=3)
    b = run_loop(make_scheduler(name, v_parameterization=False), seed=3)
    c = run_loop(make_scheduler(name, v_parameterization=False), seed=4)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_cfg_math(scale):
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        return 0.5 * x + cond

    scheduler = RecordingScheduler()
    cond, uncond = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0)
    sample_latents(model, scheduler, shape=(1, 4, 8, 8), steps=3, cond=cond, uncond=uncond, guidance_scale=scale,
                   generator=torch.Generator().manual_seed(0), device="cpu", dtype=torch.float32, progress=False)
    assert calls == [2, 2, 2]  # uncond and cond in one batched call
    for x, out in zip(scheduler.inputs, scheduler.outputs):
        expected_uncond, expected_cond = 0.5 * x + uncond, 0.5 * x + cond
        assert torch.allclose(out, expected_uncond + scale * (expected_cond - expected_uncond))


def test_guidance_one_skips_uncond():
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        return 0.5 * x + cond

    for uncond in (None, torch.zeros(1, 1, 1, 1)):
        scheduler = RecordingScheduler()
        sample_latents(model, scheduler, shape=(1, 4, 8, 8), steps=2, cond=torch.ones(1, 1, 1, 1), uncond=uncond,
                       guidance_scale=1.0, generator=torch.Generator().manual_seed(0), device="cpu",
                       dtype=torch.float32, progress=False)
        assert torch.allclose(scheduler.outputs[0], 0.5 * scheduler.inputs[0] + 1)
    assert calls == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="needs an unconditional input"):
        sample_latents(model, RecordingScheduler(), shape=(1, 4, 8, 8), steps=1, cond=torch.ones(1, 1, 1, 1),
                       uncond=None, guidance_scale=5.0, generator=torch.Generator(), device="cpu", dtype=torch.float32)


def test_conditioning_trees_batch():
    def cond(value):
        extra = {"text_embeds": torch.full((1, 4), value), "time_ids": torch.full((1, 6), value)}
        return Conditioning(torch.full((1, 3, 8), value), {"added_cond_kwargs": extra})

    a, b = cond(0.0), cond(1.0)
    both = concat_batch(a, b)
    assert both.batch_size == 2 and both.unet_kwargs["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    assert torch.equal(both.select(1).hidden_states, b.hidden_states)
    assert both.to("cpu", torch.float16).unet_kwargs["added_cond_kwargs"]["text_embeds"].dtype == torch.float16
    with pytest.raises(ValueError, match="different keys"):
        concat_batch({"x": torch.zeros(1)}, {"y": torch.zeros(1)})


def test_img2img_strength():
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def eps_zero(x, t, cond):
        return torch.zeros_like(x)

    def run(name, strength, steps=20):
        return sample_latents(eps_zero, make_scheduler(name, v_parameterization=False), shape=(1, 4, 8, 8),
                              steps=steps, cond=torch.zeros(1), uncond=None, guidance_scale=1.0,
                              generator=torch.Generator().manual_seed(0), device="cpu", dtype=torch.float32,
                              init_latents=init, strength=strength, progress=False)

    assert torch.equal(run("ddim", 0.0), init)
    near = run("ddim", 0.05)  # one step at the lowest-noise timestep
    assert (near - init).abs().mean() < 0.05
    assert (run("ddim", 1.0) - init).abs().mean() > 0.3
    for name in ("euler", "heun", "dpmsolver++"):
        out = run(name, 0.5)
        assert torch.isfinite(out).all() and (out - init).abs().mean() < (run(name, 1.0) - init).abs().mean()


# --- previews: triggers, names, RNG, modes -----------------------------------------------------

@pytest.mark.parametrize("step, epoch, steps_n, epochs_n, at_first, epoch_end, expected", [
    (0, 0, 10, None, False, False, False),
    (0, 0, None, None, True, False, True),
    (10, 1, 10, None, False, False, True),
    (15, 1, 10, None, False, False, False),
    (10, 1, 10, 2, False, False, False),  # epochs win over steps
    (20, 2, 10, 2, False, True, True),
    (20, 1, 10, 2, False, True, False),
    (20, 1, 10, None, False, True, False),  # only step-based: nothing at epoch end
    (0, 0, None, 1, False, True, False),
])
def test_should_sample(step, epoch, steps_n, epochs_n, at_first, epoch_end, expected):
    assert should_sample(step, epoch, every_n_steps=steps_n, every_n_epochs=epochs_n, at_first=at_first,
                         is_epoch_end=epoch_end) is expected


def test_sample_image_name_forms():
    assert sample_image_name("lora", step=150, epoch=None, index=3, seed=9, timestamp="20260101120000") == (
        "lora_000150_03_20260101120000_9.png")
    assert sample_image_name("lora", step=150, epoch=3, index=0, seed=9, timestamp="20260101120000") == (
        "lora_e000003_00_20260101120000_9.png")
    assert sample_image_name(None, step=7, epoch=None, index=0, seed=1, timestamp="t") == "000007_00_t_1.png"


def rng_draws():
    return torch.rand(3).tolist(), random.random(), np.random.rand()


def noisy_generate(prompt, generator):
    """Consumes every global RNG, like a model with dropout or a sampler using global noise."""
    torch.rand(100), random.random(), np.random.rand(10)
    value = int(torch.rand(1, generator=generator).item() * 255)
    return Image.new("RGB", (prompt.width, prompt.height), (value, 0, 0))


def seed_all(seed):
    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)


def test_sampling_does_not_change_training_randomness(tmp_path):
    seed_all(123)
    rng_draws()
    expected = rng_draws()
    seed_all(123)
    rng_draws()
    prompts = [SamplePrompt("a", width=64, height=64, seed=5), SamplePrompt("b", width=64, height=64, index=1)]
    write_sample_images(prompts, noisy_generate, output_dir=tmp_path, output_name="x", step=1)
    assert rng_draws() == expected

    def failing(prompt, generator):
        torch.rand(5)
        raise RuntimeError("out of memory")

    seed_all(123)
    rng_draws()
    with pytest.raises(RuntimeError):
        write_sample_images(prompts, failing, output_dir=tmp_path / "f", output_name="x", step=1)
    assert rng_draws() == expected
    assert not list((tmp_path / "f").rglob("*.png"))


def test_preserved_rng_state_restores_on_exit():
    seed_all(1)
    before = rng_draws()
    seed_all(1)
    with preserved_rng_state("cpu"):
        seed_all(99)
        rng_draws()
    assert rng_draws() == before


def test_eval_mode_restores_each_submodule():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a frozen part kept in eval by the trainer
    with eval_mode(model, None):
        assert not model.training and not model[0].training
    assert model.training and model[0].training and not model[1].training


def test_prompts_split_across_processes(tmp_path):
    prompts = [SamplePrompt(str(i), width=64, height=64, seed=i, index=i) for i in range(5)]
    written = write_sample_images(prompts, noisy_generate, output_dir=tmp_path, output_name="x", step=2,
                                  process_index=1, num_processes=2)
    assert [w.prompt.index for w in written] == [1, 3]


# --- end to end on a tiny SD-style model -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(  # four blocks: 8x downscale like SD, so 64x64 images have 8x8 latents
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
    )

    def encode_prompts(texts):
        # Deterministic stand-in for a text encoder: 5 tokens x 16 dims per prompt.
        return torch.stack([torch.randn(5, 16, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                            for t in texts])

    return unet, vae, encode_prompts


def test_end_to_end_previews(tmp_path, tiny_sd, caplog):
    unet, vae, encode_prompts = tiny_sd
    sampler = LatentDiffusionSampler(unet, vae, encode_prompts)
    assert sampler.vae_scale_factor == 8
    prompt_file = write(tmp_path, "prompts.txt",
                        "a red cube --n blurry --d 7 --s 2 --l 4\na blue ball --s 2 --l 1 --ss euler_a\n")
    prompts = load_prompts(prompt_file, defaults=PromptDefaults(width=64, height=64, sampler="ddim"))

    modes = []
    unet.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    unet.train()

    def generate(prompt, generator):
        return sampler.generate(prompt, sampler_name="ddim", v_parameterization=False, generator=generator,
                                device="cpu", dtype=torch.float32, progress=False)

    caplog.set_level(logging.INFO, logger="library.sampling")
    written = write_sample_images(prompts, generate, output_dir=tmp_path / "out", output_name="tiny", step=0,
                                  epoch=3, eval_context=eval_mode(unet, vae))
    assert modes and not any(modes) and unet.training  # eval during sampling, train mode restored
    assert len(modes) == 2 + 2  # 2 steps per prompt; CFG batched into one call

    paths = sorted((tmp_path / "out" / "sample").iterdir())
    assert [w.path for w in written] == paths
    assert re.fullmatch(r"tiny_e000003_00_\d{14}_7\.png", paths[0].name)
    assert re.fullmatch(r"tiny_e000003_01_\d{14}_\d+\.png", paths[1].name)
    first, second = Image.open(paths[0]), Image.open(paths[1])
    assert first.size == (64, 64) and first.mode == "RGB"
    assert first.text == {"prompt": "a red cube", "negative-prompt": "blurry", "seed": "7", "steps": "2",
                          "scale": "4.0", "sampler": "ddim", "width": "64", "height": "64"}
    assert second.text["sampler"] == "euler_a" and second.text["seed"] == paths[1].name.split("_")[-1][:-4]
    assert sum("->" in r.getMessage() for r in caplog.records if r.name == "library.sampling.previews") == 2

    again = write_sample_images(prompts[:1], generate, output_dir=tmp_path / "again", output_name="tiny", step=5)
    assert re.fullmatch(r"tiny_000005_00_\d{14}_7\.png", again[0].path.name)
    assert np.array_equal(np.asarray(Image.open(again[0].path)), np.asarray(first))  # same seed, same image


def test_extra_unet_kwargs_reach_the_unet(tiny_sd):
    _, vae, _ = tiny_sd
    seen = {}

    class FakeUNet(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states, added_cond_kwargs, return_dict):
            seen.update(hidden=encoder_hidden_states, **added_cond_kwargs)
            return (torch.zeros_like(x),)

    def encode(texts):  # SDXL-like: hidden states plus pooled embeddings
        n = len(texts)
        return torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, 2, 3), {
            "added_cond_kwargs": {"text_embeds": torch.arange(n, dtype=torch.float32).view(n, 1)}}

    sampler = LatentDiffusionSampler(FakeUNet(), vae, encode)
    image = sampler.generate(SamplePrompt("p", negative_prompt="n", width=64, height=64, steps=1, scale=5.0),
                             sampler_name="euler", v_parameterization=True, generator=torch.Generator().manual_seed(0),
                             device="cpu", dtype=torch.float32, progress=False)
    assert image.size == (64, 64)
    # Batch is [uncond (negative, row 0), cond (prompt, row 1)] for every conditioning tensor.
    assert seen["hidden"][:, 0, 0].tolist() == [0.0, 1.0] and seen["text_embeds"].view(-1).tolist() == [0.0, 1.0]
