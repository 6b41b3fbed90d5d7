"""networks.lora on SDXL: SGM module names, the 23-block options, diffusers-named files.

A tiny SDXL-shaped model set (diffusers U-Net with ``addition_embed_type="text_time"``, per-level
transformer depth and Linear projections; CLIP-L-like ``CLIPTextModel`` plus a bigG-like
``CLIPTextModelWithProjection``) with real weights. Full-size key parity is in
``tests/test_lora_keys_full_size.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.families.sd.checkpoint.unet import UNetShape, ldm_module_path
from networks import lora
from networks.lora_blocks import SDXL_LAYOUT, sdxl_unet_block_index
from tests.test_lora_network import randomize_up, tiny_models

# --- tiny SDXL models ----------------------------------------------------------------------------

TE_WIDTH = 32
TIME_EMBED = 8


def tiny_sdxl_models() -> tuple[list[nn.Module], UNet2DConditionModel]:
    """``([te1, te2], unet)`` of an SDXL-shaped set, ~300K parameters.

    Two levels, one resnet per level: level 0 without attention (like SDXL's first), level 1 with
    transformer depth 2 (SDXL's depth > 1), so SGM numbering, the downsampler (``input_blocks.2.0.op``)
    and the upsampler (``output_blocks.1.2.conv``) are all exercised.
    """
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=TE_WIDTH, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    te1 = CLIPTextModel(CLIPTextConfig(**common, hidden_act="quick_gelu"))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, hidden_act="gelu", projection_dim=TE_WIDTH))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=2 * TE_WIDTH,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=TE_WIDTH + 6 * TIME_EMBED, norm_num_groups=8,
    )
    return [te1.eval(), te2.eval()], unet.eval()


INPUT_IDS = torch.tensor([[1, 5, 9, 13, 2, 0, 0, 0], [1, 7, 3, 2, 0, 0, 0, 0]])
TIME_IDS = torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0], [16.0, 8.0, 4.0, 0.0, 8.0, 8.0]])


def run_sdxl(text_encoders: list[nn.Module], unet: nn.Module, seed: int = 0) -> torch.Tensor:
    """One U-Net call conditioned the SDXL way: both encoders' hidden states, te2's pooled output."""
    te1, te2 = text_encoders
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    out2 = te2(INPUT_IDS)
    context = torch.cat([te1(INPUT_IDS).last_hidden_state, out2.last_hidden_state], dim=-1)
    return unet(latents, torch.tensor([10, 500]), encoder_hidden_states=context,
                added_cond_kwargs={"text_embeds": out2.text_embeds, "time_ids": TIME_IDS}).sample


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny ops here are far faster on one thread; with two on a busy machine a forward took 4 s, not 0.07 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def sdxl():
    return tiny_sdxl_models()


def make(models, dim: int = 4, alpha: float = 2, **args) -> lora.LoRANetwork:
    text_encoders, unet = models
    return lora.create_network(1.0, dim, alpha, None, text_encoders, unet, **args)


def block_list(values: dict[int, float], default: float, count: int = 23) -> str:
    return ",".join(str(values.get(i, default)) for i in range(count))


# --- names ---------------------------------------------------------------------------------------

_ATTENTION = ["proj_in", "proj_out"] + [
    f"transformer_blocks_{k}_{part}" for k in range(2) for part in (
        "attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k", "attn2_to_v",
        "attn2_to_out_0", "ff_net_0_proj", "ff_net_2")]
_RESNET = ["in_layers_2", "emb_layers_1", "out_layers_3"]


def expected_tiny_unet_names(conv: bool) -> set[str]:
    """The tiny U-Net's LoRA names, written out from the SGM layout (not computed by the code under test).

    input_blocks: 0 conv_in, 1 level-0 resnet, 2 downsampler, 3 level-1 resnet + attention;
    middle_block: resnet, attention, resnet; output_blocks (deepest first, 2 per level): 0 resnet +
    attention, 1 resnet + attention + upsampler, 2 and 3 resnets. Up resnets all have a skip
    connection (concatenated inputs), down only where the width changes (input_blocks.3).
    """
    attention = ["input_blocks_3_1", "middle_block_1", "output_blocks_0_1", "output_blocks_1_1"]
    names = {f"{block}_{part}" for block in attention for part in _ATTENTION}
    if conv:
        resnets = {"input_blocks_1_0": False, "input_blocks_3_0": True, "middle_block_0": False,
                   "middle_block_2": False, "output_blocks_0_0": True, "output_blocks_1_0": True,
                   "output_blocks_2_0": True, "output_blocks_3_0": True}
        for block, skip in resnets.items():
            names |= {f"{block}_{part}" for part in _RESNET + (["skip_connection"] if skip else [])}
        names |= {"input_blocks_2_0_op", "output_blocks_1_2_conv"}
    return {f"lora_unet_{name}" for name in names}


@pytest.mark.parametrize("conv", [False, True])
def test_unet_names_are_sgm_paths(sdxl, conv):
    network = make(sdxl, **({"conv_dim": "2"} if conv else {}))
    assert {m.lora_name for m in network.unet_loras} == expected_tiny_unet_names(conv)
    # ... and exactly what the checkpoint converter's table says for each adapted layer
    _, unet = sdxl
    to_sgm = ldm_module_path(UNetShape.from_diffusers_config(unet.config))
    path_of = {id(layer): path for path, layer in unet.named_modules()}
    for module in network.unet_loras:
        assert module.lora_name == "lora_unet_" + to_sgm(path_of[id(module.org_module)]).replace(".", "_")
    te_names = {m.lora_name for m in network.text_encoder_loras}
    assert len(te_names) == 2 * 2 * 6
    assert {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te2_text_model_encoder_layers_1_mlp_fc2"} <= te_names
    assert all(n.startswith(("lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"))
               for n in te_names)
    if conv:  # 1x1 convs and the time embedding projection take network_dim, 3x3 convs conv_dim
        ranks = {m.lora_name: m.lora_dim for m in network.unet_loras}
        assert ranks["lora_unet_input_blocks_3_0_skip_connection"] == 4
        assert ranks["lora_unet_input_blocks_3_0_emb_layers_1"] == 4
        assert ranks["lora_unet_input_blocks_2_0_op"] == ranks["lora_unet_output_blocks_1_2_conv"] == 2


def test_sd_unet_keeps_diffusers_names():
    """The naming is decided by the U-Net's config: the SD tiny U-Net is unchanged."""
    text_encoder, unet = tiny_models()
    assert not lora.is_sdxl_unet(unet) and lora.is_sdxl_unet(tiny_sdxl_models()[1])
    network = lora.create_network(1.0, 4, 2, None, text_encoder, unet)
    assert all(m.lora_name.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_",
                                       "lora_te_")) for m in network.loras)
    assert network.name_aliases == {}


