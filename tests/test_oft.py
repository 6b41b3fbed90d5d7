"""networks.oft: the OFT math, targets and file format (tiny and full-size models), training, loading."""

from __future__ import annotations

import copy
import json
import logging
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from library.args import ArgumentError
from library.demo.shapes import write_shapes_folder
from library.io_utils import addnet_hashes
from networks import lora, oft
from networks.oft import OFTModule
from tests.reference import load_reference
from tests.test_lora_keys_full_size import assert_same_keys, network_shapes, sd1_models, sdxl_models
from tests.test_lora_network import run, tiny_models
from tests.train_helpers import base_train_args, read_metadata

LAYERS = {
    "linear": (lambda: nn.Linear(6, 8), (3, 5, 6)),
    "conv1x1": (lambda: nn.Conv2d(6, 8, 1), (2, 6, 5, 5)),
    "conv3x3_stride2": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 7, 7)),
}


def randomize(module: OFTModule, std: float = 0.3, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.oft_blocks.copy_(torch.randn(module.oft_blocks.shape, generator=generator) * std)


def randomize_network(network: oft.OFTNetwork, std: float = 0.05) -> None:
    for index, module in enumerate(network.unet_ofts):
        randomize(module, std, seed=index)


def full_rotation(module: OFTModule) -> torch.Tensor:
    """The whole out x out matrix R (block-diagonal), for checking the blockwise code against it."""
    return torch.block_diag(*module.rotation())


# --- module math -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LAYERS)
def test_zero_blocks_are_the_identity_then_rotation_formula_and_merge(kind):
    torch.manual_seed(0)
    make_layer, shape = LAYERS[kind]
    layer = make_layer()
    x = torch.randn(shape)
    before = layer(x)
    module = OFTModule("oft_unet_x", layer, multiplier=1.0, lora_dim=2, alpha=0)
    assert module.oft_blocks.shape == (2, 4, 4) and not module.oft_blocks.any()
    module.apply_to()
    assert torch.equal(layer(x), before), "zero blocks (R = I) must not change the output"
    randomize(module)
    hooked = layer(x)
    assert not torch.allclose(hooked, before)
    # y' = y R with R = blockdiag(R_k), on the channel axis
    rotation = full_rotation(module)
    channels_last = before.movedim(1, -1) if before.dim() == 4 else before
    expected = channels_last @ rotation
    torch.testing.assert_close(hooked, expected.movedim(-1, 1) if before.dim() == 4 else expected)
    # merged: W' = R^T W and b' = R^T b give the same layer
    merged = copy.deepcopy(layer)
    del merged.forward  # the deepcopy carried the hook along
    module.restore()
    twin = OFTModule("oft_unet_x", merged, lora_dim=2, alpha=0)
    twin.load_state_dict(module.state_dict())
    twin.merge_to_layer()
    torch.testing.assert_close(merged(x), hooked, atol=1e-5, rtol=1e-5)
    assert "forward" not in layer.__dict__ and torch.equal(layer(x), before)


def test_rotation_is_orthogonal_with_determinant_one():
    module = OFTModule("oft_unet_x", nn.Linear(4, 12), lora_dim=3, alpha=0)
    randomize(module, std=2.0)  # far from the identity
    r = module.rotation()
    eye = torch.eye(4).expand(3, 4, 4)
    torch.testing.assert_close(r.transpose(1, 2) @ r, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(3), atol=1e-5, rtol=0)
    q = module.skew()
    torch.testing.assert_close(q, -q.transpose(1, 2))
    assert not torch.allclose(r, eye, atol=1e-2)


def test_constraint_caps_the_norm_of_q_only_above_it():
    layer = nn.Linear(4, 8)
    small = OFTModule("oft_unet_x", layer, lora_dim=2, alpha=1e-3)  # cap 1e-3 * 8 output channels
    assert small.constraint == pytest.approx(8e-3) and float(small.alpha) == pytest.approx(1e-3)
    randomize(small, std=1.0)
    blocks = small.oft_blocks.detach()
    q = small.skew()
    assert torch.linalg.vector_norm(q).item() == pytest.approx(8e-3, rel=1e-5)
    torch.testing.assert_close(q / torch.linalg.vector_norm(q), (blocks - blocks.transpose(1, 2)) /
                               torch.linalg.vector_norm(blocks - blocks.transpose(1, 2)))
    loose = OFTModule("oft_unet_x", layer, lora_dim=2, alpha=10.0)
    loose.load_state_dict(small.state_dict() | {"alpha": torch.tensor(10.0)})
    assert loose.constraint == pytest.approx(80.0)  # a loaded alpha refreshes the cached cap
    torch.testing.assert_close(loose.skew(), blocks - blocks.transpose(1, 2))  # below the cap: untouched
    unconstrained = OFTModule("oft_unet_x", layer, lora_dim=2, alpha=0)
    assert unconstrained.constraint is None
    assert OFTModule("oft_unet_x", layer, lora_dim=2, alpha=None).constraint == pytest.approx(8e-3)  # default 1e-3


def test_gradients_are_finite_at_the_zero_start_and_move_the_blocks():
    torch.manual_seed(0)
    layer = nn.Linear(6, 8).requires_grad_(False)
    module = OFTModule("oft_unet_x", layer, lora_dim=2, alpha=1e-3)
    module.apply_to()
    target = torch.randn(5, 8)  # not a squared norm: a rotation leaves that unchanged
    (layer(torch.randn(5, 6)) - target).square().sum().backward()
    grad = module.oft_blocks.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_multiplier_blends_linearly_with_the_identity():
    torch.manual_seed(0)
    layer = nn.Linear(6, 8)
    x = torch.randn(4, 6)
    base = layer(x)
    module = OFTModule("oft_unet_x", layer, lora_dim=4, alpha=0)
    randomize(module)
    module.apply_to()
    full = layer(x)
    for m in (0.0, 0.5, -1.0, 2.0):
        module.set_multiplier(m)
        torch.testing.assert_close(layer(x), base + m * (full - base), atol=1e-5, rtol=1e-5)
    module.set_multiplier(0.0)
    assert torch.equal(layer(x), base)


def test_inference_reuses_the_rotation_until_blocks_or_multiplier_change():
    layer = nn.Linear(6, 8)
    module = OFTModule("oft_unet_x", layer, lora_dim=2, alpha=0)
    module.apply_to()
    module.eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        first = layer(x)
        randomize(module)  # in place: the cached R must not be used any more
        rotated = layer(x)
        assert not torch.allclose(rotated, first) and module._rotation_cache is not None
        module.load_state_dict({"oft_blocks": torch.zeros(2, 4, 4), "alpha": torch.tensor(0.0)})
        torch.testing.assert_close(layer(x), first)
        randomize(module)
        module.set_multiplier(0.5)
        torch.testing.assert_close(layer(x), (first + rotated) / 2, atol=1e-5, rtol=1e-5)


def test_block_count_must_divide_the_width_and_no_dropout():
    with pytest.raises(ValueError, match="cannot be split into 3 equal blocks"):
        OFTModule("oft_unet_x", nn.Linear(4, 8), lora_dim=3)
    with pytest.raises(ValueError, match="no dropout"):
        OFTModule("oft_unet_x", nn.Linear(4, 8), lora_dim=2, dropout=0.1)
    with pytest.raises(TypeError, match="cannot adapt"):
        OFTModule("oft_unet_x", nn.LayerNorm(4))


# --- network on tiny models --------------------------------------------------------------------

@pytest.fixture
def models():
    return tiny_models()


def test_targets_attention_by_default_all_linear_and_conv_as_networks_lora(models):
    text_encoder, unet = models
    default = oft.create_network(1.0, 4, 1e-3, None, text_encoder, unet)
    names = {m.lora_name for m in default.unet_ofts}
    assert names and all(re.search(r"_attn[12]_to_(q|k|v|out_0)$", n) for n in names), sorted(names)
    assert not default.text_encoder_loras
    as_lora = lambda network: {m.lora_name.replace("lora_unet_", "oft_unet_", 1) for m in network.unet_loras}  # noqa: E731
    all_linear = oft.create_network(1.0, 4, 1e-3, None, text_encoder, unet, enable_all_linear="True")
    assert {m.lora_name for m in all_linear.unet_ofts} == as_lora(lora.create_network(1.0, 4, 1, None, None, unet))
    with_conv = oft.create_network(1.0, 4, 1e-3, None, text_encoder, unet, enable_all_linear="True", enable_conv="True")
    assert {m.lora_name for m in with_conv.unet_ofts} == as_lora(
        lora.create_network(1.0, 4, 1, None, None, unet, conv_dim="4"))
    conv = getattr(with_conv, "oft_unet_down_blocks_0_downsamplers_0_conv")
    assert conv.oft_blocks.shape == (4, 4, 4) and conv.is_conv
    attn_and_conv = oft.create_network(1.0, 4, 1e-3, None, None, unet, enable_conv="True")
    assert names < {m.lora_name for m in attn_and_conv.unet_ofts}
    assert not any("proj_in" in m.lora_name for m in attn_and_conv.unet_ofts)


def test_network_identity_then_merge_equals_applied(models):
    text_encoder, unet = models
    pristine = copy.deepcopy(models)
    base = run(text_encoder, unet)
    network = oft.create_network(1.0, 4, 0, None, text_encoder, unet, enable_all_linear="True", enable_conv="True")
    network.apply_to(text_encoder, unet)
    with torch.no_grad():
        assert torch.equal(run(text_encoder, unet), base)
        randomize_network(network)
        network.set_multiplier(0.7)
        hooked = run(text_encoder, unet)
    assert not torch.allclose(hooked, base, atol=1e-4)
    te2, unet2 = pristine
    merge_net, weights = oft.create_network_from_weights(0.7, None, None, te2, unet2, weights_sd=network.state_dict(),
                                                         for_inference=True)
    merge_net.merge_to(te2, unet2, weights, torch.float32, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(run(te2, unet2), hooked, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="restore"):
        network.merge_to(text_encoder, unet, None)
    network.restore()
    with torch.no_grad():
        assert torch.equal(run(text_encoder, unet), base)


def test_save_load_round_trip_metadata_and_errors(models, tmp_path):
    text_encoder, unet = models
    network = oft.create_network(1.0, 4, 2e-3, None, text_encoder, unet, enable_conv="True")
    randomize_network(network)
    path = tmp_path / "oft.safetensors"
    network.save_weights(path, torch.float16, {"ss_network_module": "networks.oft", "ss_network_dim": "4"})
    tensors = load_file(str(path))
    assert set(tensors) == set(network.state_dict()) and all(k.startswith("oft_unet_") for k in tensors)
    assert {k.rpartition(".")[2] for k in tensors} == {"oft_blocks", "alpha"}
    assert all(t.dtype == torch.float16 and (t.dim() == 3 or t.dim() == 0) for t in tensors.values())
    meta = read_metadata(path)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == addnet_hashes(tensors, meta)

    rebuilt, weights = oft.create_network_from_weights(1.0, path, None, *tiny_models())
    assert set(weights) == set(tensors)
    assert {m.lora_name: (m.num_blocks, m.constraint) for m in rebuilt.unet_ofts} == \
        {m.lora_name: (m.num_blocks, pytest.approx(m.constraint, rel=1e-3)) for m in network.unet_ofts}
    for key, value in network.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value.half().float())

    other_dim = oft.create_network(1.0, 2, 2e-3, None, *tiny_models(), enable_conv="True")
    with pytest.raises(ValueError, match=r"file has 4 blocks per module, the network 2.*--network_dim 4"):
        other_dim.load_weights(path)
    lora_file = tmp_path / "lora.safetensors"
    lora.create_network(1.0, 4, 1, None, *tiny_models()).save_weights(lora_file, None, None)
    with pytest.raises(ValueError, match=r"not OFT .* looks like an SD.* LoRA\. Load a LoRA with --network_module networks.lora"):
        oft.create_network_from_weights(1.0, lora_file, None, *tiny_models())
    with pytest.raises(ValueError, match="OFT network; load it with --network_module networks.oft"):
        lora.create_network_from_weights(1.0, path, None, *tiny_models())
    save_file({"oft_unet_input_blocks_4_1_proj_in.oft_blocks": torch.zeros(4, 160, 160)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="name no layer"):
        oft.create_network_from_weights(1.0, tmp_path / "x.safetensors", None, *tiny_models())


def test_optimizer_groups_and_refused_trainer_flags(models, caplog):
    text_encoder, unet = models
    with caplog.at_level(logging.WARNING, logger="networks.oft"):
        network = oft.create_network(1.0, 4, 1.0, None, text_encoder, unet, foo="1", dropout="0.1")
    assert "barely constrain" in caplog.text and "foo" in caplog.text and "no dropout" in caplog.text
    groups, names = network.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert names == ["unet"] and groups[0]["lr"] == 1e-4
    assert sum(len(g["params"]) for g in groups) == len(network.get_trainable_params()) == len(network.unet_ofts)
    args = type("Args", (), {"network_train_text_encoder_only": False, "scale_weight_norms": 1.0})()
    with pytest.raises(ArgumentError, match="--scale_weight_norms"):
        network.prepare_network(args)
    args.scale_weight_norms, args.network_train_text_encoder_only = None, True
    with pytest.raises(ArgumentError, match="only the U-Net"):
        network.prepare_network(args)
    with pytest.raises(ValueError, match="--network_args enable_conv='maybe'"):
        oft.create_network(1.0, 4, 1e-3, None, None, unet, enable_conv="maybe")


# --- full-size key parity (meta device) --------------------------------------------------------

def expected_oft(reference: dict, case: str, attention_only: bool = False) -> dict[str, list[int]]:
    """The OFT keys/shapes for the layers of a reference LoRA case: oft_unet_X <-> lora_unet_X, 4 blocks."""
    expected = {}
    for key, shape in reference[case].items():
        name, _, suffix = key.partition(".")
        if not name.startswith("lora_unet_") or suffix != "lora_up.weight":
            continue
        if attention_only and not re.search(r"_attn[12]_to_(q|k|v|out_0)$", name):
            continue
        out = shape[0]
        oft_name = "oft_unet_" + name[len("lora_unet_"):]
        expected[f"{oft_name}.oft_blocks"] = [4, out // 4, out // 4]
        expected[f"{oft_name}.alpha"] = []
    return expected


@pytest.mark.parametrize("case, models, args, attention_only", [
    ("sd1_lora_dim8", sd1_models, {}, True),
    ("sd1_lora_dim8", sd1_models, {"enable_all_linear": "True"}, False),
    ("sd1_lora_dim8_conv4", sd1_models, {"enable_all_linear": "True", "enable_conv": "True"}, False),
    ("sdxl_lora_dim8", sdxl_models, {}, True),
    ("sdxl_lora_dim8_conv4", sdxl_models, {"enable_all_linear": "True", "enable_conv": "True"}, False),
])
def test_full_size_modules_match_the_reference_lora_layers(case, models, args, attention_only):
    reference = load_reference("lora_keys.json")
    text_encoder, unet = models()
    network = oft.create_network(1.0, 4, 1e-3, None, text_encoder, unet, **args)
    expected = expected_oft(reference, case, attention_only)
    assert_same_keys(network_shapes(network), expected)
    if attention_only:  # 4 attention projections of 2 attentions per transformer block
        assert len(network.unet_ofts) % 8 == 0 and len(network.unet_ofts) == len(expected) // 2


def test_full_size_sdxl_diffusers_named_file_loads_with_sgm_names():
    text_encoders, unet = sdxl_models()
    network = oft.create_network(1.0, 4, 1e-3, None, text_encoders, unet, enable_all_linear="True")
    path_of = {id(layer): path for path, layer in unet.named_modules()}
    with torch.device("meta"):
        weights = {"oft_unet_" + path_of[id(m.org_module)].replace(".", "_") + ".oft_blocks": torch.empty(
            m.oft_blocks.shape) for m in network.unet_ofts}
    assert "oft_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.oft_blocks" in weights
    rebuilt, renamed = oft.create_network_from_weights(1.0, None, None, text_encoders, unet, weights_sd=weights)
    assert "oft_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.oft_blocks" in renamed
    assert {k: v for k, v in network_shapes(rebuilt).items() if k.endswith("oft_blocks")} == \
        {k: v for k, v in network_shapes(network).items() if k.endswith("oft_blocks")}


# --- training runs (tiny SD1 / SDXL) -----------------------------------------------------------

class _EpochLosses(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.losses: list[float] = []

    def emit(self, record):
        if record.msg.startswith("epoch %d/%d done"):
            self.losses.append(float(record.args[2]))


def train_in_process(main, argv: list) -> float:
    """``main(argv)`` of a training script (``train_network.main``) in this process, which saves the
    seconds a subprocess spends importing torch; returns the last epoch's mean loss.

    The trainer configures the root logger itself (caplog's handler goes), so the losses are read
    by a handler on the trainer's own logger.
    """
    handler = _EpochLosses()
    trainer_logger = logging.getLogger("library.training.trainer")
    trainer_logger.addHandler(handler)
    try:
        main([str(a) for a in argv])
    finally:
        trainer_logger.removeHandler(handler)
    assert handler.losses, "no epoch finished"
    return handler.losses[-1]


@pytest.fixture(scope="module")
def sd1_run(tmp_path_factory, tiny_sd1_ckpt):
    """train_network.py --network_module networks.oft: 2 steps, a state at step 1, a preview at step 2."""
    import train_network

    root = tmp_path_factory.mktemp("oft_sd1")
    write_shapes_folder(root / "train" / "2_toy", 2, seed=4)
    prompts = root / "prompts.txt"
    prompts.write_text("a toy --w 64 --h 64 --s 2 --d 3\n")
    args = oft_args(tiny_sd1_ckpt, root / "out", root / "train", save_every_n_steps=1, save_state=True,
                    sample_prompts=prompts, sample_every_n_steps=2)
    loss = train_in_process(train_network.main, args)
    return root, root / "out", loss


def oft_args(model, out, data, **overrides):
    values = dict(output_name="oft", network_module="networks.oft", network_dim=4, network_alpha="1e-3",
                  network_args=["enable_all_linear=True", "enable_conv=True"], train_data_dir=data,
                  caption_extension=".txt", max_train_steps=2, train_batch_size=1, cache_latents=True)
    values.update(overrides)
    return base_train_args(model, out, **values)


def test_sd1_training_writes_oft_file_metadata_state_and_preview(sd1_run, tiny_sd1_ckpt):
    from library.families.sd.loading import load_sd_models

    _, out, loss = sd1_run
    assert math.isfinite(loss) and loss > 0
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["oft-step00000001.safetensors",
                                                                    "oft-step00000002.safetensors", "oft.safetensors"]
    assert (out / "oft-step00000001-state").is_dir() and len(list((out / "sample").glob("*.png"))) == 1
    saved = load_file(str(out / "oft.safetensors"))
    models = load_sd_models(tiny_sd1_ckpt, v2=False)
    expected = oft.create_network(1.0, 4, 1e-3, None, models.text_encoder, models.unet, enable_all_linear="True",
                                  enable_conv="True")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    blocks = [v for k, v in saved.items() if k.endswith(".oft_blocks")]
    assert max(v.abs().max().item() for v in blocks) > 0, "training moved the blocks"
    assert all(float(v) == pytest.approx(1e-3) for k, v in saved.items() if k.endswith(".alpha"))
    meta = read_metadata(out / "oft.safetensors")
    assert meta["ss_network_module"] == "networks.oft" and meta["ss_network_dim"] == "4"
    assert float(meta["ss_network_alpha"]) == pytest.approx(1e-3)
    assert json.loads(meta["ss_network_args"]) == {"enable_all_linear": "True", "enable_conv": "True"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == addnet_hashes(saved, meta)


def test_sd1_resume_is_exact(sd1_run, tiny_sd1_ckpt, tmp_path):
    import train_network

    root, out, _ = sd1_run
    argv = oft_args(tiny_sd1_ckpt, tmp_path / "resumed", root / "train", resume=out / "oft-step00000001-state")
    assert math.isfinite(train_in_process(train_network.main, argv))
    full, resumed = load_file(str(out / "oft.safetensors")), load_file(str(tmp_path / "resumed" / "oft.safetensors"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    mid = load_file(str(out / "oft-step00000001.safetensors"))
    assert any(not torch.equal(mid[k], full[k]) for k in full)  # step 2 changed the weights


def test_gen_img_loads_and_applies_oft(sd1_run, tiny_sd1_ckpt, tmp_path):
    """gen_img.py --network_module networks.oft (merging is the same merge_to as in
    test_network_identity_then_merge_equals_applied)."""
    from library.families.sd.loading import load_sd_models
    from library.generation.runner import load_generator, run as generate
    from tests.test_gen_img import make_args, pixels

    _, out, _ = sd1_run
    models = load_sd_models(tiny_sd1_ckpt, v2=False)
    trained, _ = oft.create_network_from_weights(1.0, out / "oft.safetensors", models.vae, models.text_encoder,
                                                 models.unet, for_inference=True)
    assert len(trained.unet_ofts) == len(load_file(str(out / "oft.safetensors"))) // 2
    # a strong random OFT, so the image visibly changes
    network = oft.create_network(1.0, 4, 0, None, models.text_encoder, models.unet, enable_all_linear="True")
    randomize_network(network, std=0.2)
    strong = tmp_path / "strong.safetensors"
    network.save_weights(strong, None, {"ss_network_module": "networks.oft"})
    net = ["--network_module", "networks.oft", "networks.oft", "--network_weights", out / "oft.safetensors", strong]
    applied = load_generator(make_args(tiny_sd1_ckpt, tmp_path, "--prompt", "x", *net), torch.device("cpu"))
    one = generate(make_args(tiny_sd1_ckpt, tmp_path / "one", "--prompt", "a cat --d 4"), applied)[0]
    zero = generate(make_args(tiny_sd1_ckpt, tmp_path / "zero", "--prompt", "a cat --d 4 --am 0,0"), applied)[0]
    assert np.abs(pixels(one) - pixels(zero)).mean() > 1


def test_sdxl_training_continues_an_sgm_named_oft(tmp_path, tiny_sdxl_ckpt):
    """sdxl_train_network.py --network_module networks.oft --network_weights start.safetensors."""
    import sdxl_train_network
    from library.families.sdxl.loading import load_sdxl_models

    models = load_sdxl_models(tiny_sdxl_ckpt)
    start = oft.create_network(1.0, 4, 1e-3, None, models.text_encoders, models.unet, enable_all_linear="True")
    randomize_network(start, std=0.01)
    start.save_weights(tmp_path / "start.safetensors", None, None)
    write_shapes_folder(tmp_path / "train" / "2_toy", 2, seed=3)
    # the text encoders have no OFT modules: their outputs can be cached (docs/networks.md's example)
    argv = oft_args(tiny_sdxl_ckpt, tmp_path / "out", tmp_path / "train", max_train_steps=2, bucket_reso_steps=32,
                    network_args=["enable_all_linear=True"], network_train_unet_only=True,
                    cache_text_encoder_outputs=True, network_weights=tmp_path / "start.safetensors")
    assert math.isfinite(train_in_process(sdxl_train_network.main, argv))
    saved = load_file(str(tmp_path / "out" / "oft.safetensors"))
    initial = start.state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in initial.items()}
    names = {k.partition(".")[0] for k in saved}
    assert "oft_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k" in names
    assert all(n.startswith(("oft_unet_input_blocks_", "oft_unet_middle_block_", "oft_unet_output_blocks_"))
               for n in names)
    # two AdamW steps move each element by about lr at most: the run started from the file, not from 0
    blocks = [k for k in saved if k.endswith(".oft_blocks")]
    assert all((saved[k] - initial[k]).abs().max() <= 2.5e-3 for k in blocks)
    assert any((saved[k] - initial[k]).abs().max() > 0 for k in blocks)
    assert max(initial[k].abs().max() for k in blocks) > 0.02
    meta = read_metadata(tmp_path / "out" / "oft.safetensors")
    assert meta["ss_network_module"] == "networks.oft" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    loaded, _ = oft.create_network_from_weights(1.0, tmp_path / "out" / "oft.safetensors", None, models.text_encoders,
                                                models.unet)
    assert len(loaded.unet_ofts) == len(names)
