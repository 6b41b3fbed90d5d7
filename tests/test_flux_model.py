"""The FLUX.1 DiT in the BFL layout: parity with diffusers, full-size layout on meta, config
reading, packing, text masking, gradient checkpointing and block swap."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from library.demo.tiny_flux import random_flux_state_dict, tiny_flux_config, write_tiny_flux_dit
from library.families.flux.model import (
    DoubleStreamBlock,
    Flux,
    FluxConfig,
    SingleStreamBlock,
    image_ids,
    max_blocks_to_swap,
    pack_latents,
    strip_flux_prefix,
    text_ids,
    unpack_latents,
)
from library.families import dit_memory
from library.families.offload import BlockOffloader
from tests.reference import load_reference

torch.set_num_threads(1)


def _tiny_model(config: FluxConfig | None = None, seed: int = 0) -> Flux:
    config = config or tiny_flux_config()
    model = Flux(config)
    model.load_state_dict(random_flux_state_dict(config, seed=seed))
    return model


def _inputs(config: FluxConfig, batch: int = 2, height: int = 8, width: int = 6, n_txt: int = 7, seed: int = 0,
            requires_grad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, config.in_channels // 4, height, width, generator=g)
    inputs = dict(img=pack_latents(latents), img_ids=image_ids(batch, height, width),
                  txt=torch.randn(batch, n_txt, config.context_in_dim, generator=g), txt_ids=text_ids(batch, n_txt),
                  timesteps=torch.rand(batch, generator=g), y=torch.randn(batch, config.vec_in_dim, generator=g),
                  guidance=torch.tensor([3.5, 1.0][:batch]) if config.guidance_embed else None)
    if requires_grad:
        for name in ("img", "txt", "y"):
            inputs[name].requires_grad_(True)
    return inputs


def _full_size_shapes() -> dict[str, torch.Tensor]:
    keys = load_reference("checkpoint_keys.json")["flux_dev_checkpoint_keys"]
    return {k: torch.empty(shape, device="meta") for k, shape in keys.items()}


# -- parity with diffusers ----------------------------------------------------------------------------


def _to_diffusers(state_dict: dict[str, torch.Tensor], config: FluxConfig) -> dict[str, torch.Tensor]:
    """Our BFL weights -> diffusers names through diffusers' own converter.

    The converter hard-codes the full-size split of a single block's fused ``linear1``
    (3 x 3072 + 12288 rows). To still test its q/k/v/mlp order, each part of our tiny linear1 is
    placed at the offset it has in a full-size tensor, and the converted parts are cut back.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    hidden, mlp = config.hidden_size, config.mlp_hidden_dim
    full_hidden, full_mlp = 3072, 12288
    checkpoint = {}
    for key, value in state_dict.items():
        if key.startswith("single_blocks.") and ".linear1." in key:
            padded = torch.zeros((3 * full_hidden + full_mlp, *value.shape[1:]))
            for offset, part in zip((0, full_hidden, 2 * full_hidden, 3 * full_hidden),
                                    torch.split(value, [hidden, hidden, hidden, mlp])):
                padded[offset:offset + part.shape[0]] = part
            value = padded
        checkpoint["model.diffusion_model." + key] = value.clone()
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint, f"diffusers' converter left keys unused: {sorted(checkpoint)}"
    for key in converted:
        if key.startswith("single_transformer_blocks.") and (".attn.to_" in key or ".proj_mlp." in key):
            converted[key] = converted[key][:mlp if ".proj_mlp." in key else hidden]
    return converted