def test_sdxl_block_index_table():
    cases = {"time_embed.0": 0, "label_emb.0.2": 0, "input_blocks.0.0": 1, "input_blocks.3.0.op": 4,
             "input_blocks.8.1.proj_in": 9, "middle_block.0.in_layers.2": 10, "middle_block.1.proj_in": 11,
             "middle_block.2.emb_layers.1": 12, "output_blocks.0.0.skip_connection": 13,
             "output_blocks.2.2.conv": 15, "output_blocks.8.1.proj_out": 21, "out.2": 22,
             "down_blocks.1.attentions.0": None, "conv_in": None}
    for path, block in cases.items():
        assert sdxl_unet_block_index(path) == block, path
        assert sdxl_unet_block_index("lora_unet_" + path.replace(".", "_")) == block, path
    assert SDXL_LAYOUT.num_blocks == 23


# --- block options -------------------------------------------------------------------------------

def test_block_dims_23_values_set_ranks_per_block(sdxl):
    # tiny U-Net blocks: 2 input_blocks.1, 3 input_blocks.2 (op), 4 input_blocks.3, 10..12 middle, 13..16 output
    ranks = {4: 2, 11: 0, 13: 3, 14: 5}
    conv_ranks = {3: 1, 15: 0}
    network = make(sdxl, block_dims=block_list(ranks, 4), block_alphas=block_list({13: 1.5}, 2),
                   conv_block_dims=block_list(conv_ranks, 2))
    modules = {m.lora_name: m for m in network.unet_loras}
    assert not any(n.startswith("lora_unet_middle_block_1_") for n in modules)  # rank 0: no modules
    assert not any(n.startswith("lora_unet_output_blocks_2_0_") and "_layers_" in n and "emb" not in n
                   for n in modules)  # conv rank 0 in block 15: its 3x3 convs are gone ...
    assert modules["lora_unet_output_blocks_2_0_emb_layers_1"].lora_dim == 4  # ... its Linear stays
    assert {modules[n].lora_dim for n in modules if n.startswith("lora_unet_input_blocks_3_1_")} == {2}
    assert {modules[n].lora_dim for n in modules if n.startswith("lora_unet_output_blocks_0_1_")} == {3}
    assert {modules[n].scale for n in modules if n.startswith("lora_unet_output_blocks_0_1_")} == {0.5}
    assert {modules[n].lora_dim for n in modules if n.startswith("lora_unet_output_blocks_1_1_")} == {5}
    assert modules["lora_unet_input_blocks_2_0_op"].lora_dim == 1
    assert modules["lora_unet_input_blocks_1_0_in_layers_2"].lora_dim == 2
    assert all(m.lora_dim == 4 for m in network.text_encoder_loras)  # text encoders are not in blocks


