"""Per-block LoRA options (block dims/alphas, block lr weights), max-norm, and --base_weights."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import networks.lora as lora
from library.args import ArgumentError
from library.training.network_extras import MaxNormLog, base_weight_multipliers, merge_base_weights
from networks.lora_blocks import lr_weight_preset, parse_block_options, parse_lr_weights, sd_unet_block_index
from networks.lora_network import LoRANetwork, PlannedModule
from tests.reference import load_reference
from tests.test_lora_keys_full_size import sd1_models
from tests.test_lora_network import randomize_up, run, tiny_models


@pytest.fixture(scope="module")
def full_sd1():
    return sd1_models()


def block_list(values: dict[int, float], default: float) -> str:
    return ",".join(str(values.get(i, default)) for i in range(25))


# --- block numbering ---------------------------------------------------------------------------

# Written out by hand from the LDM layout (input_blocks.0 = conv_in, 2 resnet(+attn) blocks and a
# downsampler per level, middle_block, 3 resnet(+attn) blocks per level on the way up with the
# upsampler in the level's last block), not computed with the formula under test.
EXPECTED_SD1_BLOCKS = {
    "conv_in": 0,
    "down_blocks.0.resnets.0": 1, "down_blocks.0.attentions.0": 1, "down_blocks.0.resnets.1": 2,
    "down_blocks.0.attentions.1": 2, "down_blocks.0.downsamplers.0": 3,
    "down_blocks.1.resnets.0": 4, "down_blocks.1.attentions.0": 4, "down_blocks.1.resnets.1": 5,
    "down_blocks.1.attentions.1": 5, "down_blocks.1.downsamplers.0": 6,
    "down_blocks.2.resnets.0": 7, "down_blocks.2.attentions.0": 7, "down_blocks.2.resnets.1": 8,
    "down_blocks.2.attentions.1": 8, "down_blocks.2.downsamplers.0": 9,
    "down_blocks.3.resnets.0": 10, "down_blocks.3.resnets.1": 11,
    "mid_block.resnets.0": 12, "mid_block.attentions.0": 12, "mid_block.resnets.1": 12,
    "up_blocks.0.resnets.0": 13, "up_blocks.0.resnets.1": 14, "up_blocks.0.resnets.2": 15,
    "up_blocks.0.upsamplers.0": 15,
    "up_blocks.1.resnets.0": 16, "up_blocks.1.attentions.0": 16, "up_blocks.1.resnets.1": 17,
    "up_blocks.1.attentions.1": 17, "up_blocks.1.resnets.2": 18, "up_blocks.1.attentions.2": 18,
    "up_blocks.1.upsamplers.0": 18,
    "up_blocks.2.resnets.0": 19, "up_blocks.2.attentions.0": 19, "up_blocks.2.resnets.1": 20,
    "up_blocks.2.attentions.1": 20, "up_blocks.2.resnets.2": 21, "up_blocks.2.attentions.2": 21,
    "up_blocks.2.upsamplers.0": 21,
    "up_blocks.3.resnets.0": 22, "up_blocks.3.attentions.0": 22, "up_blocks.3.resnets.1": 23,
    "up_blocks.3.attentions.1": 23, "up_blocks.3.resnets.2": 24, "up_blocks.3.attentions.2": 24,
    "conv_out": None, "conv_norm_out": None, "time_embedding": None,
}


def test_block_index_of_every_full_size_sd1_module(full_sd1):
    _, unet = full_sd1
    containers = {}
    for path, _ in unet.named_modules():
        parts = path.split(".")
        head = ".".join(parts[:4]) if parts[0] in ("down_blocks", "up_blocks") else (
            ".".join(parts[:3]) if parts[0] == "mid_block" else parts[0])
        if head in EXPECTED_SD1_BLOCKS:
            containers.setdefault(head, []).append(path)
    assert containers.keys() == EXPECTED_SD1_BLOCKS.keys(), "the table must cover every SD1 U-Net container"
    for head, paths in containers.items():
        for path in paths:  # every module inside the container, at any depth, in both spellings
            assert sd_unet_block_index(path) == EXPECTED_SD1_BLOCKS[head], path
            assert sd_unet_block_index("lora_unet_" + path.replace(".", "_")) == EXPECTED_SD1_BLOCKS[head], path
    # the default network (with conv) uses blocks 1..24: block 0 (conv_in) has no target
    network = lora.create_network(1.0, 8, 4, None, None, unet, conv_dim="4")
    blocks = {lora.sd_scopes(None, unet)[0].block_of(m.lora_name) for m in network.unet_loras}
    assert blocks == set(range(1, 25))


def test_tiny_two_level_unet_uses_its_ldm_block_numbers():
    """layers_per_block=1: input 0 conv_in, 1 level-0 resnet+attn, 2 downsampler, 3 level-1 resnet."""
    assert [sd_unet_block_index(p, 1) for p in
            ("conv_in", "down_blocks.0.attentions.0.proj_in", "down_blocks.0.downsamplers.0.conv",
             "down_blocks.1.resnets.0.conv1", "mid_block.attentions.0.proj_out",
             "up_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.1.conv2", "up_blocks.0.upsamplers.0.conv",
             "up_blocks.1.attentions.0.proj_in", "up_blocks.1.attentions.1.proj_in")] == [0, 1, 2, 3, 12, 13, 14, 14, 15, 16]


# --- block dims --------------------------------------------------------------------------------

def test_block_dims_set_ranks_and_rank_zero_blocks_have_no_modules(full_sd1):
    text_encoder, unet = full_sd1
    ranks = {i: (i % 4) * 4 for i in range(25)}  # 0, 4, 8, 12, 0, 4, ...: every 4th block absent
    alphas = {i: float(i) + 0.5 for i in range(25)}
    network = lora.create_network(1.0, 8, 4, None, text_encoder, unet,
                                  block_dims=block_list(ranks, 0), block_alphas=block_list(alphas, 0))
    scope = lora.sd_scopes(None, unet)[0]
    keys = network.state_dict().keys()
    reference = load_reference("lora_keys.json")["sd1_lora_dim8"]
    assert keys <= reference.keys()
    assert len(network.text_encoder_loras) == 72 and all(m.lora_dim == 8 for m in network.text_encoder_loras)
    seen_blocks = set()
    for module in network.unet_loras:
        block = scope.block_of(module.lora_name)
        seen_blocks.add(block)
        assert module.lora_dim == ranks[block] and module.scale == pytest.approx(alphas[block] / ranks[block])
    assert seen_blocks and all(ranks[b] for b in seen_blocks)
    # every reference U-Net module of a non-zero block exists: nothing else went missing
    expected = {k for k in reference if k.startswith("lora_unet_") and ranks[scope.block_of(k.partition(".")[0])]}
    assert expected <= keys


def test_conv_block_dims_add_conv_modules_per_block(full_sd1):
    _, unet = full_sd1
    conv_ranks = {i: 2 for i in range(13, 25)}  # convs only on the way up
    network = lora.create_network(1.0, 8, 4, None, None, unet, conv_block_dims=block_list(conv_ranks, 0))
    scope = lora.sd_scopes(None, unet)[0]
    reference = load_reference("lora_keys.json")["sd1_lora_dim8_conv4"]
    assert network.state_dict().keys() <= reference.keys()
    convs = [m for m in network.unet_loras if m.lora_down.weight.dim() == 4 and m.lora_down.weight.shape[-1] == 3]
    assert convs and all(scope.block_of(m.lora_name) >= 13 and m.lora_dim == 2 and m.scale == 0.5 for m in convs)
    assert any("down_blocks_1_resnets_0_conv1" in m.lora_name for m in network.unet_loras) is False


def test_block_option_errors_name_the_arg_and_the_fix():
    with pytest.raises(ValueError, match=r"block_dims needs 25 values for SD 1.x/2.x .*got 12"):
        parse_block_options({"block_dims": ",".join(["4"] * 12)}, 4, 1.0, None, None)
    with pytest.raises(ValueError, match=r"conv_block_alphas: 'x' is not a number"):
        parse_block_options({"conv_block_alphas": ",".join(["x"] * 25)}, 4, 1.0, None, None)
    with pytest.raises(ValueError, match=r"up_lr_weight='wavy'.*cosine, sine"):
        parse_lr_weights("wavy", 12, "up_lr_weight")
    with pytest.raises(ValueError, match=r"mid_lr_weight.*needs at least 2 blocks"):
        parse_lr_weights("cosine", 1, "mid_lr_weight")


# --- block lr weights --------------------------------------------------------------------------

@pytest.mark.parametrize("name, base", [("cosine", 0.0), ("sine", 0.0), ("linear", 0.0), ("reverse_linear", 0.0),
                                        ("zeros", 0.0), ("sine", 0.5), ("zeros", 1.0)])
def test_lr_weight_presets_against_closed_forms(name, base):
    t = torch.linspace(0, 1, 12, dtype=torch.float64)
    closed = {"cosine": torch.cos(t * math.pi / 2), "sine": torch.sin(t * math.pi / 2), "linear": t,
              "reverse_linear": t.flip(0), "zeros": torch.zeros(12, dtype=torch.float64)}[name] + base
    spelled = name if base == 0 else f"{name}+{base}"
    assert lr_weight_preset(spelled, 12) == pytest.approx(closed.tolist(), abs=1e-12)
    assert parse_lr_weights(spelled, 12, "down_lr_weight") == pytest.approx(closed.tolist(), abs=1e-12)


def test_lr_weight_lists_are_padded_and_cut():
    assert parse_lr_weights("0.5, 0.25", 12, "down_lr_weight") == [0.5, 0.25] + [1.0] * 10
    assert parse_lr_weights("2", 1, "mid_lr_weight") == [2.0]
    assert parse_lr_weights(",".join(["0.1"] * 14), 12, "up_lr_weight") == [0.1] * 12
    assert parse_lr_weights(None, 12, "up_lr_weight") is None


def groups_by_name(params, names) -> dict[str, tuple[float, int]]:
    return {name: (group["lr"], len(group["params"])) for group, name in zip(params, names)}


def test_block_lr_groups_and_loraplus(full_sd1):
    text_encoder, unet = full_sd1
    down = [0.1 * (i + 1) for i in range(12)]
    network = lora.create_network(1.0, 8, 4, None, text_encoder, unet, down_lr_weight=",".join(map(str, down)),
                                  mid_lr_weight="2", up_lr_weight="linear+1", loraplus_unet_lr_ratio="16")
    params, names = network.prepare_optimizer_params(5e-5, 1e-4, 1e-3)
    groups = groups_by_name(params, names)
    up = [1 + i / 11 for i in range(12)]
    weights = down + [2.0] + up
    assert names[0] == "textencoder" and groups["textencoder"][0] == 5e-5
    # attention modules live in blocks 1,2,4,5,7,8 down, 12 mid, 16..24 up (no conv_dim: no resnet modules)
    blocks = [1, 2, 4, 5, 7, 8, 12] + list(range(16, 25))
    assert names[1:] == [n for b in blocks for n in (f"unet_block{b}", f"unet_block{b} plus")]
    for b in blocks:
        assert groups[f"unet_block{b}"][0] == pytest.approx(1e-4 * weights[b])
        assert groups[f"unet_block{b} plus"][0] == pytest.approx(1e-4 * weights[b] * 16)
        assert groups[f"unet_block{b}"][1] == groups[f"unet_block{b} plus"][1]  # one down, one up per module
    assert sum(len(g["params"]) for g in params) == len(list(network.parameters()))
    # without --unet_lr the blocks scale the default lr
    params, names = network.prepare_optimizer_params(None, None, 1e-3)
    assert groups_by_name(params, names)["unet_block12"][0] == pytest.approx(2e-3)


def test_zero_threshold_removes_blocks(full_sd1):
    _, unet = full_sd1
    network = lora.create_network(1.0, 8, 4, None, None, unet, down_lr_weight="cosine", up_lr_weight="zeros",
                                  block_lr_zero_threshold="0.5")
    scope = lora.sd_scopes(None, unet)[0]
    cosine = [math.cos(math.pi / 2 * i / 11) for i in range(12)]
    kept_down = {i for i in range(12) if cosine[i] > 0.5}
    assert {scope.block_of(m.lora_name) for m in network.unet_loras} == (kept_down & {1, 2, 4, 5, 7, 8}) | {12}
    _, names = network.prepare_optimizer_params(None, 1e-4, 1e-3)
    assert names == [f"unet_block{b}" for b in sorted((kept_down & {1, 2, 4, 5, 7, 8}) | {12})]


def test_block_options_on_the_tiny_unet_follow_its_ldm_numbers():
    text_encoder, unet = tiny_models()
    ranks = {1: 2, 12: 0, 15: 4, 16: 8}
    network = lora.create_network(1.0, 3, 1, None, text_encoder, unet, block_dims=block_list(ranks, 3))
    by_prefix = {m.lora_name: m.lora_dim for m in network.unet_loras}
    assert not any("mid_block" in n for n in by_prefix)
    assert {d for n, d in by_prefix.items() if "down_blocks_0_attentions_0" in n} == {2}
    assert {d for n, d in by_prefix.items() if "up_blocks_1_attentions_0" in n} == {4}
    assert {d for n, d in by_prefix.items() if "up_blocks_1_attentions_1" in n} == {8}


# --- max-norm ----------------------------------------------------------------------------------

def test_max_norm_caps_without_sync_and_logs_in_blocks():
    torch.manual_seed(0)
    layers = [nn.Linear(6, 5) for _ in range(4)]
    network = LoRANetwork([PlannedModule(f"lora_unet_l{i}", layer, 2, 1.0) for i, layer in enumerate(layers)])
    with torch.no_grad():
        for i, module in enumerate(network.loras):
            module.lora_up.weight.normal_(std=0.5 * (i + 1))
    before = [m.delta_weight().norm().item() for m in network.loras]
    cap = sorted(before)[1] + 1e-3
    result = network.apply_max_norm_regularization(cap, "cpu")
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in result)  # converted only when logged
    after = [m.delta_weight().norm().item() for m in network.loras]
    for b, a in zip(before, after):
        assert a == pytest.approx(min(b, cap), rel=1e-5)

    logged = []
    log = MaxNormLog(lambda values, step: logged.append((step, values)), flush_every=2)
    log.add(result, 1)
    assert not logged
    log.add((0, 0.5, 0.75), 2)  # plain numbers from another network module
    log.add(result, 3)
    log.flush()
    assert [s for s, _ in logged] == [1, 2, 3]
    first = logged[0][1]
    assert first["max_norm/keys_scaled"] == 2
    assert first["max_norm/average_key_norm"] == pytest.approx(sum(after) / 4, rel=1e-5)
    assert first["max_norm/max_key_norm"] == pytest.approx(max(after), rel=1e-5)
    assert logged[1][1] == {"max_norm/keys_scaled": 0, "max_norm/average_key_norm": 0.5, "max_norm/max_key_norm": 0.75}


# --- base weights ------------------------------------------------------------------------------

def test_base_weights_merge_equals_applying_the_lora(tmp_path):
    text_encoder, unet = tiny_models()
    source = lora.create_network(1.0, 4, 2, None, text_encoder, unet, conv_dim="2")
    randomize_up(source)
    source.save_weights(tmp_path / "base.safetensors", None, None)

    applied_te, applied_unet = tiny_models()
    net, _ = lora.create_network_from_weights(0.7, tmp_path / "base.safetensors", None, applied_te, applied_unet)
    net.apply_to(applied_te, applied_unet)
    net.eval()
    with torch.no_grad():
        expected = run(applied_te, applied_unet)

    merged_te, merged_unet = tiny_models()
    with torch.no_grad():
        plain = run(merged_te, merged_unet)
    merge_base_weights(lora, [str(tmp_path / "base.safetensors")], [0.7], None, merged_te, merged_unet)
    with torch.no_grad():
        merged = run(merged_te, merged_unet)
    assert not torch.allclose(plain, expected, atol=1e-3)
    torch.testing.assert_close(merged, expected, atol=2e-5, rtol=1e-4)


def test_base_weights_errors(tmp_path):
    assert base_weight_multipliers(["a", "b"], [0.5]) == [0.5, 1.0]
    with pytest.raises(ArgumentError, match="--base_weights_multiplier has 2 values"):
        base_weight_multipliers(["a"], [0.5, 1.0])
    text_encoder, unet = tiny_models()
    other = nn.Module()
    other.add_module("proj", nn.Linear(3, 3))
    foreign = LoRANetwork([PlannedModule("lora_unet_not_a_layer", other.proj, 2, 1.0)])
    foreign.save_weights(tmp_path / "foreign.safetensors", None, None)
    with pytest.raises(ArgumentError, match=r"--base_weights .*foreign.safetensors: .*name no layer"):
        merge_base_weights(lora, [str(tmp_path / "foreign.safetensors")], None, None, text_encoder, unet)


# --- end to end --------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_with_block_dims_base_weights_max_norm_and_loraplus(tmp_path, tiny_sd1_ckpt):
    from library.demo.shapes import write_shapes_folder
    from tests.train_helpers import base_train_args, run_script

    write_shapes_folder(tmp_path / "train" / "1_toy", 2, seed=3)
    common = dict(train_data_dir=tmp_path / "train", caption_extension=".txt", max_train_steps=2, train_batch_size=1)
    run_script("train_network.py", base_train_args(tiny_sd1_ckpt, tmp_path / "first", **common))
    first = load_file(str(tmp_path / "first" / "lora.safetensors"))

    ranks = {1: 2, 12: 0, 15: 4, 16: 8}
    out = tmp_path / "second"
    run_script("train_network.py", base_train_args(
        tiny_sd1_ckpt, out, base_weights=[str(tmp_path / "first" / "lora.safetensors")], base_weights_multiplier=["0.5"],
        scale_weight_norms=0.01, logging_dir=tmp_path / "logs",
        network_args=[f"block_dims={block_list(ranks, 4)}", "up_lr_weight=0.5,0.5,0.5,0.5", "loraplus_lr_ratio=4"], **common))
    second = load_file(str(out / "lora.safetensors"))
    assert second.keys() < first.keys() and not any("mid_block" in k for k in second)
    assert second["lora_unet_up_blocks_1_attentions_1_proj_in.lora_down.weight"].shape[0] == 8
    assert second["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 2
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_scale_weight_norms"] == "0.01"
    names = {k.partition(".")[0] for k in second if k.startswith("lora_unet_")}
    for name in names:  # max-norm held every module's delta at the cap
        down, up = second[f"{name}.lora_down.weight"].float(), second[f"{name}.lora_up.weight"].float()
        scale = second[f"{name}.alpha"].item() / down.shape[0]
        assert (up.flatten(1) @ down.flatten(1)).norm().item() * scale <= 0.01 * 1.001, name

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"max_norm/keys_scaled", "max_norm/average_key_norm", "max_norm/max_key_norm"} <= tags
    assert [e.step for e in accumulator.Scalars("max_norm/max_key_norm")] == [1, 2]
    assert accumulator.Scalars("max_norm/max_key_norm")[-1].value <= 0.01 * 1.001
    lrs = {tag: accumulator.Scalars(tag)[0].value for tag in tags if tag.startswith("lr/")}
    assert lrs["lr/unet_block16"] == pytest.approx(0.5e-3) and lrs["lr/unet_block16 plus"] == pytest.approx(2e-3)
    assert lrs["lr/unet_block1"] == pytest.approx(1e-3) and "lr/unet_block12" not in lrs
