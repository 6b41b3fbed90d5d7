"""``networks.lora_flux``: the FLUX.1 LoRA network module (kohya plug-in API).

Full-size key/shape parity with ``reference/lora_keys.json`` (models on the meta device), the
FLUX ``--network_args`` on the tiny DiT, ``split_qkv`` (block-diagonal LoRAs that equal
independent per-part LoRAs), applying/merging/round-tripping files, per-text-encoder learning
rates, and the pass-through of dropouts and LoRA+ ratios.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from library.demo.tiny_flux import random_flux_state_dict, tiny_flux_config
from library.demo.tiny_flux_encoders import build_tiny_clip_l, build_tiny_t5
from library.families.flux.model import Flux, FluxConfig, image_ids, pack_latents, text_ids
from networks import lora_flux
from networks.lora_flux import SplitLoRAModule, create_network, create_network_from_weights, parse_block_indices
from networks.lora_modules import LoRAModule
from tests.reference import load_reference

torch.set_num_threads(1)

DIM, ALPHA = 4, 2.0
T5_VOCAB = 64


def _config(guidance_embed: bool = True) -> FluxConfig:
    # The demo's widths, but a fixed 2 + 2 blocks: the block tests count on it, and it keeps them fast.
    return dataclasses.replace(tiny_flux_config(guidance_embed), depth=2, depth_single_blocks=2)


HIDDEN = _config().hidden_size
MLP_HIDDEN = _config().mlp_hidden_dim


# --- helpers ---------------------------------------------------------------------------------

def _tiny_flux(guidance_embed: bool = True, seed: int = 0) -> Flux:
    config = _config(guidance_embed)
    model = Flux(config)
    model.load_state_dict(random_flux_state_dict(config, seed=seed))
    return model.eval()


def _tiny_encoders(seed: int = 0) -> list:
    return [build_tiny_clip_l(seed).eval(), build_tiny_t5(T5_VOCAB, seed).eval()]


def _dit_inputs(config: FluxConfig, batch: int = 2, height: int = 4, width: int = 4, n_txt: int = 5,
                seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, config.in_channels // 4, height, width, generator=g)
    return dict(img=pack_latents(latents), img_ids=image_ids(batch, height, width),
                txt=torch.randn(batch, n_txt, config.context_in_dim, generator=g), txt_ids=text_ids(batch, n_txt),
                timesteps=torch.rand(batch, generator=g), y=torch.randn(batch, config.vec_in_dim, generator=g),
                guidance=torch.full((batch,), 3.5) if config.guidance_embed else None)


def _randomize_up(network, seed: int = 1, std: float = 0.05) -> None:
    """Give every ``lora_up`` random values (block-diagonal for split modules), so the LoRA does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            value = torch.randn(lora.lora_up.weight.shape, generator=g) * std
            if isinstance(lora, SplitLoRAModule):
                value = value * lora.up_mask
            lora.lora_up.weight.copy_(value)


def _shapes(network) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in network.state_dict().items()}


def _names(network) -> set[str]:
    return {lora.lora_name for lora in network.loras}


def _ranks(network) -> dict[str, int]:
    return {lora.lora_name: lora.lora_dim for lora in network.loras}


# --- 1. full size on meta: the file format -----------------------------------------------------

@pytest.fixture(scope="module")
def full_size_models():
    """FLUX.1-dev DiT, CLIP-L and T5-XXL with their real shapes, on the meta device (no memory)."""
    with torch.device("meta"):
        flux = Flux(FluxConfig())
        clip_l = CLIPTextModel(CLIPTextConfig(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77))
        t5 = T5EncoderModel(T5Config(
            d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
            vocab_size=32128, is_encoder_decoder=False, use_cache=False))
    return flux, clip_l, t5


