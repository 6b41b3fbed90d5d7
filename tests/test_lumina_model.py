"""The Lumina-Image 2.0 NextDiT in the original layout: parity with diffusers' Lumina2Transformer2DModel,
the full-size layout on meta, config reading, caption padding, gradient checkpointing and block swap."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from library.demo.tiny_lumina import random_lumina_state_dict, tiny_lumina_config, write_tiny_lumina_dit
from library.families import dit_memory
from library.families.lumina.model import (
    LUMINA_IMAGE_2_CONFIG, LuminaConfig, NextDiT, patchify, position_ids, strip_lumina_prefix, unpatchify,
)

torch.set_num_threads(1)

#: the rows of q, k and v that diffusers' converter splits a fused qkv into (the full-size model's)
FULL_QKV_SPLIT = (2304, 768, 768)


def _tiny_model(config: LuminaConfig | None = None, seed: int = 0) -> NextDiT:
    config = config or tiny_lumina_config()
    model = NextDiT(config)
    model.load_state_dict(random_lumina_state_dict(config, seed=seed))
    return model.eval()


def _inputs(config: LuminaConfig, batch: int = 2, height: int = 8, width: int = 6, n_cap: int = 12,
            lengths: tuple[int, ...] = (5, 9), seed: int = 0, requires_grad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, n_cap, dtype=torch.long)
    for i, n in enumerate(lengths[:batch]):
        mask[i, :n] = 1
    inputs = dict(x=torch.randn(batch, config.in_channels, height, width, generator=g),
                  t=torch.rand(batch, generator=g),
                  cap_feats=torch.randn(batch, n_cap, config.cap_feat_dim, generator=g),
                  cap_mask=mask)
    if requires_grad:
        for name in ("x", "cap_feats"):
            inputs[name].requires_grad_(True)
    return inputs


# -- parity with diffusers ------------------------------------------------------------------------------


def _to_diffusers(state_dict: dict[str, torch.Tensor], config: LuminaConfig) -> dict[str, torch.Tensor]:
    """Our weights -> diffusers names through diffusers' own ``convert_lumina2_to_diffusers``.

    The converter hard-codes the full-size split of a fused ``attention.qkv`` (2304 q, 768 k, 768 v
    rows). To still test its q/k/v order, each part of a tiny qkv is placed at the offset it has in a
    full-size tensor, and the converted parts are cut back to the tiny sizes.
    """
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    offsets = (0, FULL_QKV_SPLIT[0], FULL_QKV_SPLIT[0] + FULL_QKV_SPLIT[1])
    checkpoint = {}
    for key, value in state_dict.items():
        if key.endswith("attention.qkv.weight"):
            padded = torch.zeros(sum(FULL_QKV_SPLIT), value.shape[1])
            for offset, part in zip(offsets, torch.split(value, config.qkv_sizes)):
                padded[offset:offset + part.shape[0]] = part
            value = padded
        checkpoint[key] = value.clone()
    converted = convert_lumina2_to_diffusers(checkpoint)
    assert not checkpoint, f"diffusers' converter left keys unused: {sorted(checkpoint)}"
    sizes = {"to_q": config.qkv_sizes[0], "to_k": config.qkv_sizes[1], "to_v": config.qkv_sizes[2]}
    for key in converted:
        part = key.rsplit(".", 2)[-2]
        if part in sizes:
            converted[key] = converted[key][:sizes[part]]
    return converted


def _diffusers_model(config: LuminaConfig, state_dict: dict[str, torch.Tensor]):
    from diffusers import Lumina2Transformer2DModel

    assert config.num_noise_refiner_layers == config.num_context_refiner_layers
    # multiple_of: diffusers rounds 4 x hidden up to it; 4 x 48 = 192 is the tiny model's SwiGLU width.
    model = Lumina2Transformer2DModel(
        patch_size=config.patch_size, in_channels=config.in_channels, hidden_size=config.hidden_size,
        num_layers=config.num_layers, num_refiner_layers=config.num_noise_refiner_layers,
        num_attention_heads=config.num_heads, num_kv_heads=config.num_kv_heads, multiple_of=64,
        norm_eps=config.norm_eps, axes_dim_rope=config.axes_dim, cap_feat_dim=config.cap_feat_dim)
    model.load_state_dict(_to_diffusers(state_dict, config), strict=True)
    return model.eval()


@pytest.mark.parametrize("lengths", [(5, 9), (12, 12)], ids=["padded_captions", "full_captions"])
def test_matches_diffusers_lumina2_transformer(lengths):
    config = tiny_lumina_config()
    state_dict = random_lumina_state_dict(config, seed=1)
    ours = NextDiT(config)
    ours.load_state_dict(state_dict)
    theirs = _diffusers_model(config, state_dict)
    x = _inputs(config, lengths=lengths)
    with torch.no_grad():
        expected = theirs(hidden_states=x["x"], timestep=x["t"], encoder_hidden_states=x["cap_feats"],
                          encoder_attention_mask=x["cap_mask"], return_dict=False)[0]
        got = ours.eval()(**x)
    assert got.shape == (2, 16, 8, 6)
    assert expected.abs().mean() > 0.1  # a non-trivial output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_padded_caption_tokens_do_not_affect_the_output():
    config = tiny_lumina_config()
    model = _tiny_model(config)
    x = _inputs(config, lengths=(5, 9))
    longer = dict(x, cap_feats=torch.cat((x["cap_feats"], torch.randn(2, 4, config.cap_feat_dim)), dim=1),
                  cap_mask=torch.cat((x["cap_mask"], torch.zeros(2, 4, dtype=torch.long)), dim=1))
    changed = dict(x, cap_feats=x["cap_feats"].clone())
    changed["cap_feats"][0, 5:] = 100.0  # garbage in sample 0's padding
    with torch.no_grad():
        base = model(**x)
        torch.testing.assert_close(model(**longer), base, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(**changed), base, atol=1e-5, rtol=0)
        unmasked = model(**dict(x, cap_mask=torch.ones_like(x["cap_mask"])))
    assert (unmasked - base).abs().max() > 1e-3  # the mask does something


def test_image_positions_start_after_each_real_caption():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    cap, img = position_ids(mask, 2, 3)
    assert torch.equal(cap[0, :, 0], torch.arange(5.0)) and not cap[..., 1:].any()
    assert torch.equal(img[0, :, 0], torch.full((6,), 3.0)) and torch.equal(img[1, :, 0], torch.full((6,), 5.0))
    assert torch.equal(img[0, :, 1], torch.tensor([0.0, 0, 0, 1, 1, 1]))
    assert torch.equal(img[0, :, 2], torch.tensor([0.0, 1, 2, 0, 1, 2]))


def test_patchify_round_trip_and_feature_order():
    x = torch.randn(2, 16, 6, 4)
    patches = patchify(x, 2)
    assert patches.shape == (2, 6, 64)
    # feature order inside a patch: (row, column, channel), as the original's x_embedder expects
    assert torch.equal(patches[1, 4, :16], x[1, :, 4, 0]) and torch.equal(patches[1, 4, 16:32], x[1, :, 4, 1])
    assert torch.equal(patches[1, 4, 32:48], x[1, :, 5, 0])
    assert torch.equal(unpatchify(patches, 6, 4, 2), x)


def test_empty_caption_does_not_turn_the_image_into_nan():
    config = tiny_lumina_config()
    x = _inputs(config, lengths=(0, 3))
    with torch.no_grad():
        out = _tiny_model(config)(**x)
    assert torch.isfinite(out).all()


# -- full size on meta, config reading -------------------------------------------------------------------


def test_full_size_lumina_image_2_on_meta_matches_diffusers_layout():
    """Lumina-Image 2.0 (Alpha-VLLM's NextDiT_2B_GQA_patch2_Adaln_Refiner, the config diffusers'
    ``Alpha-VLLM/Lumina-Image-2.0`` transformer has: hidden 2304, 26 layers, 2 refiner layers, 24 heads,
    8 kv heads, RoPE (32, 32, 32), captions 2304 wide from gemma-2-2b)."""
    from diffusers import Lumina2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    with torch.device("meta"):
        ours = NextDiT(LUMINA_IMAGE_2_CONFIG)
        theirs = Lumina2Transformer2DModel(cap_feat_dim=2304)  # diffusers' defaults are Lumina-Image 2.0's
    shapes = ours.state_dict()
    count = sum(p.numel() for p in ours.parameters())
    assert count == 2_609_771_456  # 2.61B; diffusers has 2304 fewer (it drops the unused norm_final)
    assert count - sum(p.numel() for p in theirs.parameters()) == 2304
    assert len(shapes) == 400
    for key, shape in {"x_embedder.weight": (2304, 64), "t_embedder.mlp.0.weight": (1024, 256),
                       "cap_embedder.0.weight": (2304,), "cap_embedder.1.weight": (2304, 2304),
                       "layers.25.attention.qkv.weight": (3840, 2304), "layers.0.attention.out.weight": (2304, 2304),
                       "layers.0.attention.q_norm.weight": (96,), "layers.0.feed_forward.w1.weight": (9216, 2304),
                       "layers.0.adaLN_modulation.1.weight": (9216, 1024), "noise_refiner.1.ffn_norm2.weight": (2304,),
                       "context_refiner.1.attention_norm1.weight": (2304,), "final_layer.linear.weight": (64, 2304),
                       "final_layer.adaLN_modulation.1.weight": (2304, 1024), "norm_final.weight": (2304,)}.items():
        assert tuple(shapes[key].shape) == shape, key
    assert not any(k.startswith("context_refiner.") and "adaLN" in k for k in shapes)

    # diffusers' converter, with its hard-coded full-size q/k/v split, maps our keys onto its model exactly.
    converted = convert_lumina2_to_diffusers(dict(shapes))
    assert converted.keys() == theirs.state_dict().keys()
    assert all(converted[k].shape == v.shape for k, v in theirs.state_dict().items())
    assert LuminaConfig.from_state_dict(shapes) == LUMINA_IMAGE_2_CONFIG
    assert ours.block_swap_limit() == 24


def test_config_from_tiny_pruned_and_prefixed_state_dicts():
    config = tiny_lumina_config()
    state_dict = random_lumina_state_dict(config)
    assert LuminaConfig.from_state_dict(state_dict) == config
    prefixed = {"model.diffusion_model." + k: v for k, v in state_dict.items()}
    prefixed["vae.decoder.conv_in.bias"] = torch.zeros(3)  # an all-in-one file: other models beside the DiT
    assert LuminaConfig.from_state_dict(prefixed) == config
    assert strip_lumina_prefix(prefixed).keys() == state_dict.keys()
    pruned = {k: v for k, v in state_dict.items()
              if not k.startswith(("layers.2.", "layers.3.")) and k != "norm_final.weight"}
    assert LuminaConfig.from_state_dict(pruned) == dataclasses.replace(config, num_layers=2, has_norm_final=False)


def test_config_errors_name_the_problem():
    state_dict = random_lumina_state_dict(tiny_lumina_config())
    with pytest.raises(ValueError, match="'cap_embedder.1.weight' is missing"):
        LuminaConfig.from_state_dict({k: v for k, v in state_dict.items() if not k.startswith("cap_embedder")})
    with pytest.raises(ValueError, match="q_norm.weight' is missing .*Lumina-Next"):
        LuminaConfig.from_state_dict({k: v for k, v in state_dict.items() if "q_norm" not in k})
    with pytest.raises(ValueError, match="layers are not numbered 0..3"):
        LuminaConfig.from_state_dict({k: v for k, v in state_dict.items() if not k.startswith("layers.1.")})
    with pytest.raises(ValueError, match="has 96 rows, not 3 query heads plus two equal key/value groups"):
        LuminaConfig.from_state_dict({**state_dict, "layers.0.attention.q_norm.weight": torch.ones(16)})
    odd_heads = random_lumina_state_dict(tiny_lumina_config(num_heads=3, axes_dim=(4, 6, 6)))  # head dim 16
    with pytest.raises(ValueError, match="head dim 16 has no default RoPE split"):
        LuminaConfig.from_state_dict(odd_heads)
    assert LuminaConfig.from_state_dict(odd_heads, axes_dim=(4, 6, 6)).head_dim == 16


def test_tiny_file_round_trip(tmp_path):
    from library.families.lumina.loading import load_lumina_dit

    path = write_tiny_lumina_dit(tmp_path / "dit.safetensors", seed=3)
    model = load_lumina_dit(path)
    assert model.config == tiny_lumina_config()
    expected = random_lumina_state_dict(tiny_lumina_config(), seed=3)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_forward_checks_shapes():
    config = tiny_lumina_config()
    x = _inputs(config)
    with pytest.raises(ValueError, match="cap_feats must be"):
        _tiny_model(config)(**dict(x, cap_feats=torch.randn(2, 12, 7)))
    with pytest.raises(ValueError, match="multiples of 2"):
        _tiny_model(config)(**dict(x, x=torch.randn(2, 16, 7, 6)))


# -- gradient checkpointing and block swap ---------------------------------------------------------------


class LowRankHook(nn.Module):
    """A LoRA-like trainable term hooked into a Linear by replacing its ``forward`` (as LoRA does)."""

    def __init__(self, linear: nn.Linear, seed: int, rank: int = 2) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.down = nn.Parameter(0.3 * torch.randn(rank, linear.in_features, generator=g))
        self.up = nn.Parameter(0.3 * torch.randn(linear.out_features, rank, generator=g))
        self.org_forward = linear.forward
        object.__setattr__(self, "linear", linear)  # not a submodule
        self.weights_seen: list[torch.Tensor] = []
        linear.forward = self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.weights_seen.append(self.linear.weight)
        return self.org_forward(x) + F.linear(F.linear(x, self.down), self.up)


def _forward_backward(model: NextDiT, x: dict, trainable: list[nn.Parameter]):
    out = model(**x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = [x[name].grad.clone() for name in ("x", "cap_feats")] + [p.grad.clone() for p in trainable]
    for tensor in [x["x"], x["cap_feats"], *trainable]:
        tensor.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("cpu_offload", [False, True], ids=["plain", "cpu_offload"])
def test_gradient_checkpointing_gives_the_same_gradients(cpu_offload, monkeypatch):
    calls = {"checkpoint": 0, "save_on_cpu": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(dit_memory, "checkpoint", counting("checkpoint", dit_memory.checkpoint))
    monkeypatch.setattr(dit_memory, "save_on_cpu_async", counting("save_on_cpu", dit_memory.save_on_cpu_async))
    config = tiny_lumina_config()
    model = _tiny_model(config).train()
    x = _inputs(config, requires_grad=True)
    params = [p for name, p in model.named_parameters() if name != "norm_final.weight"]  # that one is unused
    expected_out, expected = _forward_backward(model, x, params)
    model.enable_gradient_checkpointing(cpu_offload=cpu_offload)
    out, grads = _forward_backward(model, x, params)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    n_blocks = config.num_layers + config.num_noise_refiner_layers + config.num_context_refiner_layers
    assert calls == {"checkpoint": n_blocks, "save_on_cpu": n_blocks if cpu_offload else 0}


@pytest.mark.parametrize("checkpointing", [None, "cpu_offload"])
def test_block_swap_gives_the_same_outputs_and_gradients(checkpointing):
    config = tiny_lumina_config()
    model = _tiny_model(config).train().requires_grad_(False)
    hooks = [LowRankHook(model.layers[3].attention.qkv, seed=1),  # swapped
             LowRankHook(model.layers[2].feed_forward.w2, seed=2),  # swapped
             LowRankHook(model.noise_refiner[0].attention.out, seed=3)]  # resident
    trainable = [p for hook in hooks for p in hook.parameters()]
    x = _inputs(config, requires_grad=True)
    expected_out, expected = _forward_backward(model, x, trainable)

    if checkpointing:
        model.enable_gradient_checkpointing(cpu_offload=True)
    model.enable_block_swap(2, torch.device("cpu"))
    model.move_to_device_except_swap_blocks(torch.device("cpu"))
    assert model._offloader.swapped_blocks == [model.layers[2], model.layers[3]]
    for hook in hooks:
        hook.weights_seen.clear()
    out, grads = _forward_backward(model, x, trainable)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for hook in hooks[:2]:  # swapped blocks ran on device copies, never on the CPU master weights
        assert hook.weights_seen and all(w is not hook.linear.weight for w in hook.weights_seen)
    assert all(w is hooks[2].linear.weight for w in hooks[2].weights_seen)
    with pytest.raises(ValueError, match="at most 2"):  # 4 main layers, 2 kept on the device
        model.enable_block_swap(3, torch.device("cpu"))
