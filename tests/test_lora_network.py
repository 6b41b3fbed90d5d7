"""Behaviour of networks.lora on tiny SD-shaped models (diffusers U-Net + transformers CLIP)."""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from library.io_utils import addnet_hashes
from networks import lora
from networks.lora_modules import LoRAModule

# --- tiny models -------------------------------------------------------------------------------


def tiny_models() -> tuple[CLIPTextModel, UNet2DConditionModel]:
    """A ~100K-parameter SD-shaped pair: cross-attention, 1x1 proj_in, conv_shortcut,
    3x3 resnet convs, a stride-2 Downsample2D and an Upsample2D."""
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=8, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    return text_encoder.eval(), unet.eval()


INPUT_IDS = torch.tensor([[1, 5, 9, 13, 2, 0, 0, 0], [1, 7, 3, 2, 0, 0, 0, 0]])


def run(text_encoder: nn.Module, unet: nn.Module, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = text_encoder(INPUT_IDS).last_hidden_state
    return unet(latents, torch.tensor([10, 500]), encoder_hidden_states=context).sample


def randomize_up(network: lora.LoRANetwork, std: float = 0.2, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.loras:
            weight = module.lora_up.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)


@pytest.fixture
def models():
    return tiny_models()


def make_network(text_encoder, unet, dim=4, alpha=2, **args) -> lora.LoRANetwork:
    args.setdefault("conv_dim", "2")
    return lora.create_network(1.0, dim, alpha, None, text_encoder, unet, **args)


# --- module math -------------------------------------------------------------------------------

LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (3, 7, 6)),
    "conv1x1": (lambda: nn.Conv2d(6, 5, 1), (2, 6, 5, 5)),
    "conv3x3_stride2": (lambda: nn.Conv2d(6, 5, 3, stride=2, padding=1), (2, 6, 7, 7)),
}


@pytest.mark.parametrize("kind", LAYERS)
def test_module_formula_and_merge(kind):
    torch.manual_seed(0)
    make_layer, shape = LAYERS[kind]
    layer = make_layer()
    x = torch.randn(shape)
    before = layer(x)
    module = LoRAModule("lora_test", layer, multiplier=0.5, lora_dim=3, alpha=6)
    module.apply_to()
    assert torch.equal(layer(x), before), "a fresh module (up = 0) must not change the output"
    nn.init.normal_(module.lora_up.weight, std=0.3)
    expected = before + module.lora_up(module.lora_down(x)) * 0.5 * (6 / 3)
    hooked = layer(x)
    torch.testing.assert_close(hooked, expected)
    assert not torch.allclose(hooked, before)
    # the same update in weight space
    merged = copy.deepcopy(layer)
    del merged.forward  # the deepcopy carried the hook along
    with torch.no_grad():
        merged.weight += module.delta_weight() * module.multiplier
    torch.testing.assert_close(merged(x), hooked, atol=1e-5, rtol=1e-5)
    module.restore()
    assert "forward" not in layer.__dict__ and torch.equal(layer(x), before)


def test_module_alpha_none_or_zero_means_rank():
    for alpha in (None, 0):
        module = LoRAModule("lora_x", nn.Linear(4, 4), lora_dim=4, alpha=alpha)
        assert module.scale == 1.0 and float(module.alpha) == 4.0


def test_multiplier_scales_delta_linearly():
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    base = layer(x)
    module = LoRAModule("lora_x", layer, lora_dim=2, alpha=1)
    nn.init.normal_(module.lora_up.weight)
    module.apply_to()
    delta_one = layer(x) - base
    for m in (0.0, 2.0, -0.5):
        module.set_multiplier(m)
        torch.testing.assert_close(layer(x) - base, delta_one * m)


def test_dropouts_act_only_in_training():
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    x = torch.randn(16, 8)
    base = layer(x)
    for option in ("dropout", "rank_dropout", "module_dropout"):
        module = LoRAModule("lora_x", layer, lora_dim=4, alpha=4, **{option: 0.5})
        nn.init.normal_(module.lora_up.weight)
        module.apply_to()
        module.eval()
        clean = layer(x)
        assert torch.equal(layer(x), clean)
        module.train()
        noisy = [layer(x) for _ in range(6)]
        assert any(not torch.allclose(y, clean) for y in noisy), option
        if option == "module_dropout":
            assert any(torch.equal(y, base) for y in noisy), "module dropout must sometimes skip the LoRA"
        module.restore()