@pytest.mark.parametrize("case, network_args, apply_text_encoder", [
    ("flux_dev_lora_dim8_unet_only", {}, False),
    ("flux_dev_lora_dim8_with_clip_l", {}, True),
    ("flux_dev_lora_dim8_train_t5xxl", {"train_t5xxl": "True"}, True),
])
def test_full_size_keys_and_shapes_match_reference(full_size_models, case, network_args, apply_text_encoder):
    flux, clip_l, t5 = full_size_models
    network = create_network(1.0, 8, 4, None, [clip_l, t5], flux, **network_args)
    network.apply_to([clip_l, t5], flux, apply_text_encoder=apply_text_encoder, apply_unet=True)
    try:
        expected = load_reference("lora_keys.json")[case]
        got = _shapes(network)
        assert sorted(set(got) - set(expected))[:5] == [] and sorted(set(expected) - set(got))[:5] == []
        assert got == expected
        assert network.train_t5xxl == ("train_t5xxl" in network_args)
    finally:
        network.restore()


def test_full_size_split_qkv_keeps_the_names_and_multiplies_the_fused_ranks(full_size_models):
    flux, clip_l, t5 = full_size_models
    network = create_network(1.0, 8, 4, None, [clip_l, t5], flux, split_qkv="True")
    network.apply_to([clip_l, t5], flux, apply_text_encoder=False, apply_unet=True)
    try:
        expected = dict(load_reference("lora_keys.json")["flux_dev_lora_dim8_unet_only"])
        for key, shape in expected.items():
            parts = 3 if "_attn_qkv." in key else 4 if "_linear1." in key else 1
            if key.endswith("lora_down.weight"):
                expected[key] = [shape[0] * parts, shape[1]]
            elif key.endswith("lora_up.weight"):
                expected[key] = [shape[0], shape[1] * parts]
        assert _shapes(network) == expected
    finally:
        network.restore()


# --- 2. network_args on the tiny model ---------------------------------------------------------

def test_default_network_targets_every_block_linear_and_clip_l_only():
    flux = _tiny_flux()
    network = create_network(1.0, DIM, ALPHA, None, _tiny_encoders(), flux)
    names = _names(network)
    assert len([n for n in names if n.startswith("lora_unet_double_blocks_")]) == 2 * 10
    assert len([n for n in names if n.startswith("lora_unet_single_blocks_")]) == 2 * 3
    assert not [n for n in names if n.startswith("lora_te3_")]  # T5 only with train_t5xxl
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2" in names
    assert not [n for n in names if n.startswith("lora_unet_") and "_blocks_" not in n]  # no embedders by default
    assert set(_ranks(network).values()) == {DIM}
    assert all(float(lora.alpha) == ALPHA for lora in network.loras)
    assert network.train_t5xxl is False


@pytest.mark.parametrize("train_blocks, has_double, has_single", [
    ("all", True, True), ("double", True, False), ("single", False, True), ("Single", False, True),
])
def test_train_blocks(train_blocks, has_double, has_single):
    network = create_network(1.0, DIM, ALPHA, None, None, _tiny_flux(), train_blocks=train_blocks)
    names = _names(network)
    assert any(n.startswith("lora_unet_double_blocks_") for n in names) == has_double
    assert any(n.startswith("lora_unet_single_blocks_") for n in names) == has_single


def test_train_blocks_rejects_unknown_value():
    with pytest.raises(ValueError, match="train_blocks"):
        create_network(1.0, DIM, ALPHA, None, None, _tiny_flux(), train_blocks="middle")


@pytest.mark.parametrize("double, single, double_expected, single_expected", [
    ("0", "1", {0}, {1}),
    ("0-1", "none", {0, 1}, set()),
    ("none", "0,1", set(), {0, 1}),
    ("all", " 1 ", {0, 1}, {1}),
    (None, "0", {0, 1}, {0}),
])
def test_block_indices(double, single, double_expected, single_expected):
    args = {"train_single_block_indices": single}
    if double is not None:
        args["train_double_block_indices"] = double
    network = create_network(1.0, DIM, ALPHA, None, None, _tiny_flux(), **args)

    def blocks(kind):
        prefix = f"lora_unet_{kind}_blocks_"
        return {int(n[len(prefix):].split("_")[0]) for n in _names(network) if n.startswith(prefix)}

    assert blocks("double") == double_expected
    assert blocks("single") == single_expected
    # every layer of a chosen block is adapted
    assert len(network.unet_loras) == 10 * len(double_expected) + 3 * len(single_expected)


