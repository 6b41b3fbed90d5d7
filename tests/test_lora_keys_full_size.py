"""Full-size SD 1.5 / SD 2 / SDXL LoRA key parity with ``reference/lora_keys.json``.

The real architectures are built on the meta device (shapes only, no memory), the network is
created on them, and its state-dict keys and shapes must equal the reference file exactly: these
are the names ComfyUI, A1111/Forge and diffusers look for.
"""

from __future__ import annotations


import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from networks import lora
from tests.reference import load_reference

@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, list[int]]]:
    return load_reference("lora_keys.json")


def sd1_models():
    """SD 1.5: U-Net with the v1-inference config, CLIP ViT-L/14 text encoder."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        ))
    return text_encoder, unet


def sd2_models():
    """SD 2.x 768-v: per-level head dims, 1024 context, conv proj_in as in the LDM checkpoint;
    OpenCLIP ViT-H/14 text tower as HF CLIP with the last layer dropped (23 layers)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=False,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
        ))
    return text_encoder, unet


def sdxl_models():
    """SDXL base: U-Net with the SGM config (per-level transformer depth 0/2/10, Linear projections,
    text_time embedding); CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (all 32 layers, with projection)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        te1 = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        ))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
        ))
    return [te1, te2], unet


def network_shapes(network: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in network.state_dict().items()}


def assert_same_keys(actual: dict[str, list[int]], expected: dict[str, list[int]]) -> None:
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    wrong = sorted((k, actual[k], expected[k]) for k in actual.keys() & expected.keys() if actual[k] != expected[k])
    assert not (missing or extra or wrong), (
        f"missing {len(missing)}: {missing[:10]}\nextra {len(extra)}: {extra[:10]}\nwrong shapes {len(wrong)}: {wrong[:10]}"
    )


@pytest.mark.parametrize(
    "case, models, network_args",
    [
        ("sd1_lora_dim8", sd1_models, {}),
        ("sd1_lora_dim8_conv4", sd1_models, {"conv_dim": "4", "conv_alpha": "1"}),
        ("sd2_lora_dim8", sd2_models, {}),
        ("sdxl_lora_dim8", sdxl_models, {}),
        # only keys and shapes are in the reference; conv_alpha 1 is the default kohya documents
        ("sdxl_lora_dim8_conv4", sdxl_models, {"conv_dim": "4", "conv_alpha": "1"}),
    ],
)
def test_full_size_keys_match_reference(reference, case, models, network_args):
    text_encoder, unet = models()
    network = lora.create_network(1.0, 8, 4, None, text_encoder, unet, **network_args)
    assert_same_keys(network_shapes(network), reference[case])
    # alpha is a 0-dim tensor holding network_alpha (conv_alpha for the 3x3 conv modules)
    for lora_module in network.loras:
        assert lora_module.alpha.dim() == 0
        expected_scale = (1.0 if lora_module.lora_down.weight.dim() == 4 and lora_module.lora_down.weight.shape[-1] == 3 else 4.0) / lora_module.lora_dim
        assert lora_module.scale == pytest.approx(expected_scale), lora_module.lora_name


def test_full_size_from_weights_reproduces_reference(reference):
    """Rank inference from a reference-shaped state dict rebuilds exactly that network."""
    text_encoder, unet = sd1_models()
    with torch.device("meta"):
        weights = {k: torch.empty(v) for k, v in reference["sd1_lora_dim8_conv4"].items()}
    dims, alphas = lora.ranks_from_weights({k: v for k, v in weights.items() if not k.endswith(".alpha")})
    assert set(dims.values()) == {4, 8} and all(alphas[n] == dims[n] for n in dims)
    planned = lora.plan_from_weights(lora.sd_scopes(text_encoder, unet), {k: v for k, v in weights.items() if not k.endswith(".alpha")}, "reference")
    network = lora.LoRANetwork(planned)
    assert_same_keys(network_shapes(network), reference["sd1_lora_dim8_conv4"])


def test_transformers5_path_gets_text_model_level():
    text_encoder, _ = sd1_models()
    scope = lora.sd_scopes(text_encoder, None)[0]
    assert scope.lora_name("encoder.layers.0.self_attn.q_proj") == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert scope.lora_name("text_model.encoder.layers.0.mlp.fc1") == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    several = lora.sd_scopes([text_encoder, text_encoder], None)
    assert [s.prefix for s in several] == ["lora_te1", "lora_te2"]


@pytest.mark.parametrize("case,network_args", [("sd1_lora_dim8", {}),
                                                ("sd1_lora_dim8_conv4", {"conv_dim": "4", "conv_alpha": "1"})])
def test_reference_checkpoint_keys_to_reference_lora_keys(reference, case, network_args):
    """The whole chain users hit, at full size: the keys of a real SD1.5 single file -> our config
    inference -> models on the meta device -> LoRA. Its keys and shapes must be the reference LoRA's."""
    from library.families.sd.checkpoint import infer_text_encoder_shape, infer_unet_shape

    ckpt = {k: torch.empty(shape, device="meta") for k, shape in
            load_reference("checkpoint_keys.json")["sd15_single_file_keys"].items()}
    unet_config = infer_unet_shape(ckpt).diffusers_config(v2=False)
    text_config = CLIPTextConfig(**infer_text_encoder_shape(ckpt).transformers_config())
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        text_encoder = CLIPTextModel(text_config)
        network = lora.create_network(1.0, 8, 4, None, text_encoder, unet, **network_args)
    assert_same_keys(network_shapes(network), reference[case])