def test_rank_dropout_masks_whole_rank_channels_and_rescales():
    torch.manual_seed(0)
    layer = nn.Linear(6, 6)
    x = torch.randn(5, 3, 6)  # batch 5, 3 tokens
    module = LoRAModule("lora_x", layer, lora_dim=3, alpha=3, rank_dropout=0.4)
    nn.init.normal_(module.lora_up.weight)
    module.apply_to()
    module.train()
    torch.manual_seed(3)
    delta = layer(x) - module.org_forward(x)
    down = module.lora_down(x)
    candidates = [
        module.lora_up(down * torch.tensor(mask, dtype=torch.float32)) / (1 - 0.4) for mask in itertools.product((0, 1), repeat=3)
    ]
    for sample in range(x.shape[0]):  # every sample uses one mask for all its tokens
        assert any(torch.allclose(delta[sample], c[sample], atol=1e-6) for c in candidates)


# --- network on tiny models --------------------------------------------------------------------


def test_targets_cover_linear_1x1_and_3x3(models):
    network = make_network(*models)
    layers = {m.lora_name: m.org_module for m in network.loras}
    assert any(isinstance(l, nn.Linear) for l in layers.values())
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in layers  # 1x1 conv
    assert layers["lora_unet_down_blocks_0_downsamplers_0_conv"].stride == (2, 2)  # 3x3 stride 2
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in layers
    assert getattr(network, "lora_unet_down_blocks_1_resnets_0_conv_shortcut").lora_dim == 4  # 1x1: network_dim
    assert getattr(network, "lora_unet_down_blocks_1_resnets_0_conv1").lora_dim == 2  # 3x3: conv_dim
    assert all(n.startswith("lora_te_text_model_encoder_layers_") for n in layers if n.startswith("lora_te"))
    without_conv = lora.create_network(1.0, 4, 2, None, *models)
    assert not any("resnets" in m.lora_name or "samplers" in m.lora_name for m in without_conv.loras)


def test_base_state_dict_untouched(models):
    text_encoder, unet = models
    keys_before = set(unet.state_dict()) | set(text_encoder.state_dict())
    network = make_network(text_encoder, unet)
    network.apply_to(text_encoder, unet)
    assert set(unet.state_dict()) | set(text_encoder.state_dict()) == keys_before


def test_init_unchanged_then_merge_equals_hooked(models):
    text_encoder, unet = models
    pristine = copy.deepcopy(models)
    base = run(text_encoder, unet)
    network = make_network(text_encoder, unet)
    network.apply_to(text_encoder, unet)
    with torch.no_grad():
        assert torch.equal(run(text_encoder, unet), base)
        randomize_up(network)
        network.set_multiplier(0.7)
        hooked = run(text_encoder, unet)
    assert not torch.allclose(hooked, base, atol=1e-4)

    te2, unet2 = pristine
    merge_net, _ = lora.create_network_from_weights(0.7, None, None, te2, unet2, weights_sd=network.state_dict(), for_inference=True)
    merge_net.merge_to(te2, unet2, network.state_dict(), torch.float32, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(run(te2, unet2), hooked, atol=1e-5, rtol=1e-4)

    network.restore()
    with torch.no_grad():
        assert torch.equal(run(text_encoder, unet), base)


def test_merge_refuses_applied_network(models):
    network = make_network(*models)
    network.apply_to(*models)
    with pytest.raises(RuntimeError, match="restore"):
        network.merge_to(*models, None)


def test_safetensors_round_trip_with_hashes(models, tmp_path):
    network = make_network(*models)
    randomize_up(network)
    path = tmp_path / "out.safetensors"
    metadata = {"ss_network_dim": "4", "ss_network_alpha": "2", "modelspec.title": "t"}
    network.save_weights(path, torch.float16, metadata)
    assert "sshs_model_hash" not in metadata, "the caller's metadata must not be modified"
    with safe_open(str(path), "pt") as f:
        file_meta = f.metadata()
    tensors = load_file(str(path))
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert file_meta["ss_network_dim"] == "4" and file_meta["modelspec.title"] == "t"
    assert (file_meta["sshs_model_hash"], file_meta["sshs_legacy_hash"]) == addnet_hashes(tensors, file_meta)
    assert set(tensors) == set(network.state_dict())

    other = make_network(*tiny_models())
    other.load_weights(path)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value.half().float())