@pytest.mark.parametrize("key", ["train_double_block_indices", "train_single_block_indices"])
@pytest.mark.parametrize("text", ["x", "2", "1-0", "0-5", "0,,1", "-1", "1;2"])
def test_bad_block_indices_raise_with_the_key(key, text):
    with pytest.raises(ValueError, match=key):
        create_network(1.0, DIM, ALPHA, None, None, _tiny_flux(), **{key: text})


def test_parse_block_indices_full_size_counts():
    assert parse_block_indices("0,2,5-7", 19, "k") == [0, 2, 5, 6, 7]
    assert parse_block_indices("all", 38, "k") == list(range(38))
    assert parse_block_indices("NONE", 38, "k") == []
    with pytest.raises(ValueError, match="k="):
        parse_block_indices("19", 19, "k")


def test_per_type_dims_set_ranks_and_zero_removes_modules():
    flux = _tiny_flux()
    network = create_network(1.0, DIM, ALPHA, None, None, flux, img_attn_dim="2", txt_mlp_dim="0",
                             single_mod_dim="3", img_mod_dim="1")
    ranks = _ranks(network)
    for i in range(2):
        prefix = f"lora_unet_double_blocks_{i}_"
        assert ranks[prefix + "img_attn_qkv"] == 2 and ranks[prefix + "img_attn_proj"] == 2
        assert prefix + "txt_mlp_0" not in ranks and prefix + "txt_mlp_2" not in ranks
        assert ranks[prefix + "img_mod_lin"] == 1
        assert ranks[prefix + "txt_attn_qkv"] == DIM and ranks[prefix + "img_mlp_0"] == DIM
        assert ranks[prefix + "txt_mod_lin"] == DIM
        assert ranks[f"lora_unet_single_blocks_{i}_modulation_lin"] == 3
        assert ranks[f"lora_unet_single_blocks_{i}_linear1"] == DIM
    assert len(ranks) == 2 * 8 + 2 * 3
    # the alphas stay network_alpha, whatever the rank
    state = network.state_dict()
    assert all(float(v) == ALPHA for k, v in state.items() if k.endswith(".alpha"))
    assert list(state["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape) == [2, HIDDEN]


def test_single_dim_covers_both_single_linears():
    network = create_network(1.0, DIM, ALPHA, None, None, _tiny_flux(), single_dim="0")
    assert _names(network) == {f"lora_unet_single_blocks_{i}_modulation_lin" for i in range(2)} | {
        n for n in _names(network) if n.startswith("lora_unet_double_blocks_")}


@pytest.mark.parametrize("value", ["2.5", "two", "-1"])
def test_bad_per_type_dim_raises(value):
    with pytest.raises(ValueError, match="img_attn_dim"):
        create_network(1.0, DIM, ALPHA, None, None, _tiny_flux(), img_attn_dim=value)


def test_in_dims_add_the_input_embedders():
    network = create_network(1.0, DIM, ALPHA, None, None, _tiny_flux(), in_dims="[2,0,0,2,2]")
    ranks = _ranks(network)
    embedders = {n: r for n, r in ranks.items() if "_blocks_" not in n}
    assert embedders == {"lora_unet_img_in": 2, "lora_unet_guidance_in_in_layer": 2,
                         "lora_unet_guidance_in_out_layer": 2, "lora_unet_txt_in": 2}
    state = network.state_dict()
    config = _config()
    assert list(state["lora_unet_img_in.lora_down.weight"].shape) == [2, config.in_channels]
    assert list(state["lora_unet_txt_in.lora_down.weight"].shape) == [2, config.context_in_dim]
    assert list(state["lora_unet_guidance_in_in_layer.lora_down.weight"].shape) == [2, 256]  # timestep embedding
    assert list(state["lora_unet_guidance_in_out_layer.lora_up.weight"].shape) == [HIDDEN, 2]


def test_in_dims_time_and_vector():
    network = create_network(1.0, DIM, ALPHA, None, None, _tiny_flux(), in_dims="0, 3, 1, 0, 0")
    assert {n: r for n, r in _ranks(network).items() if "_blocks_" not in n} == {
        "lora_unet_time_in_in_layer": 3, "lora_unet_time_in_out_layer": 3,
        "lora_unet_vector_in_in_layer": 1, "lora_unet_vector_in_out_layer": 1}


def test_in_dims_on_schnell_without_guidance_only_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="networks.lora_flux"):
        network = create_network(1.0, DIM, ALPHA, None, None, _tiny_flux(guidance_embed=False),
                                 in_dims="[2,0,0,2,2]")
    assert {n for n in _names(network) if "_blocks_" not in n} == {"lora_unet_img_in", "lora_unet_txt_in"}
    assert "guidance_in" in caplog.text


@pytest.mark.parametrize("value", ["[2,0,0,2]", "[2,0,0,2,2,2]", "[a,0,0,0,0]", "[1,0,0,0,-1]", "[1.5,0,0,0,0]"])
def test_malformed_in_dims_raise(value):
    with pytest.raises(ValueError, match="in_dims"):
        create_network(1.0, DIM, ALPHA, None, None, _tiny_flux(), in_dims=value)


def test_not_a_flux_model_raises():
    with pytest.raises(ValueError, match="not a FLUX DiT"):
        create_network(1.0, DIM, ALPHA, None, None, torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_bad_network_dim_raises():
    with pytest.raises(ValueError, match="network_dim"):
        create_network(1.0, 0, ALPHA, None, None, _tiny_flux())


# --- 3. split_qkv ------------------------------------------------------------------------------

def _split_network(flux, multiplier=1.0, **kwargs):
    network = create_network(multiplier, DIM, ALPHA, None, None, flux, split_qkv="True", **kwargs)
    network.apply_to(None, flux, apply_text_encoder=False, apply_unet=True)
    return network


def test_split_qkv_state_dict_names_ranks_and_alphas():
    flux = _tiny_flux()
    plain = create_network(1.0, DIM, ALPHA, None, None, flux)
    network = create_network(1.0, DIM, ALPHA, None, None, flux, split_qkv="True")
    assert set(network.state_dict()) == set(plain.state_dict())
    state = network.state_dict()
    for name, parts, out in [("lora_unet_double_blocks_1_txt_attn_qkv", 3, 3 * HIDDEN),
                             ("lora_unet_single_blocks_0_linear1", 4, 3 * HIDDEN + MLP_HIDDEN)]:
        assert list(state[f"{name}.lora_down.weight"].shape) == [parts * DIM, HIDDEN]
        assert list(state[f"{name}.lora_up.weight"].shape) == [out, parts * DIM]
        assert float(state[f"{name}.alpha"]) == parts * ALPHA
        lora = getattr(network, name)
        assert isinstance(lora, SplitLoRAModule)
        assert lora.scale == pytest.approx(ALPHA / DIM)  # the per-part scale
        assert lora in network.unet_loras
    for name in ("lora_unet_double_blocks_0_img_attn_proj", "lora_unet_single_blocks_0_linear2",
                 "lora_unet_double_blocks_0_img_mlp_0"):
        assert type(getattr(network, name)) is LoRAModule
        assert float(state[f"{name}.alpha"]) == ALPHA
        assert state[f"{name}.lora_down.weight"].shape[0] == DIM
    # the modules created for the plan and replaced are gone: one module per name
    assert len(network.unet_loras) == len(plain.unet_loras)
    assert len(list(network.parameters())) == len(list(plain.parameters()))


def test_split_qkv_up_mask_is_block_diagonal():
    network = create_network(1.0, DIM, ALPHA, None, None, _tiny_flux(), split_qkv="True")
    mask = network.lora_unet_single_blocks_0_linear1.up_mask
    sizes = [HIDDEN, HIDDEN, HIDDEN, MLP_HIDDEN]
    expected = torch.block_diag(*[torch.ones(size, DIM) for size in sizes])
    assert torch.equal(mask, expected)
    assert "up_mask" not in "".join(network.state_dict())  # not saved


@pytest.mark.parametrize("block_path, name, sizes", [
    ("double_blocks.0.img_attn.qkv", "lora_unet_double_blocks_0_img_attn_qkv", [HIDDEN] * 3),
    ("single_blocks.1.linear1", "lora_unet_single_blocks_1_linear1", [HIDDEN] * 3 + [MLP_HIDDEN]),
])
def test_split_qkv_equals_independent_per_part_loras(block_path, name, sizes):
    flux = _tiny_flux()
    multiplier = 0.7
    network = _split_network(flux, multiplier)
    _randomize_up(network, std=0.3)
    layer = flux.get_submodule(block_path)
    lora = getattr(network, name)
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(3))

    out = layer(x)

    down, up = lora.lora_down.weight.detach(), lora.lora_up.weight.detach()
    weight, bias = layer.weight.detach(), layer.bias.detach()
    expected, start = [], 0
    for i, size in enumerate(sizes):
        rows, ranks = slice(start, start + size), slice(i * DIM, (i + 1) * DIM)
        part_lora = (x @ down[ranks].T) @ up[rows, ranks].T * (ALPHA / DIM) * multiplier
        expected.append(x @ weight[rows].T + bias[rows] + part_lora)
        start += size
    expected = torch.cat(expected, dim=-1)
    assert torch.allclose(out, expected, atol=1e-5)
    # and the LoRA term is really there (not just the base layer)
    base = x @ weight.T + bias
    assert (out - base).abs().max() > 1e-3


def test_split_qkv_off_diagonal_gradients_are_zero():
    flux = _tiny_flux()
    network = _split_network(flux)
    network.prepare_grad_etc(None, flux)
    network.train()
    _randomize_up(network, std=0.3)
    out = flux(**_dit_inputs(flux.config))
    out.square().mean().backward()
    for name in ("lora_unet_double_blocks_1_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
                 "lora_unet_single_blocks_0_linear1"):
        lora = getattr(network, name)
        grad = lora.lora_up.weight.grad
        assert grad is not None
        assert torch.count_nonzero(grad * (1 - lora.up_mask)) == 0
        assert torch.count_nonzero(grad * lora.up_mask) > 0
        assert torch.count_nonzero(lora.lora_down.weight.grad) > 0


def test_split_qkv_save_and_load_gives_the_same_outputs(tmp_path):
    flux = _tiny_flux()
    inputs = _dit_inputs(flux.config)
    with torch.no_grad():
        base = flux(**inputs)
    network = _split_network(flux)
    _randomize_up(network, std=0.1)
    with torch.no_grad():
        split_out = flux(**inputs)
    assert not torch.allclose(split_out, base, atol=1e-4)
    path = tmp_path / "split.safetensors"
    network.save_weights(path, None, {"ss_network_module": "networks.lora_flux"})
    network.restore()

    loaded, weights_sd = create_network_from_weights(1.0, path, None, None, flux)
    # a standard LoRA whose fused ups are block-diagonal
    up = weights_sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert list(up.shape) == [3 * HIDDEN, 3 * DIM]
    assert torch.count_nonzero(up[:HIDDEN, DIM:]) == 0 and torch.count_nonzero(up[:HIDDEN, :DIM]) > 0
    assert loaded.lora_unet_double_blocks_0_img_attn_qkv.scale == pytest.approx(ALPHA / DIM)
    loaded.apply_to(None, flux, apply_text_encoder=False, apply_unet=True)
    with torch.no_grad():
        loaded_out = flux(**inputs)
    assert torch.allclose(loaded_out, split_out, atol=1e-5)

    # loading the file into a fresh split network (e.g. to resume) also gives the same outputs
    loaded.restore()
    resumed = _split_network(flux)
    resumed.load_weights(path)
    with torch.no_grad():
        assert torch.allclose(flux(**inputs), split_out, atol=1e-5)
    resumed.restore()


def test_split_qkv_loading_a_dense_up_keeps_only_the_blocks(caplog):
    network = create_network(1.0, DIM, ALPHA, None, None, _tiny_flux(), split_qkv="True")
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    state = network.state_dict()
    dense = torch.ones_like(state[f"{name}.lora_up.weight"])
    with caplog.at_level(logging.WARNING, logger="networks.lora_flux"):
        network.load_state_dict_checked({f"{name}.lora_up.weight": dense})
    assert "block-diagonal" in caplog.text
    lora = getattr(network, name)
    assert torch.equal(lora.lora_up.weight.detach(), lora.up_mask)


# --- 4. applied network, merge, files ----------------------------------------------------------

def test_applied_network_changes_the_output_and_multiplier_zero_does_not():
    flux = _tiny_flux()
    inputs = _dit_inputs(flux.config)
    with torch.no_grad():
        base = flux(**inputs)
    network = create_network(1.0, DIM, ALPHA, None, None, flux, in_dims="[2,2,2,2,2]")
    network.apply_to(None, flux, apply_text_encoder=False, apply_unet=True)
    with torch.no_grad():
        assert torch.equal(flux(**inputs), base)  # lora_up starts at zero
        _randomize_up(network)
        lora_out = flux(**inputs)
        assert (lora_out - base).abs().max() > 1e-3
        network.set_multiplier(0.0)
        assert torch.allclose(flux(**inputs), base, atol=1e-6)
        network.set_multiplier(1.0)
        assert torch.equal(flux(**inputs), lora_out)
    network.restore()
    with torch.no_grad():
        assert torch.equal(flux(**inputs), base)


@pytest.mark.parametrize("network_args", [{}, {"split_qkv": "True", "in_dims": "[2,2,2,2,2]"}])
def test_merge_to_equals_the_applied_network(network_args):
    flux = _tiny_flux()
    clip_l, t5 = _tiny_encoders()
    inputs = _dit_inputs(flux.config)
    tokens = torch.randint(0, T5_VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    clip_tokens = torch.randint(0, 49408, (2, 6), generator=torch.Generator().manual_seed(6))
    network = create_network(0.8, DIM, ALPHA, None, [clip_l, t5], flux, train_t5xxl="True", **network_args)
    network.apply_to([clip_l, t5], flux, apply_text_encoder=True, apply_unet=True)
    _randomize_up(network, std=0.1)
    with torch.no_grad():
        applied = (flux(**inputs), clip_l(clip_tokens).last_hidden_state, t5(tokens).last_hidden_state)
    network.restore()
    network.merge_to([clip_l, t5], flux)
    with torch.no_grad():
        merged = (flux(**inputs), clip_l(clip_tokens).last_hidden_state, t5(tokens).last_hidden_state)
    for a, m in zip(applied, merged):
        assert torch.allclose(a, m, atol=1e-5)
    base_flux = _tiny_flux()
    with torch.no_grad():
        assert (merged[0] - base_flux(**inputs)).abs().max() > 1e-3  # the merge did change the weights


def test_create_network_from_weights_round_trips_and_sets_train_t5xxl(tmp_path):
    flux = _tiny_flux()
    encoders = _tiny_encoders()
    network = create_network(1.0, DIM, ALPHA, None, encoders, flux, train_t5xxl="True", img_mlp_dim="2",
                             in_dims="[0,0,0,0,3]")
    network.apply_to(encoders, flux, apply_text_encoder=True, apply_unet=True)
    _randomize_up(network)
    path = tmp_path / "with_t5.safetensors"
    network.save_weights(path, None, None)
    saved = network.state_dict()
    network.restore()
    assert any(k.startswith("lora_te3_encoder_block_0_layer_0_SelfAttention_q.") for k in saved)

    loaded, weights_sd = create_network_from_weights(1.0, path, None, encoders, flux)
    assert loaded.train_t5xxl is True
    assert set(loaded.state_dict()) == set(saved) == set(weights_sd)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert _ranks(loaded) == _ranks(network)
    assert loaded.lora_unet_txt_in.lora_dim == 3 and loaded.lora_unet_double_blocks_0_img_mlp_0.lora_dim == 2

    # without T5 modules in the file: train_t5xxl is False
    clip_only = {k: v for k, v in saved.items() if not k.startswith("lora_te3_")}
    loaded, _ = create_network_from_weights(1.0, None, None, encoders, flux, weights_sd=clip_only,
                                            for_inference=True)
    assert loaded.train_t5xxl is False
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert {lora.lora_name for lora in loaded.text_encoder_loras} == {
        k.partition(".")[0] for k in clip_only if k.startswith("lora_te1_")}


def test_create_network_from_weights_rejects_sd_style_keys():
    flux = _tiny_flux()
    sd_style = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    }
    with pytest.raises(ValueError, match="name no layer") as info:
        create_network_from_weights(1.0, None, None, _tiny_encoders(), flux, weights_sd=sd_style)
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in str(info.value)
    assert "lora_unet_double_blocks_0" in str(info.value)  # shows how this model's names look


def test_create_network_from_weights_needs_a_source():
    with pytest.raises(ValueError, match="file or weights_sd"):
        create_network_from_weights(1.0, None, None, None, _tiny_flux())


# --- 5. per-text-encoder learning rates ---------------------------------------------------------

def test_two_text_encoder_lrs_with_train_t5xxl():
    flux = _tiny_flux()
    encoders = _tiny_encoders()
    network = create_network(1.0, DIM, ALPHA, None, encoders, flux, train_t5xxl="True")
    network.apply_to(encoders, flux, apply_text_encoder=True, apply_unet=True)
    for prepare in (network.prepare_optimizer_params, network.prepare_optimizer_params_with_multiple_te_lrs):
        groups, descriptions = prepare([1e-4, 2e-4], 1e-3, 1e-3)
        assert descriptions == ["textencoder1", "textencoder2", "unet"]
        assert [g["lr"] for g in groups] == [1e-4, 2e-4, 1e-3]
        by_name = {id(p): n for n, p in network.named_parameters()}
        prefixes = [{by_name[id(p)].split("_", 2)[1] for p in g["params"]} for g in groups]
        assert prefixes == [{"te1"}, {"te3"}, {"unet"}]
        assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))
    network.restore()


