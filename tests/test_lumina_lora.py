"""networks.lora_lumina: the reference's module names on the full-size models (meta), targets and
network args, split q/k/v, applying and merging, files written and read back, check_lora_weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import Gemma2Config, Gemma2Model

import networks.lora_lumina as lora_lumina
from library.demo.tiny_lumina import build_tiny_gemma2, random_lumina_state_dict, tiny_lumina_config
from library.families.lumina.gemma import GEMMA2_DEFAULTS
from library.families.lumina.model import LUMINA_IMAGE_2_CONFIG, NextDiT

torch.set_num_threads(1)

VOCAB = 300
#: Linear layers of one modulated block / the context refiner's blocks (no adaLN there)
BLOCK_LINEARS = ("attention_qkv", "attention_out", "feed_forward_w1", "feed_forward_w2", "feed_forward_w3",
                 "adaLN_modulation_1")
GEMMA_LINEARS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_o_proj", "mlp_gate_proj",
                 "mlp_up_proj", "mlp_down_proj")


def _expected_dit_names(layers: int, refiners: int, prefix: str = "lora_unet") -> set[str]:
    names = {f"{prefix}_layers_{i}_{n}" for i in range(layers) for n in BLOCK_LINEARS}
    names |= {f"{prefix}_noise_refiner_{i}_{n}" for i in range(refiners) for n in BLOCK_LINEARS}
    names |= {f"{prefix}_context_refiner_{i}_{n}" for i in range(refiners) for n in BLOCK_LINEARS[:-1]}
    return names | {f"{prefix}_final_layer_linear", f"{prefix}_final_layer_adaLN_modulation_1"}


def _tiny_models(seed: int = 0):
    config = tiny_lumina_config()
    dit = NextDiT(config)
    dit.load_state_dict(random_lumina_state_dict(config, seed=seed))
    return dit.eval(), build_tiny_gemma2(VOCAB, seed=seed)


def _names(network) -> set[str]:
    return {lora.lora_name for lora in network.text_encoder_loras + network.unet_loras}


def _ranks(network) -> dict[str, int]:
    return {lora.lora_name: lora.lora_dim for lora in network.unet_loras}


def test_full_size_module_names_and_shapes_on_meta():
    with torch.device("meta"):
        dit = NextDiT(LUMINA_IMAGE_2_CONFIG)
        gemma = Gemma2Model(Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                                         num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                         **GEMMA2_DEFAULTS))
        network = lora_lumina.create_network(1.0, 8, 4, None, gemma, dit)
    dit_names = {lora.lora_name for lora in network.unet_loras}
    te_names = {lora.lora_name for lora in network.text_encoder_loras}
    assert dit_names == _expected_dit_names(26, 2) and len(dit_names) == 26 * 6 + 2 * 6 + 2 * 5 + 2 == 180
    # the last Gemma layer gets no modules: the DiT reads the penultimate hidden states, which it does not reach
    assert te_names == {f"lora_te_layers_{i}_{n}" for i in range(25) for n in GEMMA_LINEARS} and len(te_names) == 175
    shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    assert shapes["lora_unet_layers_0_attention_qkv.lora_up.weight"] == (3840, 8)
    assert shapes["lora_unet_layers_25_adaLN_modulation_1.lora_down.weight"] == (8, 1024)
    assert shapes["lora_unet_final_layer_linear.lora_up.weight"] == (64, 8)
    assert shapes["lora_te_layers_0_self_attn_q_proj.lora_up.weight"] == (2048, 8)
    assert shapes["lora_te_layers_0_mlp_down_proj.lora_down.weight"] == (8, 9216)
    assert shapes["lora_unet_layers_0_attention_qkv.alpha"] == ()


def test_default_network_targets_every_block_linear_and_gemma():
    dit, gemma = _tiny_models()
    network = lora_lumina.create_network(1.0, 4, 1.0, None, [gemma], dit)
    assert {lora.lora_name for lora in network.unet_loras} == _expected_dit_names(4, 2)
    assert {lora.lora_name for lora in network.text_encoder_loras} == {
        f"lora_te_layers_{i}_{n}" for i in range(2) for n in GEMMA_LINEARS}


def test_the_last_gemma_layer_cannot_train_but_reference_files_with_it_load():
    dit, gemma = _tiny_models()
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    last = gemma.layers[-1].mlp.down_proj
    last.weight.requires_grad_(True)
    gemma(input_ids=ids, output_hidden_states=True).hidden_states[-2].sum().backward()
    assert last.weight.grad is None  # no gradient reaches it: a LoRA there would stay at zero
    weights = {"lora_te_layers_2_mlp_down_proj.lora_down.weight": torch.randn(4, 128),
               "lora_te_layers_2_mlp_down_proj.lora_up.weight": torch.zeros(64, 4),
               "lora_te_layers_2_mlp_down_proj.alpha": torch.tensor(4.0)}
    network, _ = lora_lumina.create_network_from_weights(1.0, None, None, gemma, dit, weights_sd=weights)
    assert _names(network) == {"lora_te_layers_2_mlp_down_proj"}


@pytest.mark.parametrize("train_blocks, stacks", [
    ("transformer", {"layers", "final_layer"}), ("refiners", {"noise_refiner", "context_refiner"}),
    ("noise_refiner", {"noise_refiner"}), ("context_refiner", {"context_refiner"}),
    ("cap_refiner", {"context_refiner"}),
])
def test_train_blocks(train_blocks, stacks):
    dit, _ = _tiny_models()
    network = lora_lumina.create_network(1.0, 4, 1.0, None, None, dit, train_blocks=train_blocks)
    found = {s for s in ("layers", "noise_refiner", "context_refiner", "final_layer")
             if any(name.startswith(f"lora_unet_{s}_") for name in _names(network))}
    assert found == stacks


def test_train_block_indices_and_bad_network_args():
    dit, _ = _tiny_models()
    network = lora_lumina.create_network(1.0, 4, 1.0, None, None, dit, train_block_indices="0,2-3")
    layers = {int(n.split("_")[3]) for n in _names(network) if n.startswith("lora_unet_layers_")}
    assert layers == {0, 2, 3}
    assert any(n.startswith("lora_unet_noise_refiner_1_") for n in _names(network))  # refiners are not indexed
    with pytest.raises(ValueError, match="train_block_indices='7'.*outside the model's 4 blocks"):
        lora_lumina.create_network(1.0, 4, 1.0, None, None, dit, train_block_indices="7")
    with pytest.raises(ValueError, match="train_blocks='double'"):
        lora_lumina.create_network(1.0, 4, 1.0, None, None, dit, train_blocks="double")
    with pytest.raises(ValueError, match="embedder_dims=.*give 3 ranks"):
        lora_lumina.create_network(1.0, 4, 1.0, None, None, dit, embedder_dims="[4,4]")
    with pytest.raises(ValueError, match="not a Lumina NextDiT"):
        lora_lumina.create_network(1.0, 4, 1.0, None, None, torch.nn.Linear(2, 2))


def test_per_type_dims_and_the_refiner_dim_wins_in_the_refiners():
    dit, _ = _tiny_models()
    network = lora_lumina.create_network(1.0, 4, 1.0, None, None, dit, attn_dim="8", mlp_dim="2", mod_dim="0",
                                         refiner_dim="6")
    ranks = _ranks(network)
    assert ranks["lora_unet_layers_1_attention_qkv"] == 8 and ranks["lora_unet_layers_1_attention_out"] == 8
    assert ranks["lora_unet_layers_1_feed_forward_w2"] == 2  # mlp_dim names the feed-forward layers
    assert not any(n.endswith("adaLN_modulation_1") and n.startswith("lora_unet_layers_") for n in ranks)
    assert "lora_unet_final_layer_adaLN_modulation_1" not in ranks and ranks["lora_unet_final_layer_linear"] == 4
    assert ranks["lora_unet_noise_refiner_0_attention_qkv"] == 6
    assert ranks["lora_unet_noise_refiner_0_adaLN_modulation_1"] == 6
    assert ranks["lora_unet_context_refiner_1_feed_forward_w1"] == 6


def test_embedder_dims_add_the_embedders():
    dit, _ = _tiny_models()
    ranks = _ranks(lora_lumina.create_network(1.0, 4, 1.0, None, None, dit, embedder_dims="[2,3,0]"))
    assert ranks["lora_unet_x_embedder"] == 2
    assert ranks["lora_unet_t_embedder_mlp_0"] == ranks["lora_unet_t_embedder_mlp_2"] == 3
    assert "lora_unet_cap_embedder_1" not in ranks


def test_split_qkv_keeps_the_file_format_with_a_block_diagonal_up():
    dit, _ = _tiny_models()
    network = lora_lumina.create_network(1.0, 4, 2.0, None, None, dit, split_qkv="True")
    state = network.state_dict()
    assert state["lora_unet_layers_0_attention_qkv.lora_down.weight"].shape == (12, 48)
    assert state["lora_unet_layers_0_attention_qkv.lora_up.weight"].shape == (96, 12)
    assert float(state["lora_unet_layers_0_attention_qkv.alpha"]) == 6.0  # scale alpha/rank is each part's
    assert state["lora_unet_layers_0_attention_out.lora_down.weight"].shape == (4, 48)  # not fused: plain
    split = next(lora for lora in network.unet_loras if lora.lora_name == "lora_unet_layers_0_attention_qkv")
    mask = split.up_mask
    # q: 2 heads x 24 rows on rank 0-3, k: 24 rows on 4-7, v: 24 rows on 8-11 (grouped-query sizes)
    assert mask[:48, :4].all() and mask[48:72, 4:8].all() and mask[72:, 8:].all()
    assert mask.sum() == 48 * 4 + 24 * 4 + 24 * 4


def _dit_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    return dict(x=torch.randn(2, 16, 4, 4, generator=g), t=torch.rand(2, generator=g),
                cap_feats=torch.randn(2, 8, 64, generator=g), cap_mask=mask)


def _randomized(network, seed: int = 7):
    """Random ``lora_up`` weights, as training would leave them (split modules: only their diagonal
    blocks, since the others start at zero and get no gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.unet_loras + network.text_encoder_loras:
            up = lora.lora_up.weight
            mask = getattr(lora, "up_mask", torch.ones_like(up))
            up.copy_(0.2 * torch.randn(up.shape, generator=g) * mask)
    return network


@pytest.mark.parametrize("network_args", [{}, {"split_qkv": "True"}], ids=["plain", "split_qkv"])
def test_applied_network_changes_outputs_and_merge_to_equals_it(network_args):
    dit, gemma = _tiny_models()
    x = _dit_inputs()
    ids = torch.tensor([[2, 5, 6, 7, 0, 0]])
    with torch.no_grad():
        base = dit(**x)
        base_te = gemma(input_ids=ids).last_hidden_state
    network = _randomized(lora_lumina.create_network(1.0, 4, 2.0, None, gemma, dit, **network_args))
    network.apply_to(gemma, dit, True, True)
    with torch.no_grad():
        applied, applied_te = dit(**x), gemma(input_ids=ids).last_hidden_state
        network.set_multiplier(0.0)
        torch.testing.assert_close(dit(**x), base, rtol=0, atol=0)
    assert (applied - base).abs().max() > 1e-2 and (applied_te - base_te).abs().max() > 1e-2

    merged_dit, merged_gemma = _tiny_models()
    weights = network.state_dict()
    fresh, _ = lora_lumina.create_network_from_weights(1.0, None, None, merged_gemma, merged_dit, weights_sd=weights)
    fresh.merge_to(merged_gemma, merged_dit)
    with torch.no_grad():
        torch.testing.assert_close(merged_dit(**x), applied, atol=1e-5, rtol=1e-5)
        # merged weights sum in another order: 1.2e-5 apart at one of 384 outputs with one thread
        torch.testing.assert_close(merged_gemma(input_ids=ids).last_hidden_state, applied_te, atol=5e-5, rtol=1e-5)


def test_saved_file_reloads_and_check_lora_weights_reads_it(tmp_path, capsys):
    from networks import check_lora_weights

    dit, gemma = _tiny_models()
    network = lora_lumina.create_network(1.0, 4, 2.0, None, gemma, dit)
    network.apply_to(gemma, dit, True, True)
    _randomized(network)
    untrained = "lora_te_layers_1_mlp_down_proj.lora_up.weight"
    with torch.no_grad():
        network.state_dict(keep_vars=True)[untrained].zero_()
    path = tmp_path / "lumina_lora.safetensors"
    network.save_weights(str(path), torch.float16, {"ss_network_module": "networks.lora_lumina"})
    saved = load_file(str(path))
    assert saved.keys() == network.state_dict().keys() and saved[untrained].dtype == torch.float16

    dit2, gemma2 = _tiny_models()
    loaded, _ = lora_lumina.create_network_from_weights(1.0, path, None, gemma2, dit2, for_inference=True)
    assert _names(loaded) == _names(network) and not loaded.train_t5xxl
    assert {l.lora_name: l.lora_dim for l in loaded.unet_loras} == _ranks(network)

    report = check_lora_weights.main([str(path)])
    assert [m.name for m in report.problems] == ["lora_te_layers_1_mlp_down_proj"]
    assert "1 untrained" in capsys.readouterr().out


def test_weights_of_another_family_are_refused():
    dit, gemma = _tiny_models()
    weights = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 48),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(144, 4)}
    with pytest.raises(ValueError, match="double_blocks"):
        lora_lumina.create_network_from_weights(1.0, None, None, gemma, dit, weights_sd=weights)