def test_torch_file_round_trip_and_no_metadata(models, tmp_path):
    network = make_network(*models)
    randomize_up(network)
    network.save_weights(tmp_path / "out.pt", None, {"ss_x": "1"})
    other = make_network(*tiny_models())
    other.load_weights(tmp_path / "out.pt")
    for key, value in network.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)
    network.save_weights(tmp_path / "plain.safetensors", None, None)
    with safe_open(str(tmp_path / "plain.safetensors"), "pt") as f:
        assert not (f.metadata() or {}).get("sshs_model_hash")


def test_from_weights_reproduces_ranks_and_alphas(models, tmp_path):
    network = make_network(*models, dim=4, alpha=2, conv_dim="2", conv_alpha="0.5")
    randomize_up(network)
    network.save_weights(tmp_path / "w.safetensors", None, {})
    rebuilt, weights = lora.create_network_from_weights(1.0, tmp_path / "w.safetensors", None, *tiny_models())
    assert set(weights) == set(network.state_dict())
    original = {m.lora_name: (m.lora_dim, float(m.alpha), m.lora_down.weight.dim()) for m in network.loras}
    assert {m.lora_name: (m.lora_dim, float(m.alpha), m.lora_down.weight.dim()) for m in rebuilt.loras} == original
    assert {dim for dim, _, _ in original.values()} == {2, 4}
    for key, value in network.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)


def test_from_weights_missing_alpha_means_rank(models):
    network = make_network(*models)
    weights = {k: v for k, v in network.state_dict().items() if not k.endswith(".alpha")}
    rebuilt, _ = lora.create_network_from_weights(1.0, None, None, *tiny_models(), weights_sd=weights)
    assert all(m.scale == 1.0 for m in rebuilt.loras)


def test_prepare_optimizer_params(models):
    network = make_network(*models)
    n_te = sum(p.numel() for m in network.text_encoder_loras for p in m.parameters())
    groups, names = network.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert names == ["textencoder", "unet"] and [g["lr"] for g in groups] == [1e-5, 1e-4]
    assert sum(p.numel() for p in groups[0]["params"]) == n_te
    assert sum(len(g["params"]) for g in groups) == len(network.get_trainable_params())

    groups, names = network.prepare_optimizer_params(None, None, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3]

    groups, names = network.prepare_optimizer_params(0, 1e-4, 1e-3)
    assert names == ["unet"]
    network.prepare_grad_etc(*models)
    assert not any(p.requires_grad for m in network.text_encoder_loras for p in m.parameters())
    assert all(p.requires_grad for m in network.unet_loras for p in m.parameters())

    plus = make_network(*models, loraplus_unet_lr_ratio="16")
    groups, names = plus.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert names == ["textencoder", "unet", "unet plus"]
    assert groups[2]["lr"] == pytest.approx(1.6e-3)
    assert len(groups[2]["params"]) == len(plus.unet_loras)


@pytest.mark.parametrize("unet_only", [True, False])
def test_unet_only_and_text_encoder_only(models, tmp_path, unet_only):
    text_encoder, unet = models
    network = make_network(text_encoder, unet)
    network.apply_to(text_encoder, unet, apply_text_encoder=not unet_only, apply_unet=unet_only)
    assert network.train_unet is unet_only and network.train_text_encoder is (not unet_only)
    kept = "lora_unet_" if unet_only else "lora_te_"
    assert network.state_dict() and all(k.startswith(kept) for k in network.state_dict())
    groups, names = network.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert names == (["unet"] if unet_only else ["textencoder"])
    network.save_weights(tmp_path / "part.safetensors", None, None)
    assert all(k.startswith(kept) for k in load_file(str(tmp_path / "part.safetensors")))
    # a full file loads into the partial network: the dropped part is skipped
    full = make_network(*tiny_models())
    full.save_weights(tmp_path / "full.safetensors", None, None)
    network.load_weights(tmp_path / "full.safetensors")