@pytest.mark.parametrize("apply_text_encoder, expected", [(True, ["textencoder1", "unet"]), (False, ["unet"])])
def test_two_text_encoder_lrs_without_t5_modules(apply_text_encoder, expected):
    # FLUX always has two text-encoder slots, so `--text_encoder_lr a b` is valid without train_t5xxl
    # (and with --network_train_unet_only); the T5 lr then has nothing to apply to.
    flux = _tiny_flux()
    encoders = _tiny_encoders()
    network = create_network(1.0, DIM, ALPHA, None, encoders, flux)
    network.apply_to(encoders, flux, apply_text_encoder=apply_text_encoder, apply_unet=True)
    groups, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs([1e-4, 2e-4], 1e-3, 1e-3)
    assert descriptions == expected
    assert [g["lr"] for g in groups] == [1e-4, 1e-3][-len(expected):]
    with pytest.raises(ValueError, match="text_encoder_lr"):
        network.prepare_optimizer_params([1e-4, 2e-4, 3e-4], 1e-3, 1e-3)
    network.restore()


def test_one_text_encoder_lr_covers_both_encoders():
    flux = _tiny_flux()
    encoders = _tiny_encoders()
    network = create_network(1.0, DIM, ALPHA, None, encoders, flux, train_t5xxl="True")
    groups, descriptions = network.prepare_optimizer_params(5e-5, None, 1e-3)
    assert descriptions == ["textencoder", "unet"]
    assert [g["lr"] for g in groups] == [5e-5, 1e-3]