@pytest.mark.parametrize("guidance_embed", [True, False], ids=["dev", "schnell"])
def test_matches_diffusers_flux_transformer(guidance_embed):
    from diffusers import FluxTransformer2DModel

    config = tiny_flux_config(guidance_embed)
    state_dict = random_flux_state_dict(config, seed=1)
    ours = Flux(config)
    ours.load_state_dict(state_dict)
    theirs = FluxTransformer2DModel(
        in_channels=config.in_channels, num_layers=config.depth, num_single_layers=config.depth_single_blocks,
        attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_in_dim, pooled_projection_dim=config.vec_in_dim,
        guidance_embeds=guidance_embed, axes_dims_rope=config.axes_dim)
    theirs.load_state_dict(_to_diffusers(state_dict, config), strict=True)

    x = _inputs(config)
    with torch.no_grad():
        expected = theirs(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                          timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                          guidance=x["guidance"], return_dict=False)[0]
        got = ours.eval()(**x)
    assert got.shape == (2, 12, config.in_channels)
    assert expected.abs().mean() > 0.1  # a non-trivial output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# -- text attention mask ------------------------------------------------------------------------------


def test_masked_text_tokens_do_not_affect_the_output():
    config = tiny_flux_config()
    model = _tiny_model(config).eval()
    x = _inputs(config, n_txt=6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False
    changed = dict(x, txt=x["txt"].clone())
    changed["txt"][:, 4:] = torch.randn(2, 2, config.context_in_dim)
    with torch.no_grad():
        masked, masked_changed = model(**x, txt_attention_mask=mask), model(**changed, txt_attention_mask=mask)
        plain, plain_changed = model(**x), model(**changed)
    torch.testing.assert_close(masked, masked_changed, atol=1e-6, rtol=0)
    assert (plain - plain_changed).abs().max() > 1e-3
    assert (masked - plain).abs().max() > 1e-3  # the mask does something even with the same tokens


def test_forward_requires_guidance_for_a_dev_model():
    config = tiny_flux_config()
    x = _inputs(config)
    x["guidance"] = None
    with pytest.raises(ValueError, match="guidance"):
        _tiny_model(config)(**x)


# -- full size on meta, config reading ----------------------------------------------------------------


def test_full_size_layout_matches_the_bfl_checkpoint():
    shapes = _full_size_shapes()
    config = FluxConfig.from_state_dict(shapes)
    assert (config.hidden_size, config.num_heads, config.head_dim) == (3072, 24, 128)
    assert (config.depth, config.depth_single_blocks) == (19, 38)
    assert config.guidance_embed and config.qkv_bias and config.axes_dim == (16, 56, 56)
    assert (config.in_channels, config.context_in_dim, config.vec_in_dim, config.mlp_ratio) == (64, 4096, 768, 4.0)
    assert config == FluxConfig()

    with torch.device("meta"):
        model = Flux(config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    reference = {k: list(v.shape) for k, v in shapes.items()}
    assert ours == reference
    assert max_blocks_to_swap(config) == 35


def test_lora_module_names_match_the_reference_file():
    with torch.device("meta"):
        model = Flux(FluxConfig.from_state_dict(_full_size_shapes()))
    ours = set()
    for path, module in model.named_modules():
        if type(module).__name__ in ("DoubleStreamBlock", "SingleStreamBlock"):
            ours |= {f"lora_unet_{path}.{name}".replace(".", "_")
                     for name, sub in module.named_modules() if isinstance(sub, nn.Linear)}
    reference = {k.split(".", 1)[0] for k in load_reference("lora_keys.json")["flux_dev_lora_dim8_unet_only"]}
    assert ours == reference
    assert isinstance(model.double_blocks[0], DoubleStreamBlock)
    assert isinstance(model.single_blocks[0], SingleStreamBlock)


def test_config_of_pruned_schnell_and_prefixed_state_dicts():
    shapes = _full_size_shapes()
    pruned = {k: v for k, v in shapes.items() if not k.startswith(tuple(f"single_blocks.{i}." for i in range(20, 38)))}
    assert FluxConfig.from_state_dict(pruned).depth_single_blocks == 20

    schnell = {k: v for k, v in shapes.items() if not k.startswith("guidance_in.")}
    config = FluxConfig.from_state_dict(schnell)
    assert not config.guidance_embed
    with torch.device("meta"):
        assert set(Flux(config).state_dict()) == set(schnell)

    prefixed = {"model.diffusion_model." + k: v for k, v in shapes.items()}
    assert FluxConfig.from_state_dict(prefixed) == FluxConfig()
    assert strip_flux_prefix(prefixed).keys() == shapes.keys()

    tiny = random_flux_state_dict(tiny_flux_config(False))
    assert FluxConfig.from_state_dict(tiny) == tiny_flux_config(False)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="img_in.weight"):
        FluxConfig.from_state_dict({"x_embedder.weight": torch.empty(8, 4)})
    shapes = _full_size_shapes()
    del shapes["txt_in.weight"]
    with pytest.raises(ValueError, match="txt_in.weight"):
        FluxConfig.from_state_dict(shapes)
    gap = {k: v for k, v in _full_size_shapes().items() if not k.startswith("double_blocks.3.")}
    with pytest.raises(ValueError, match=r"double_blocks .*\[3\] missing"):
        FluxConfig.from_state_dict(gap)

    odd = random_flux_state_dict(dataclasses.replace(tiny_flux_config(), hidden_size=96, axes_dim=(8, 20, 20)))
    with pytest.raises(ValueError, match="head dim 48 has no default RoPE split"):
        FluxConfig.from_state_dict(odd)
    assert FluxConfig.from_state_dict(odd, axes_dim=(8, 20, 20)).head_dim == 48


def test_tiny_file_round_trip(tmp_path):
    path = write_tiny_flux_dit(tmp_path / "dit.safetensors", prefix="model.diffusion_model.", dtype=torch.bfloat16)
    loaded = load_file(path)
    assert all(k.startswith("model.diffusion_model.") and v.dtype == torch.bfloat16 for k, v in loaded.items())
    config = FluxConfig.from_state_dict(loaded)
    assert config == tiny_flux_config()
    model = Flux(config)
    model.load_state_dict(strip_flux_prefix(loaded))
    assert 2e5 < sum(p.numel() for p in model.parameters()) < 1e6
    expected = random_flux_state_dict(config)
    assert torch.equal(model.final_layer.linear.weight, expected["final_layer.linear.weight"].bfloat16().float())


# -- packing -----------------------------------------------------------------------------------------


def test_pack_unpack_round_trip_and_image_ids():
    latents = torch.randn(2, 16, 6, 10)
    packed = pack_latents(latents)
    assert packed.shape == (2, 15, 64)
    # token (row 1, column 2) holds channel-major 2x2 patch values
    torch.testing.assert_close(packed[0, 1 * 5 + 2].reshape(16, 2, 2), latents[0, :, 2:4, 4:6])
    assert torch.equal(unpack_latents(packed, 6, 10), latents)

    ids = image_ids(2, 6, 10)
    assert ids.shape == (2, 15, 3)
    assert torch.equal(ids[1, 1 * 5 + 2], torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(ids[..., 0], torch.zeros(2, 15))
    assert torch.equal(text_ids(2, 4), torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 16, 5, 4))


# -- gradient checkpointing and block swap --------------------------------------------------------------


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


def _forward_backward(model: Flux, x: dict, trainable: list[nn.Parameter]):
    out = model(**x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = [x[name].grad.clone() for name in ("img", "txt", "y")] + [p.grad.clone() for p in trainable]
    for tensor in [x["img"], x["txt"], x["y"], *trainable]:
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
    config = tiny_flux_config()
    model = _tiny_model(config).train()
    x = _inputs(config, requires_grad=True)
    params = list(model.parameters())
    expected_out, expected = _forward_backward(model, x, params)
    model.enable_gradient_checkpointing(cpu_offload=cpu_offload)
    out, grads = _forward_backward(model, x, params)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    n_blocks = config.depth + config.depth_single_blocks
    assert calls == {"checkpoint": n_blocks, "save_on_cpu": n_blocks if cpu_offload else 0}
    model.disable_gradient_checkpointing()
    assert not model.gradient_checkpointing


def _swap_config() -> FluxConfig:
    return dataclasses.replace(tiny_flux_config(), depth=3, depth_single_blocks=4)


@pytest.mark.parametrize("checkpointing", [None, "plain", "cpu_offload"])
def test_block_swap_gives_the_same_outputs_and_gradients(checkpointing):
    config = _swap_config()
    model = _tiny_model(config).train().requires_grad_(False)
    hooks = [LowRankHook(model.double_blocks[2].img_attn.qkv, seed=1),  # swapped
             LowRankHook(model.single_blocks[3].linear1, seed=2),  # swapped
             LowRankHook(model.double_blocks[0].txt_mlp[0], seed=3)]  # resident
    trainable = [p for hook in hooks for p in hook.parameters()]
    x = _inputs(config, requires_grad=True)
    expected_out, expected = _forward_backward(model, x, trainable)
    with torch.no_grad():
        expected_eval = model.eval()(**x)
    model.train()

    params_before = dict(model.named_parameters())
    if checkpointing:
        model.enable_gradient_checkpointing(cpu_offload=checkpointing == "cpu_offload")
    model.enable_block_swap(2, torch.device("cpu"))
    model.move_to_device_except_swap_blocks(torch.device("cpu"))
    swapped = model._offloader.swapped_blocks
    assert swapped == [model.double_blocks[2], model.single_blocks[2], model.single_blocks[3]]
    for hook in hooks:
        hook.weights_seen.clear()

    out, grads = _forward_backward(model, x, trainable)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**x), expected_eval, rtol=0, atol=0)

    # Swapped blocks ran (forward and recompute) on copies, never on the CPU master Parameters:
    # that is what lets autograd free the device copies; afterwards the masters are back in place.
    for hook in hooks[:2]:
        assert len(hook.weights_seen) == 3  # forward, recompute, no-grad forward
        assert all(w is not hook.linear.weight for w in hook.weights_seen)
    assert all(w is hooks[2].linear.weight for w in hooks[2].weights_seen)
    assert dict(model.named_parameters()).keys() == params_before.keys()
    assert all(p is params_before[k] for k, p in model.named_parameters())