def test_sdxl_reference_checkpoint_unet_to_reference_lora_keys(reference):
    """An SDXL single file's U-Net keys -> our shape inference -> U-Net on meta -> LoRA U-Net keys of the reference."""
    from library.families.sd.checkpoint import infer_unet_shape

    ckpt = {k: torch.empty(shape, device="meta") for k, shape in
            load_reference("checkpoint_keys.json")["sdxl_single_file_keys"].items()}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**infer_unet_shape(ckpt).diffusers_config())
        network = lora.create_network(1.0, 8, 4, None, None, unet, conv_dim="4", conv_alpha="1")
    expected = {k: v for k, v in reference["sdxl_lora_dim8_conv4"].items() if k.startswith("lora_unet_")}
    assert_same_keys(network_shapes(network), expected)
    # docs/lora_options.md: without conv only the attention blocks 5, 6, 8, 9, 11 and 13-18 have modules
    attention_only = lora.create_network(1.0, 8, 4, None, None, unet)
    scope = lora.sd_scopes(None, unet)[0]
    assert {scope.block_of(m.lora_name) for m in attention_only.unet_loras} == {5, 6, 8, 9, 11, *range(13, 19)}
    # every module is a layer of the checkpoint under the same (SGM) path
    for module in network.unet_loras:
        path = module.lora_name[len("lora_unet_"):]
        assert any(k.startswith("model.diffusion_model.") and k.endswith(".weight")
                   and k[len("model.diffusion_model."):-len(".weight")].replace(".", "_") == path for k in ckpt), path


def test_sdxl_diffusers_named_reference_loads_as_sgm(reference):
    """The full reference file spelled with diffusers U-Net paths builds exactly the reference network."""
    text_encoders, unet = sdxl_models()
    network = lora.create_network(1.0, 8, 4, None, text_encoders, unet, conv_dim="4", conv_alpha="1")
    path_of = {id(layer): path for path, layer in unet.named_modules()}
    diffusers_name = {m.lora_name: "lora_unet_" + path_of[id(m.org_module)].replace(".", "_") for m in network.unet_loras}
    assert len(set(diffusers_name.values())) == len(diffusers_name)
    assert diffusers_name["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"] == \
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert diffusers_name["lora_unet_output_blocks_2_2_conv"] == "lora_unet_up_blocks_0_upsamplers_0_conv"
    assert diffusers_name["lora_unet_input_blocks_3_0_op"] == "lora_unet_down_blocks_0_downsamplers_0_conv"
    with torch.device("meta"):  # no alpha keys: a meta alpha cannot be read (alpha = rank then)
        weights = {}
        for key, shape in reference["sdxl_lora_dim8_conv4"].items():
            name, _, suffix = key.partition(".")
            if suffix != "alpha":
                weights[f"{diffusers_name.get(name, name)}.{suffix}"] = torch.empty(shape)
    rebuilt, renamed = lora.create_network_from_weights(1.0, None, None, text_encoders, unet, weights_sd=weights)
    assert set(renamed) == {k for k in reference["sdxl_lora_dim8_conv4"] if not k.endswith(".alpha")}
    assert_same_keys(network_shapes(rebuilt), reference["sdxl_lora_dim8_conv4"])
    # the 23-block numbering: with conv every block from input_blocks.1 (2) to output_blocks.8 (21) has modules
    scope = lora.sd_scopes(None, unet)[0]
    assert {scope.block_of(m.lora_name) for m in rebuilt.unet_loras} == set(range(2, 22))