# --- 6. dropouts and LoRA+ -----------------------------------------------------------------------

def test_dropouts_pass_through_to_every_module_including_split():
    flux = _tiny_flux()
    network = create_network(1.0, DIM, ALPHA, None, _tiny_encoders(), flux, neuron_dropout=0.1,
                             rank_dropout="0.2", module_dropout="0.3", split_qkv="True")
    assert any(isinstance(lora, SplitLoRAModule) for lora in network.loras)
    for lora in network.loras:
        assert (lora.dropout, lora.rank_dropout, lora.module_dropout) == (0.1, 0.2, 0.3), lora.lora_name
    # the LyCORIS-style dropout=... the trainer injects is the neuron dropout when neuron_dropout is None
    network = create_network(1.0, DIM, ALPHA, None, None, flux, dropout="0.25", split_qkv="True")
    assert {lora.dropout for lora in network.loras} == {0.25}


def test_split_modules_train_with_dropouts():
    flux = _tiny_flux()
    inputs = _dit_inputs(flux.config)
    network = create_network(1.0, DIM, ALPHA, None, None, flux, neuron_dropout=0.5, rank_dropout="0.5",
                             split_qkv="True")
    network.apply_to(None, flux, apply_text_encoder=False, apply_unet=True)
    _randomize_up(network, std=0.3)
    with torch.no_grad():
        network.eval()
        eval_out = flux(**inputs)
        network.train()
        torch.manual_seed(0)
        train_out = flux(**inputs)
    assert torch.isfinite(train_out).all()
    assert not torch.allclose(train_out, eval_out, atol=1e-4)  # the dropouts act in training mode
    network.restore()