def test_block_value_counts_follow_the_unet(sdxl):
    with pytest.raises(ValueError, match=r"block_dims needs 23 values for SDXL \(base, 9 input, 3 middle, 9 output, "
                                         r"out\), got 25 \(25 values is the SD 1.x/2.x layout"):
        make(sdxl, block_dims=",".join(["4"] * 25))
    text_encoder, unet = tiny_models()
    with pytest.raises(ValueError, match=r"block_dims needs 25 values for SD 1.x/2.x .*got 23 \(23 values is the SDXL"):
        lora.create_network(1.0, 4, 2, None, text_encoder, unet, block_dims=",".join(["4"] * 23))


def test_lr_weights_9_3_9_make_block_groups(sdxl):
    down = [0.1 * (i + 1) for i in range(9)]
    network = make(sdxl, conv_dim="2", down_lr_weight=",".join(map(str, down)), mid_lr_weight="1.5,0,2.5",
                   up_lr_weight="linear+0.5")
    # middle_block.1 (block 11) has weight 0: not created
    assert not any(m.lora_name.startswith("lora_unet_middle_block_1_") for m in network.unet_loras)
    params, names = network.prepare_optimizer_params([5e-5, 6e-5], 1e-4, 1e-3)
    weights = [1.0] + down + [1.5, 0.0, 2.5] + [0.5 + i / 8 for i in range(9)] + [1.0]
    blocks = [2, 3, 4, 10, 12, 13, 14, 15, 16]
    assert names == ["textencoder1", "textencoder2"] + [f"unet_block{b}" for b in blocks]
    lrs = {name: group["lr"] for group, name in zip(params, names)}
    assert lrs["textencoder1"] == 5e-5 and lrs["textencoder2"] == 6e-5
    for b in blocks:
        assert lrs[f"unet_block{b}"] == pytest.approx(1e-4 * weights[b]), b
    assert sum(len(g["params"]) for g in params) == len(list(network.parameters()))


def test_lr_weight_zero_removes_the_block_and_presets_have_9_values(sdxl):
    network = make(sdxl, down_lr_weight="zeros", up_lr_weight="cosine", block_lr_zero_threshold="0.5")
    cosine = [math.cos(math.pi / 2 * i / 8) for i in range(9)]
    up = [w if w > 0.5 else 0.0 for w in cosine]
    assert network.block_lr_weights == pytest.approx([1.0] + [0.0] * 9 + [1.0] * 3 + up + [1.0])
    names = {m.lora_name for m in network.unet_loras}
    assert not any(n.startswith("lora_unet_input_blocks_") for n in names)  # down weights 0: no modules
    _, groups = network.prepare_optimizer_params(None, 1e-4, None)
    # the tiny U-Net's attention lives in blocks 4 (input), 11 (middle), 13 and 14 (output)
    assert groups == ["textencoder", "unet_block11", "unet_block13", "unet_block14"]


# --- diffusers-named SDXL files ------------------------------------------------------------------

def diffusers_named(weights: dict[str, torch.Tensor], network: lora.LoRANetwork, unet: nn.Module) -> dict[str, torch.Tensor]:
    """The same LoRA with U-Net modules named by their diffusers paths (how some tools save SDXL LoRAs)."""
    path_of = {id(layer): path for path, layer in unet.named_modules()}
    rename = {m.lora_name: "lora_unet_" + path_of[id(m.org_module)].replace(".", "_") for m in network.unet_loras}
    renamed = {}
    for key, value in weights.items():
        name, _, suffix = key.partition(".")
        renamed[f"{rename.get(name, name)}.{suffix}"] = value
    return renamed