def test_load_weights_rejects_wrong_model(models, tmp_path):
    network = make_network(*models)
    sdxl_like = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0),
    }
    save_file(sdxl_like, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ValueError, match="SDXL") as error:
        network.load_weights(tmp_path / "sdxl.safetensors")
    assert "sdxl.safetensors" in str(error.value) and "lora_unet_input_blocks_4_1" in str(error.value)

    bigger = make_network(*tiny_models(), dim=8)
    bigger.save_weights(tmp_path / "dim8.safetensors", None, None)
    with pytest.raises(ValueError, match=r"ranks differ \(file 8, network 4\)") as error:
        network.load_weights(tmp_path / "dim8.safetensors")
    assert "lora_down.weight has shape [8," in str(error.value)

    with pytest.raises(ValueError, match="name no layer"):
        lora.create_network_from_weights(1.0, tmp_path / "sdxl.safetensors", None, *tiny_models())


def test_max_norm_regularization_caps_norms(models):
    network = make_network(*models)
    randomize_up(network, std=1.0)
    norms = [m.delta_weight().norm().item() for m in network.loras]
    cap = sorted(norms)[len(norms) // 2]
    keys_scaled, mean_norm, max_norm = network.apply_max_norm_regularization(cap, "cpu")
    assert keys_scaled == sum(n > cap for n in norms)
    after = [m.delta_weight().norm().item() for m in network.loras]
    assert max(after) <= cap * (1 + 1e-5) and max_norm == pytest.approx(max(after), rel=1e-5)
    assert mean_norm == pytest.approx(sum(after) / len(after), rel=1e-5)
    for before, now in zip(norms, after):  # small modules are left alone
        if before <= cap:
            assert now == pytest.approx(before, rel=1e-6)


def test_gradient_checkpointing_gives_same_gradients(models):
    """Dropout choices must replay identically when checkpointed blocks recompute."""
    text_encoder, unet = models

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        te, un = copy.deepcopy((text_encoder, unet))
        torch.manual_seed(0)  # same lora_down init in both runs
        network = make_network(te, un, rank_dropout="0.3", module_dropout="0.3", neuron_dropout=None)
        randomize_up(network)
        network.apply_to(te, un, apply_text_encoder=False)
        network.prepare_grad_etc(te, un)
        network.on_epoch_start(te, un)
        un.train()
        if checkpointing:
            un.enable_gradient_checkpointing()
        torch.manual_seed(123)
        run(te, un).square().mean().backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in network.get_trainable_params()]

    plain, checkpointed = grads(False), grads(True)
    assert any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# --- network_args ------------------------------------------------------------------------------


def test_network_args_parsing(models, caplog):
    with pytest.raises(ValueError, match="conv_dim='abc'"):
        make_network(*models, conv_dim="abc")
    with pytest.raises(ValueError, match="rank_dropout"):
        make_network(*models, rank_dropout="1.5")
    with caplog.at_level(logging.WARNING, logger="networks.lora"):
        network = make_network(*models, conv_dim="2", foo="1")
    assert "foo" in caplog.text
    with pytest.raises(ValueError, match="block_dims needs 25 values"):  # block options: tests/test_lora_blocks.py
        make_network(*models, block_dims="1,2")
    conv = getattr(network, "lora_unet_down_blocks_0_resnets_0_conv1")
    assert conv.scale == pytest.approx(1.0 / 2)  # conv_alpha defaults to 1.0
    default = lora.create_network(1.0, None, None, None, *models)
    assert {m.lora_dim for m in default.loras} == {4} and default.loras[0].scale == pytest.approx(1.0 / 4)
    assert make_network(*models, dropout="0.1").loras[0].dropout == pytest.approx(0.1)


def test_attention_variants_match_by_class_hierarchy():
    from transformers.models.clip.modeling_clip import CLIPAttention

    class CLIPFancyAttention(CLIPAttention):
        pass

    config = CLIPTextConfig(hidden_size=8, num_attention_heads=2)
    assert lora._class_matches(CLIPFancyAttention(config), lora.TEXT_ENCODER_TARGET_CLASSES)