def test_module_dropout_one_skips_split_modules_in_training():
    flux = _tiny_flux()
    network = create_network(1.0, DIM, ALPHA, None, None, flux, module_dropout="0.999999", split_qkv="True")
    network.apply_to(None, flux, apply_text_encoder=False, apply_unet=True)
    _randomize_up(network, std=0.3)
    lora = network.lora_unet_double_blocks_0_img_attn_qkv
    x = torch.randn(1, 3, HIDDEN)
    with torch.no_grad():
        base = lora.org_forward(x)
        network.train()
        torch.manual_seed(0)
        assert torch.equal(flux.double_blocks[0].img_attn.qkv(x), base)
        network.eval()
        assert not torch.allclose(flux.double_blocks[0].img_attn.qkv(x), base)
    network.restore()


def test_loraplus_ratios_make_plus_groups():
    flux = _tiny_flux()
    encoders = _tiny_encoders()
    network = create_network(1.0, DIM, ALPHA, None, encoders, flux, loraplus_lr_ratio="4", split_qkv="True")
    groups, descriptions = network.prepare_optimizer_params(1e-4, 1e-3, 1e-3)
    assert descriptions == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 4e-4, 1e-3, 4e-3])
    ups = {id(lora.lora_up.weight) for lora in network.loras}
    assert all(id(p) in ups for p in groups[3]["params"])
    assert not any(id(p) in ups for p in groups[2]["params"])
    # the split modules' up weights are in the plus group too
    assert id(network.lora_unet_single_blocks_0_linear1.lora_up.weight) in {id(p) for p in groups[3]["params"]}

    network = create_network(1.0, DIM, ALPHA, None, encoders, flux, loraplus_unet_lr_ratio="8",
                             loraplus_text_encoder_lr_ratio="2")
    groups, descriptions = network.prepare_optimizer_params(1e-4, 1e-3, 1e-3)
    assert dict(zip(descriptions, [g["lr"] for g in groups])) == pytest.approx(
        {"textencoder": 1e-4, "textencoder plus": 2e-4, "unet": 1e-3, "unet plus": 8e-3})