@pytest.fixture
def saved_sdxl_lora(sdxl, tmp_path):
    """An SGM-named SDXL LoRA with random up weights, its diffusers-named copy, and the output it gives."""
    text_encoders, unet = sdxl
    network = make(sdxl, conv_dim="2", conv_alpha="1")
    randomize_up(network)
    sgm = tmp_path / "sgm.safetensors"
    network.save_weights(sgm, None, None)
    weights = load_file(str(sgm))
    diffusers = diffusers_named(weights, network, unet)
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k") for k in diffusers)
    assert not any(k.startswith("lora_unet_input_blocks") for k in diffusers)
    save_file(diffusers, str(tmp_path / "diffusers.safetensors"))
    network.apply_to(text_encoders, unet)
    with torch.no_grad():
        expected = run_sdxl(text_encoders, unet)
    return sgm, tmp_path / "diffusers.safetensors", weights, expected


def test_diffusers_named_file_loads_with_load_weights(saved_sdxl_lora):
    sgm, diffusers, weights, expected = saved_sdxl_lora
    models = tiny_sdxl_models()
    with torch.no_grad():
        plain = run_sdxl(*models)
    assert not torch.allclose(plain, expected, atol=1e-4)
    network = make(models, conv_dim="2", conv_alpha="1")
    network.load_weights(diffusers)
    for key, value in weights.items():  # every module, in the SGM names
        assert torch.equal(network.state_dict()[key], value), key
    network.apply_to(*models)
    with torch.no_grad():
        torch.testing.assert_close(run_sdxl(*models), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["sgm", "diffusers"])
def test_create_network_from_weights_and_merge(saved_sdxl_lora, which, tmp_path):
    sgm, diffusers, weights, expected = saved_sdxl_lora
    path = sgm if which == "sgm" else diffusers
    models = tiny_sdxl_models()
    network, weights_sd = lora.create_network_from_weights(1.0, path, None, *models)
    assert set(weights_sd) == set(weights)  # returned with the file-format (SGM) names
    network.apply_to(*models)
    with torch.no_grad():
        torch.testing.assert_close(run_sdxl(*models), expected, atol=1e-5, rtol=1e-4)
    network.save_weights(tmp_path / "again.safetensors", None, None)  # saving always writes SGM names
    assert set(load_file(str(tmp_path / "again.safetensors"))) == set(weights)

    merged = tiny_sdxl_models()
    merge_net, _ = lora.create_network_from_weights(1.0, path, None, *merged, for_inference=True)
    merge_net.merge_to(*merged, load_file(str(path)), torch.float32, "cpu")  # the file's own names
    with torch.no_grad():
        torch.testing.assert_close(run_sdxl(*merged), expected, atol=1e-5, rtol=1e-4)


def test_module_in_both_spellings_is_an_error(saved_sdxl_lora, sdxl):
    sgm, diffusers, weights, _ = saved_sdxl_lora
    both = dict(load_file(str(diffusers)))
    key = "lora_unet_input_blocks_3_1_proj_in.lora_down.weight"
    both[key] = weights[key]
    with pytest.raises(ValueError, match=r"same module \(lora_unet_input_blocks_3_1_proj_in\) in two spellings"):
        lora.create_network_from_weights(1.0, None, None, *copy.deepcopy(sdxl), weights_sd=both)


def test_unet_keys_matching_neither_naming_are_a_clear_error(sdxl, tmp_path):
    sd_text_encoder, sd_unet = tiny_models()
    sd_network = lora.create_network(1.0, 4, 2, None, sd_text_encoder, sd_unet)
    unet_only = {k: v for k, v in sd_network.state_dict().items() if k.startswith("lora_unet_")}
    save_file(unet_only, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(ValueError, match=r"sd1.safetensors: .* name no layer of the loaded models") as error:
        lora.create_network_from_weights(1.0, tmp_path / "sd1.safetensors", None, *sdxl)
    message = str(error.value)
    assert "lora_unet_down_blocks_0_attentions_0" in message and "an SD-style (context width 16) LoRA" in message
    assert "lora_unet_input_blocks_3_1_proj_in" in message  # what this model's names look like

    network = make(sdxl)
    with pytest.raises(ValueError, match=r"sd1.safetensors: .* match no module .* this network's own keys look like "
                                         r"an SDXL LoRA"):
        network.load_weights(tmp_path / "sd1.safetensors")


def test_diagnostics_recognise_diffusers_named_sdxl(sdxl):
    from networks.lora_diagnostics import guess_lora_kind

    assert guess_lora_kind({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
                            torch.zeros(4, 2048)}).startswith("an SDXL LoRA with diffusers module names")
    assert guess_lora_kind({"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 640),
                            "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}
                           ).startswith("an SDXL LoRA with diffusers module names")
    assert guess_lora_kind(make(sdxl).state_dict()) == "an SDXL LoRA"
