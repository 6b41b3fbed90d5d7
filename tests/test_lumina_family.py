"""LuminaFamily's conventions: Lumina time and the sign of the output, the noise-level samplings
(nextdit_shift included), the text conditioning (system prompt, Gemma's penultimate layer, padding)
and the text-encoder cache tensors and settings."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from library.demo.tiny_lumina import build_tiny_gemma2, write_tiny_gemma_tokenizer
from library.families.base import FamilyModels
from library.families.lumina import text as lumina_text
from library.families.lumina.args import setup_lumina_network_parser
from library.families.lumina.family import LuminaFamily
from library.families.lumina.tokenizer import load_gemma_tokenizer
from library.sampling.flow import flow_shift, flux_mu, flux_time_shift
from library.training.flow_matching import FlowMatchingObjective

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_gemma_tokenizer(None, write_tiny_gemma_tokenizer(tmp_path_factory.mktemp("tok")).parent)


@pytest.fixture(scope="module")
def gemma2(tokenizer):
    return build_tiny_gemma2(len(tokenizer), seed=1)


def _args(*extra: str):
    return setup_lumina_network_parser().parse_args(
        ["--pretrained_model_name_or_path", "dit.safetensors", "--gemma2", "g", "--ae", "a", *extra])


class PerfectDiT(nn.Module):
    """Outputs exactly ``x0 - noise`` for known clean latents ``x0``, reading the noise back from its
    input as Lumina's convention says: ``x = t x0 + (1 - t) noise`` with t = 0 pure noise."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x0 = x0
        self.seen_t: list[torch.Tensor] = []

    def forward(self, x, t, cap_feats, cap_mask):
        self.seen_t.append(t)
        s = (1 - t).view(-1, 1, 1, 1)
        noise = (x - (1 - s) * self.x0) / s
        return self.x0 - noise


@pytest.mark.parametrize("prediction_type", ["raw", "sigma_scaled", "additive"])
def test_the_exact_lumina_output_gives_zero_loss(prediction_type):
    family = LuminaFamily()
    args = _args("--model_prediction_type", prediction_type)
    x0 = torch.randn(3, 16, 4, 4)
    models = FamilyModels(denoiser=PerfectDiT(x0), vae=nn.Identity(), text_encoders=[], tokenizers=[],
                          extra={"objective": FlowMatchingObjective(family._flow_config(args))})
    cond = lumina_text.LuminaTextConditioning(torch.randn(3, 8, 64), torch.ones(3, 8, dtype=torch.bool),
                                              torch.zeros(3, 8, dtype=torch.long))
    torch.manual_seed(0)
    prediction = family.predict(models, x0, cond, {}, args)
    sigmas = prediction.timesteps / 1000
    torch.testing.assert_close(models.denoiser.seen_t[0], 1 - sigmas)  # Lumina time runs the other way
    if prediction_type == "additive":  # output + x_t is not the velocity: only the raw/sigma_scaled readings are exact
        assert (prediction.pred - prediction.target).abs().max() > 1e-2
    else:
        torch.testing.assert_close(prediction.pred, prediction.target, atol=1e-4, rtol=1e-4)
    # validation: given timesteps and noise are used as they are (sigma = t / 1000)
    fixed = family.predict(models, x0, cond, {}, args, timesteps=torch.tensor([200, 400, 800]),
                           noise=torch.randn(3, 16, 4, 4))
    torch.testing.assert_close(models.denoiser.seen_t[-1], torch.tensor([0.8, 0.6, 0.2]))
    assert fixed.timesteps.tolist() == pytest.approx([200.0, 400.0, 800.0])


def test_default_shift_sampling_favours_noise_as_the_flag_means_everywhere():
    family = LuminaFamily()
    args = _args()
    assert (args.timestep_sampling, args.discrete_flow_shift, args.model_prediction_type) == ("shift", 6.0, "raw")
    objective = FlowMatchingObjective(family._flow_config(args))
    torch.manual_seed(3)
    sigmas, timesteps = objective.sample_sigmas(4096, "cpu", image_seq_len=64)
    torch.manual_seed(3)
    expected = flow_shift(torch.sigmoid(torch.randn(4096)), 6.0)
    torch.testing.assert_close(sigmas, expected)
    assert sigmas.median() == pytest.approx(6 * 0.5 / (1 + 5 * 0.5), abs=0.02)  # 0.857: mostly noisy
    torch.testing.assert_close(timesteps, sigmas * 1000)