def test_create_network_from_weights_honours_dropouts_and_loraplus():
    flux = _tiny_flux()
    network = create_network(1.0, DIM, ALPHA, None, None, flux)
    weights = network.state_dict()
    loaded, _ = create_network_from_weights(1.0, None, None, None, flux, weights_sd=weights, rank_dropout="0.1",
                                            module_dropout="0.2", dropout="0.3", loraplus_unet_lr_ratio="16")
    assert {(m.dropout, m.rank_dropout, m.module_dropout) for m in loaded.loras} == {(0.3, 0.1, 0.2)}
    _, descriptions = loaded.prepare_optimizer_params(None, 1e-3, 1e-3)
    assert descriptions == ["unet", "unet plus"]


def test_flux_keys_are_not_reported_as_unknown(caplog):
    with caplog.at_level(logging.WARNING):
        create_network(1.0, DIM, ALPHA, None, None, _tiny_flux(), train_blocks="all", split_qkv="False",
                       img_attn_dim="2", in_dims="[0,0,0,0,0]", train_t5xxl="False", verbose="False")
    assert "unknown" not in caplog.text
    with caplog.at_level(logging.WARNING):
        create_network(1.0, DIM, ALPHA, None, None, _tiny_flux(), not_a_flux_arg="1")
    assert "not_a_flux_arg" in caplog.text


def test_module_exports():
    for name in lora_flux.__all__:
        assert hasattr(lora_flux, name)
