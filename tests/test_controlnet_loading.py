"""ControlNet files: Diffusers folders and files, original-layout files through diffusers' converter, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file, save_file

from library.controlnet.loading import controlnet_config, controlnet_from_unet, load_controlnet
from library.controlnet.saving import save_controlnet
from library.demo.tiny_sd import build_tiny_sd, randomize_
from library.demo.tiny_sdxl import build_tiny_sdxl
from library.families.sd.checkpoint.common import CheckpointError
from library.families.sd.checkpoint.unet import UNetShape, unet_diffusers_to_ldm


@pytest.fixture(scope="module")
def unets():
    return {"sd1": build_tiny_sd(False).unet, "sd2": build_tiny_sd(True).unet, "sdxl": build_tiny_sdxl().unet}


def random_controlnet(unet, seed: int = 11) -> ControlNetModel:
    """A ControlNet for ``unet`` with every weight random (zero convolutions too), so a misplaced key shows."""
    return randomize_(ControlNetModel.from_unet(unet), seed)


def to_original(controlnet: ControlNetModel, unet, *, prefix: str = "control_model.",
                linear_projection: bool | None = None) -> dict[str, torch.Tensor]:
    """The original (lllyasviel/LDM) layout of ``controlnet``: the U-Net encoder through our U-Net key map,
    the hint block, zero convolutions and middle output by their original names."""
    state = controlnet.state_dict()
    shape = UNetShape.from_diffusers_config(unet.config, stored_linear_projection=linear_projection)
    out = unet_diffusers_to_ldm({k: v for k, v in state.items() if not k.startswith("controlnet_")}, shape, prefix="")
    emb = "controlnet_cond_embedding."
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith(emb + "blocks.")})
    hint = {0: emb + "conv_in", **{2 * (i + 1): f"{emb}blocks.{i}" for i in blocks}, 14: emb + "conv_out"}
    for index, name in hint.items():
        for p in ("weight", "bias"):
            out[f"input_hint_block.{index}.{p}"] = state[f"{name}.{p}"]
    for i in sorted({int(k.split(".")[1]) for k in state if k.startswith("controlnet_down_blocks.")}):
        for p in ("weight", "bias"):
            out[f"zero_convs.{i}.0.{p}"] = state[f"controlnet_down_blocks.{i}.{p}"]
    for p in ("weight", "bias"):
        out[f"middle_block_out.0.{p}"] = state[f"controlnet_mid_block.{p}"]
    return {prefix + k: v.contiguous() for k, v in out.items()}


def outputs(controlnet, unet, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    image = torch.rand(2, 3, 64, 64, generator=g)
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        down, mid = controlnet(x, torch.tensor([10, 700]), ctx, image, added_cond_kwargs=added, return_dict=False)
    return [*down, mid]


def assert_same(a: ControlNetModel, b: ControlNetModel):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_config_from_unet_and_weights_is_the_one_from_unet_gives(unets, kind):
    unet = unets[kind]
    controlnet = ControlNetModel.from_unet(unet)
    inferred = controlnet_config(unet.config, controlnet.state_dict())
    for key, value in inferred.items():
        theirs = controlnet.config[key]
        assert (tuple(value) == tuple(theirs)) if isinstance(value, (list, tuple)) else value == theirs, key


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_diffusers_layout_file_and_folder_round_trip(unets, kind, tmp_path):
    unet = unets[kind]
    controlnet = random_controlnet(unet)
    save_controlnet(controlnet, tmp_path / "cn.safetensors", metadata={"modelspec.title": "x"})
    save_controlnet(controlnet, tmp_path / "cn.ckpt", fmt="ckpt")
    save_controlnet(controlnet, tmp_path / "folder", fmt="diffusers")
    for path in (tmp_path / "cn.safetensors", tmp_path / "cn.ckpt", tmp_path / "folder"):
        assert_same(load_controlnet(path, unet), controlnet)
    theirs = ControlNetModel.from_pretrained(str(tmp_path / "folder"), local_files_only=True)
    assert_same(theirs, controlnet)
    # A pipeline folder with its ControlNet in controlnet/, and an fp16 file read back as float32.
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "folder").rename(tmp_path / "pipeline" / "controlnet")
    assert_same(load_controlnet(tmp_path / "pipeline", unet), controlnet)
    save_controlnet(controlnet, tmp_path / "half.safetensors", dtype=torch.float16)
    half = load_controlnet(tmp_path / "half.safetensors", unet)
    assert next(half.parameters()).dtype == torch.float32
    assert all(torch.equal(v, controlnet.state_dict()[k].half().float()) for k, v in half.state_dict().items())


@pytest.mark.parametrize("kind,prefix", [("sd1", "control_model."), ("sd1", ""), ("sdxl", "control_model.")])
def test_original_layout_converted_with_diffusers_converter_matches_the_model(unets, kind, prefix, tmp_path):
    unet = unets[kind]
    controlnet = random_controlnet(unet, seed=5)
    original = to_original(controlnet, unet, prefix=prefix)
    assert any(k.endswith("input_hint_block.14.weight") for k in original)
    if kind == "sdxl":
        assert prefix + "label_emb.0.0.weight" in original  # the part diffusers' converter leaves out
    # cldm files hold the whole SD model next to control_model.*: only the ControlNet is read
    extra = {"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)} if prefix else {}
    torch.save({"state_dict": {**original, **extra}}, tmp_path / "control_sd15_tiny.pth")
    loaded = load_controlnet(tmp_path / "control_sd15_tiny.pth", unet)
    assert_same(loaded, controlnet)
    for a, b in zip(outputs(loaded, unet), outputs(controlnet, unet)):
        assert torch.equal(a, b)


def test_sd2_original_file_with_linear_projections(unets, tmp_path):
    unet = unets["sd2"]
    controlnet = random_controlnet(unet, seed=3)
    original = to_original(controlnet, unet, linear_projection=True)
    assert original["control_model.input_blocks.1.1.proj_in.weight"].ndim == 2
    save_file(original, str(tmp_path / "cn_sd21.safetensors"))
    loaded = load_controlnet(tmp_path / "cn_sd21.safetensors", unet)
    assert loaded.config.use_linear_projection
    for a, b in zip(outputs(loaded, unet), outputs(controlnet, unet)):
        assert torch.allclose(a, b, atol=1e-5)


def test_pruned_controlnet_with_fewer_transformer_blocks_loads(unets, tmp_path):
    unet = unets["sdxl"]  # transformer_layers_per_block (1, 2)
    config = {**ControlNetModel.from_unet(unet).config, "transformer_layers_per_block": (1, 1)}
    pruned = randomize_(ControlNetModel.from_config(config), 2)
    save_controlnet(pruned, tmp_path / "small.safetensors")
    loaded = load_controlnet(tmp_path / "small.safetensors", unet)
    assert tuple(loaded.config.transformer_layers_per_block) == (1, 1)
    assert_same(loaded, pruned)


def test_new_controlnet_adds_nothing_until_trained(unets):
    unet = unets["sd1"]
    controlnet = controlnet_from_unet(unet)
    assert all(torch.count_nonzero(r) == 0 for r in outputs(controlnet, unet))
    assert torch.equal(controlnet.state_dict()["down_blocks.0.resnets.0.conv1.weight"],
                       unet.state_dict()["down_blocks.0.resnets.0.conv1.weight"])


def test_files_that_are_no_controlnet_for_this_model_are_refused(unets, tmp_path):
    sd1, sdxl = unets["sd1"], unets["sdxl"]
    save_controlnet(random_controlnet(sd1), tmp_path / "sd1_cn.safetensors")
    with pytest.raises(CheckpointError, match="another base model|does not fit"):
        load_controlnet(tmp_path / "sd1_cn.safetensors", sdxl)
    save_file({"lllite_unet_input_blocks_4_1_proj_in.down.weight": torch.zeros(4, 4)}, str(tmp_path / "lllite.safetensors"))
    with pytest.raises(CheckpointError, match="LLLite"):
        load_controlnet(tmp_path / "lllite.safetensors", sdxl)
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(tmp_path / "sd.safetensors", sd1)
    (tmp_path / "torn.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_controlnet(tmp_path / "torn.safetensors", sd1)
    with pytest.raises(CheckpointError, match="no such file"):
        load_controlnet(tmp_path / "missing.safetensors", sd1)
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_controlnet(tmp_path / "empty_folder", sd1)


def test_saved_file_is_the_diffusers_state_dict_with_metadata(unets, tmp_path):
    controlnet = random_controlnet(unets["sd1"])
    save_controlnet(controlnet, tmp_path / "cn.safetensors", dtype=torch.bfloat16, metadata={"modelspec.title": "t"})
    saved = load_file(str(tmp_path / "cn.safetensors"))
    assert saved.keys() == controlnet.state_dict().keys()
    assert all(v.dtype == torch.bfloat16 for v in saved.values())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cn.safetensors"), "pt") as f:
        assert f.metadata() == {"modelspec.title": "t"}
    assert not list(Path(tmp_path).glob("*.tmp*"))