@pytest.mark.parametrize("seq_len", [16, 4096])
def test_nextdit_shift_is_the_resolution_dependent_time_shift_of_a_uniform_draw(seq_len):
    objective = FlowMatchingObjective(LuminaFamily()._flow_config(_args("--timestep_sampling", "nextdit_shift")))
    torch.manual_seed(5)
    sigmas, _ = objective.sample_sigmas(1000, "cpu", image_seq_len=seq_len)
    torch.manual_seed(5)
    expected = flux_time_shift(flux_mu(seq_len), torch.rand(1000))
    torch.testing.assert_close(sigmas, expected)
    if seq_len == 4096:  # mu 1.15 at 1024 px: the draw moves towards noise
        assert sigmas.mean() > 0.6
    with pytest.raises(ValueError, match="nextdit_shift needs the image token count"):
        objective.sample_sigmas(2, "cpu")


def test_flux_only_sampling_is_not_a_lumina_choice():
    with pytest.raises(SystemExit):
        _args("--timestep_sampling", "flux_shift")


# -- text ----------------------------------------------------------------------------------------------


def test_tokenize_pads_to_a_multiple_of_8_with_the_system_prompt_first(tokenizer):
    ids = lumina_text.tokenize(tokenizer, ["a red circle", ""], max_length=30, system_prompt="You draw shapes.")
    assert ids["input_ids"].shape == ids["attention_mask"].shape == (2, 32)
    assert ids["input_ids"][:, 0].tolist() == [2, 2]  # <bos>
    text = tokenizer.decode(ids["input_ids"][0][ids["attention_mask"][0].bool()], skip_special_tokens=True)
    assert text == "You draw shapes. <Prompt Start> a red circle"
    assert lumina_text.with_system_prompt("x", "") == "x"
    plain = lumina_text.tokenize(tokenizer, ["a red circle"], max_length=30)
    assert plain["attention_mask"].sum() < ids["attention_mask"][0].sum()
    assert pickle.loads(pickle.dumps(tokenizer)) is not None  # the tokenize function runs in DataLoader workers


def test_encode_takes_gemmas_penultimate_layer_and_ignores_padding(tokenizer, gemma2):
    short = lumina_text.tokenize(tokenizer, ["two green stars"], max_length=16)
    long = lumina_text.tokenize(tokenizer, ["two green stars"], max_length=40)
    with torch.no_grad():
        cond = lumina_text.encode(gemma2, short)
        cond_long = lumina_text.encode(gemma2, long)
        states = gemma2(input_ids=short["input_ids"], attention_mask=short["attention_mask"],
                        output_hidden_states=True).hidden_states
    assert len(states) == 4  # embeddings + 3 layers (the last one normed)
    torch.testing.assert_close(cond.hidden, states[2])
    assert not torch.allclose(cond.hidden, states[3])
    n = int(short["attention_mask"].sum())
    assert cond.mask.dtype == torch.bool and int(cond.mask.sum()) == n
    torch.testing.assert_close(cond_long.hidden[:, :n], cond.hidden[:, :n], atol=1e-5, rtol=1e-5)


def test_cache_tensors_have_the_reference_keys_and_kohya_files_read_back(tokenizer, gemma2):
    family = LuminaFamily()
    with torch.no_grad():
        cond = lumina_text.encode(gemma2, lumina_text.tokenize(tokenizer, ["a", "b c"], max_length=8))
    cached = family.text_encoder_outputs_to_cache(cond)
    assert set(cached) == {"hidden_state", "attention_mask", "input_ids"}
    assert cached["hidden_state"].shape == (2, 8, 64) and cached["attention_mask"].dtype == torch.bool
    # the reference's files hold the mask and the ids as int64 (ours: bool mask, float32 ids)
    kohya = {"hidden_state": cached["hidden_state"].float(), "attention_mask": cached["attention_mask"].long(),
             "input_ids": cached["input_ids"].float()}
    back = family.conditioning_from_cache(None, kohya, None, "cpu", torch.float32)
    assert torch.equal(back.mask, cond.mask) and torch.equal(back.input_ids, cond.input_ids)
    torch.testing.assert_close(back.hidden, cond.hidden)


def test_cache_settings_change_with_the_system_prompt():
    family = LuminaFamily()
    plain = family.text_encoder_cache_settings(_args())
    other = family.text_encoder_cache_settings(_args("--system_prompt", "You are an assistant."))
    assert set(plain) == {"system_prompt_hash"} and plain != other
    value = other["system_prompt_hash"]
    assert value < 2**24 and float(torch.tensor(value, dtype=torch.float32)) == value  # exact in a float32 file