def test_block_swap_limits_and_frozen_weights():
    with torch.device("meta"):
        full = Flux(FluxConfig())
    with pytest.raises(ValueError, match="at most 35"):
        full.enable_block_swap(36, torch.device("cpu"))
    with pytest.raises(ValueError, match="at most 2"):  # 3 double + 4 single blocks, 2 of each kept
        _tiny_model().enable_block_swap(3, torch.device("cpu"))

    config = _swap_config()
    model = _tiny_model(config).train()  # base weights still trainable
    model.enable_block_swap(2, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="trainable weights"):
        model(**_inputs(config))
    with torch.no_grad():  # inference does not care
        model(**_inputs(config))
    model.enable_block_swap(0, torch.device("cpu"))
    assert model._offloader is None


class _Fp8Linear(nn.Module):
    """Stores its weight as float8_e4m3fn and computes in the input dtype (as fp8 base training does)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.to(torch.float8_e4m3fn), requires_grad=False)
        self.register_buffer("gain", torch.full((weight.shape[0],), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.linear(x, self.weight.to(x.dtype))) * self.gain


def test_offloader_keeps_fp8_weights_and_buffers():
    g = torch.Generator().manual_seed(0)
    blocks = [_Fp8Linear(torch.randn(8, 8, generator=g)) for _ in range(4)]
    x = torch.randn(3, 8, requires_grad=True)

    def run(offloader):
        h = x
        for i, block in enumerate(blocks):
            h = offloader.run(i, h) if offloader and offloader.is_swapped(i) else block(h)
        h.sum().backward()
        grad, x.grad = x.grad, None
        return h.detach(), grad

    expected = run(None)
    offloader = BlockOffloader(blocks, [1, 3], "cpu")
    got = run(offloader)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert all(b.weight.dtype == torch.float8_e4m3fn and b.weight.device.type == "cpu" for b in blocks)
    assert all(isinstance(b.weight, nn.Parameter) and "gain" in b._buffers for b in blocks)
    with pytest.raises(ValueError, match="outside"):
        BlockOffloader(blocks, [4], "cpu")
