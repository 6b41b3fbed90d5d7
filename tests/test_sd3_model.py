"""The SD3 / SD3.5 MMDiT in the SAI layout: parity with diffusers (SD3 Medium, 3.5 Large, 3.5 Medium
switches), full-size layouts on meta, config reading, LoRA names, the position-embedding options,
gradient checkpointing and block swap."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from library.demo.tiny_sd3 import (
    TINY_BASE_SIZE,
    TINY_SD3_VARIANTS,
    random_sd3_state_dict,
    tiny_sd3_config,
    write_tiny_sd3_mmdit,
)
from library.families import dit_memory
from library.families.sd3.model import (
    JointBlock,
    SD3Config,
    SD3MMDiT,
    max_blocks_to_swap,
    read_pos_embed_grid,
    sincos_pos_embed_table,
    strip_sd3_prefix,
)
from tests.reference import load_reference

torch.set_num_threads(1)

FULL_SIZE = {  # reference entry -> (hidden, depth, table size, MMDiT-X layers, qk-norm)
    "sd3_medium": ("sd3_medium_mmdit_keys", 1536, 24, 192, (), None),
    "sd35_large": ("sd35_large_mmdit_keys", 2432, 38, 192, (), "rms"),
    "sd35_medium": ("sd35_medium_mmdit_keys", 1536, 24, 384, tuple(range(13)), "rms"),
}


def _tiny_model(variant: str = "sd3_medium", seed: int = 0, config: SD3Config | None = None) -> SD3MMDiT:
    config = config or tiny_sd3_config(variant)
    model = SD3MMDiT(config)
    model.load_state_dict(random_sd3_state_dict(config, seed=seed))
    return model


def _inputs(config: SD3Config, batch: int = 2, height: int = 12, width: int = 10, n_ctx: int = 7, seed: int = 0,
            requires_grad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = dict(x=torch.randn(batch, config.in_channels, height, width, generator=g),
                  timesteps=torch.rand(batch, generator=g) * 1000,
                  context=torch.randn(batch, n_ctx, config.context_in_dim, generator=g),
                  y=torch.randn(batch, config.adm_in_channels, generator=g))
    if requires_grad:
        for name in ("x", "context", "y"):
            inputs[name].requires_grad_(True)
    return inputs


def _full_size_shapes(variant: str) -> dict[str, torch.Tensor]:
    keys = load_reference("checkpoint_keys.json")[FULL_SIZE[variant][0]]
    return {k: torch.empty(shape, device="meta") for k, shape in keys.items()}


# -- parity with diffusers ----------------------------------------------------------------------------


def _diffusers_model(config: SD3Config, state_dict: dict[str, torch.Tensor]):
    """diffusers' SD3Transformer2DModel with our weights, converted by diffusers' own converter."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    checkpoint = {"model.diffusion_model." + k: v.clone() for k, v in state_dict.items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint, f"diffusers' converter left keys unused: {sorted(checkpoint)}"
    model = SD3Transformer2DModel(
        sample_size=2 * TINY_BASE_SIZE, patch_size=config.patch_size, in_channels=config.in_channels,
        num_layers=config.depth, attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_in_dim, caption_projection_dim=config.hidden_size,
        pooled_projection_dim=config.adm_in_channels, out_channels=config.out_channels,
        pos_embed_max_size=config.pos_embed_max_size, dual_attention_layers=config.x_block_self_attn_layers,
        qk_norm="rms_norm" if config.qk_norm else None)
    model.load_state_dict(converted, strict=True)
    return model.eval()


@pytest.mark.parametrize("variant", TINY_SD3_VARIANTS)
def test_matches_diffusers_sd3_transformer(variant):
    config = tiny_sd3_config(variant)
    state_dict = random_sd3_state_dict(config, seed=1)
    ours = SD3MMDiT(config)
    ours.load_state_dict(state_dict)
    theirs = _diffusers_model(config, state_dict)

    # 6 x 5 patches in a 16 x 16 (32 x 32) table: an odd margin checks the crop's rounding (floor).
    x = _inputs(config, height=12, width=10)
    with torch.no_grad():
        expected = theirs(hidden_states=x["x"], encoder_hidden_states=x["context"], pooled_projections=x["y"],
                          timestep=x["timesteps"], return_dict=False)[0]
        got = ours.eval()(**x)
    assert got.shape == (2, 16, 12, 10)
    assert expected.abs().mean() > 0.1  # a non-trivial output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sincos_table_is_diffusers_table():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for dim, max_size, base in ((64, 16, 8), (128, 24, 8), (64, 12, 12)):
        expected = get_2d_sincos_pos_embed(dim, max_size, base_size=base, output_type="pt").float()[None]
        torch.testing.assert_close(sincos_pos_embed_table(dim, max_size, base), expected, atol=2e-6, rtol=0)


# -- full size on meta, config reading ----------------------------------------------------------------


@pytest.mark.parametrize("variant", list(FULL_SIZE))
def test_full_size_layout_matches_the_sai_checkpoint(variant):
    _, hidden, depth, table, self_attn, qk_norm = FULL_SIZE[variant]
    shapes = _full_size_shapes(variant)
    config = SD3Config.from_state_dict(shapes)
    assert (config.hidden_size, config.depth, config.num_heads, config.head_dim) == (hidden, depth, depth, 64)
    assert (config.pos_embed_max_size, config.x_block_self_attn_layers, config.qk_norm) == (table, self_attn, qk_norm)
    assert (config.in_channels, config.out_channels, config.patch_size) == (16, 16, 2)
    assert (config.context_in_dim, config.adm_in_channels, config.mlp_ratio) == (4096, 2048, 4.0)
    assert config.final_context_pre_only
    if variant == "sd3_medium":
        assert config == SD3Config()

    with torch.device("meta"):
        model = SD3MMDiT(config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    reference = {k: list(v.shape) for k, v in shapes.items()}
    assert ours == reference
    assert max_blocks_to_swap(config) == depth - 2


@pytest.mark.parametrize("variant", list(FULL_SIZE))
def test_lora_module_names_match_the_reference_file(variant):
    with torch.device("meta"):
        model = SD3MMDiT(SD3Config.from_state_dict(_full_size_shapes(variant)))
    ours = set()
    for path, module in model.named_modules():
        if type(module).__name__ == "JointBlock":
            ours |= {f"lora_unet_{path}.{name}".replace(".", "_")
                     for name, sub in module.named_modules() if isinstance(sub, nn.Linear)}
    entry = f"{variant}_lora_dim8_unet_only"
    reference = {k.split(".", 1)[0] for k in load_reference("lora_keys.json")[entry]}
    assert ours == reference
    assert all(isinstance(block, JointBlock) for block in model.joint_blocks)


def test_config_of_tiny_prefixed_and_full_checkpoints():
    for variant in TINY_SD3_VARIANTS:
        assert SD3Config.from_state_dict(random_sd3_state_dict(tiny_sd3_config(variant))) == tiny_sd3_config(variant)

    shapes = _full_size_shapes("sd35_medium")
    # A full SAI checkpoint: the MMDiT under the prefix beside text encoders and the VAE.
    full = {"model.diffusion_model." + k: v for k, v in shapes.items()}
    full["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.empty(768, device="meta")
    full["first_stage_model.decoder.conv_in.weight"] = torch.empty(512, 16, 3, 3, device="meta")
    assert strip_sd3_prefix(full).keys() == shapes.keys()
    assert SD3Config.from_state_dict(full) == SD3Config.from_state_dict(shapes)
    assert strip_sd3_prefix(shapes).keys() == shapes.keys()

    pruned = {k: v for k, v in _full_size_shapes("sd3_medium").items()
              if not k.startswith(tuple(f"joint_blocks.{i}." for i in range(12, 23)))}
    pruned = {k.replace("joint_blocks.23.", "joint_blocks.12."): v for k, v in pruned.items()}
    config = SD3Config.from_state_dict(pruned)
    assert config.depth == 13 and config.final_context_pre_only


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="x_embedder.proj.weight.*FLUX"):
        SD3Config.from_state_dict({"img_in.weight": torch.empty(8, 4)})
    with pytest.raises(ValueError, match="Diffusers SD3Transformer2DModel"):
        SD3Config.from_state_dict({"pos_embed.proj.weight": torch.empty(8, 16, 2, 2)})

    shapes = _full_size_shapes("sd3_medium")
    no_table = {k: v for k, v in shapes.items() if k != "pos_embed"}
    with pytest.raises(ValueError, match="'pos_embed' is missing.*copy"):
        SD3Config.from_state_dict(no_table)
    gap = {k: v for k, v in shapes.items() if not k.startswith("joint_blocks.3.")}
    with pytest.raises(ValueError, match=r"joint_blocks .*\[3\] missing"):
        SD3Config.from_state_dict(gap)
    early_pre_only = {k: v for k, v in shapes.items() if not k.startswith("joint_blocks.5.context_block.attn.proj")}
    with pytest.raises(ValueError, match=r"context blocks \[5, 23\] have no attn.proj"):
        SD3Config.from_state_dict(early_pre_only)
    wrong_mod = dict(shapes, **{"joint_blocks.2.x_block.adaLN_modulation.1.weight": torch.empty(13824, 1536,
                                                                                               device="meta")})
    with pytest.raises(ValueError, match="joint_blocks.2.x_block.adaLN_modulation.1.weight has 13824 rows"):
        SD3Config.from_state_dict(wrong_mod)
    with pytest.raises(ValueError, match="pos_embed must be"):
        SD3Config.from_state_dict(dict(shapes, pos_embed=torch.empty(1, 1000, 1536, device="meta")))


def test_tiny_file_round_trip(tmp_path):
    path = write_tiny_sd3_mmdit(tmp_path / "mmdit.safetensors", "sd35_medium", dtype=torch.bfloat16)
    loaded = load_file(path)
    assert all(k.startswith("model.diffusion_model.") and v.dtype == torch.bfloat16 for k, v in loaded.items())
    config = SD3Config.from_state_dict(loaded)
    assert config == tiny_sd3_config("sd35_medium")
    model = SD3MMDiT(config)
    model.load_state_dict(strip_sd3_prefix(loaded))
    assert 2e5 < sum(p.numel() for p in model.parameters()) < 2e6
    expected = random_sd3_state_dict(config)
    assert torch.equal(model.pos_embed, expected["pos_embed"].bfloat16().float())
    bare = load_file(write_tiny_sd3_mmdit(tmp_path / "bare.safetensors", prefix=""))
    assert bare.keys() == random_sd3_state_dict(tiny_sd3_config()).keys()


def test_forward_checks_shapes():
    config = tiny_sd3_config()
    model = _tiny_model().eval()
    x = _inputs(config)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(**dict(x, x=torch.randn(2, 16, 11, 10)))
    with pytest.raises(ValueError, match="context must be"):
        model(**dict(x, context=torch.randn(2, 7, 8)))
    with pytest.raises(ValueError, match="exceeds the position table of 16x16 patches"):
        model(**dict(x, x=torch.randn(2, 16, 34, 8)))


# -- position-embedding options -----------------------------------------------------------------------


def _windows(table: torch.Tensor, h: int, w: int) -> dict[tuple[int, int], torch.Tensor]:
    m = math.isqrt(table.shape[1])
    cells = table.reshape(m, m, -1)
    return {(t, l): cells[t:t + h, l:l + w].reshape(1, h * w, -1) for t in range(m - h + 1) for l in range(m - w + 1)}


def test_random_crop_of_the_position_table():
    model = _tiny_model().train()
    center = model.position_embedding(6, 5)
    windows = _windows(model.pos_embed, 6, 5)
    assert torch.equal(center, windows[(5, 5)])  # (16 - 6) // 2, (16 - 5) // 2

    state = torch.get_rng_state()
    assert torch.equal(model.position_embedding(6, 5), center)  # rate 0: centre, no random numbers drawn
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.set_pos_emb_random_crop_rate(1.5)

    model.set_pos_emb_random_crop_rate(1.0)
    drawn = []
    for seed in range(6):
        torch.manual_seed(seed)
        first = model.position_embedding(6, 5)
        torch.manual_seed(seed)
        assert torch.equal(model.position_embedding(6, 5), first)  # deterministic under a seed
        offsets = [pos for pos, window in windows.items() if torch.equal(window, first)]
        assert len(offsets) == 1  # a real window of the table
        drawn.append(offsets[0])
    assert len(set(drawn)) > 3 and any(pos != (5, 5) for pos in drawn)
    model.eval()
    assert torch.equal(model.position_embedding(6, 5), center)  # evaluation always uses the centre

    # The forward pass follows the same window.
    config = tiny_sd3_config()
    x = _inputs(config)
    with torch.no_grad():
        eval_out = model(**x)
        model.train()
        torch.manual_seed(3)
        out_a = model(**x)
        torch.manual_seed(3)
        out_b = model(**x)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    assert (out_a - eval_out).abs().max() > 1e-3


def _diffusers_sincos(dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """diffusers' sin-cos of an explicit (rows, cols) coordinate grid, as an independent reference."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

    grid = torch.stack(torch.meshgrid(cols.double(), rows.double(), indexing="xy"), dim=0)
    return get_2d_sincos_pos_embed_from_grid(dim, grid.reshape(2, 1, len(rows), len(cols))).float()[None]


def test_scaled_position_embedding():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    config = tiny_sd3_config("sd35_medium")  # 32 x 32 table
    model = _tiny_model("sd35_medium").train()
    # The model's table as diffusers generates it (base grid 8 of 32: step 1/4).
    model.pos_embed.copy_(get_2d_sincos_pos_embed(64, 32, base_size=8, output_type="pt").float()[None])
    crop = model.position_embedding(8, 8)

    with pytest.raises(ValueError, match="pos_embed is not a 2-D sin-cos table"):
        SD3MMDiT(config).enable_scaled_pos_embed()  # zeros: weights not loaded
    model.enable_scaled_pos_embed()
    grid = read_pos_embed_grid(model.pos_embed)
    assert (grid.base_size, grid.step, grid.offset) == (8, 0.25, 0.0)
    assert read_pos_embed_grid(model.pos_embed.bfloat16()).base_size == 8  # a bf16 table fits too

    # The base grid gets exactly the centre crop of the stored table.
    torch.testing.assert_close(model.position_embedding(8, 8), crop, atol=2e-6, rtol=0)
    # Other grids: cell u = c0 + (i - (n - 1) / 2) * 8 / sqrt(h * w), c0 = (32 - 8) // 2 + 3.5; coordinate u / 4.
    for h, w in ((4, 4), (16, 16), (4, 16), (6, 10)):
        step = 8 / math.sqrt(h * w)
        rows = (15.5 + (torch.arange(h) - (h - 1) / 2) * step) / 4
        cols = (15.5 + (torch.arange(w) - (w - 1) / 2) * step) / 4
        torch.testing.assert_close(model.position_embedding(h, w), _diffusers_sincos(64, rows, cols),
                                   atol=2e-6, rtol=0)
    # Beyond the table is fine in the scaled mode (no crop).
    assert model.position_embedding(40, 8).shape == (1, 320, 64)

    # Random centre: deterministic under a seed, inside the table's cell range, different from c0.
    model.set_pos_emb_random_crop_rate(1.0)
    torch.manual_seed(0)
    shifted = model.position_embedding(4, 4)
    torch.manual_seed(0)
    assert torch.equal(model.position_embedding(4, 4), shifted)
    assert (shifted - model.eval().position_embedding(4, 4)).abs().max() > 1e-3
    model.train()

    # The forward pass with the base grid (16 x 16 latents) equals the cropped table's.
    model.set_pos_emb_random_crop_rate(0.0)
    x = _inputs(config, height=16, width=16)
    with torch.no_grad():
        scaled_out = model(**x)
        model.enable_scaled_pos_embed(False)
        torch.testing.assert_close(model(**x), scaled_out, atol=1e-5, rtol=0)
    model.enable_scaled_pos_embed(base_size=4)  # explicit base grid
    assert model.position_embedding(4, 4).shape == (1, 16, 64)
    with pytest.raises(ValueError, match="base_size 40"):
        model.enable_scaled_pos_embed(base_size=40)


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


def _forward_backward(model: SD3MMDiT, x: dict, trainable: list[nn.Parameter]):
    out = model(**x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = [x[name].grad.clone() for name in ("x", "context", "y")] + [p.grad.clone() for p in trainable]
    for tensor in [x["x"], x["context"], x["y"], *trainable]:
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
    config = tiny_sd3_config("sd35_medium")
    model = _tiny_model("sd35_medium").train()
    x = _inputs(config, requires_grad=True)
    params = list(model.parameters())
    expected_out, expected = _forward_backward(model, x, params)
    model.enable_gradient_checkpointing(cpu_offload=cpu_offload)
    out, grads = _forward_backward(model, x, params)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert calls == {"checkpoint": config.depth, "save_on_cpu": config.depth if cpu_offload else 0}
    model.disable_gradient_checkpointing()
    assert not model.gradient_checkpointing


@pytest.mark.parametrize("checkpointing", [None, "plain", "cpu_offload"])
def test_block_swap_gives_the_same_outputs_and_gradients(checkpointing):
    config = tiny_sd3_config("sd35_medium")
    model = _tiny_model("sd35_medium").train().requires_grad_(False)
    hooks = [LowRankHook(model.joint_blocks[3].context_block.attn.qkv, seed=1),  # swapped, pre-only stream
             LowRankHook(model.joint_blocks[2].x_block.mlp.fc1, seed=2),  # swapped
             LowRankHook(model.joint_blocks[0].x_block.attn2.qkv, seed=3)]  # resident, MMDiT-X attention
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
    model.prepare_block_swap_before_forward()
    assert model._offloader.swapped_blocks == [model.joint_blocks[2], model.joint_blocks[3]]
    for hook in hooks:
        hook.weights_seen.clear()

    out, grads = _forward_backward(model, x, trainable)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**x), expected_eval, rtol=0, atol=0)

    # Swapped blocks ran (forward and recompute) on copies, never on the CPU master Parameters.
    for hook in hooks[:2]:
        assert len(hook.weights_seen) == 3  # forward, recompute, no-grad forward
        assert all(w is not hook.linear.weight for w in hook.weights_seen)
    assert all(w is hooks[2].linear.weight for w in hooks[2].weights_seen)
    assert all(p is params_before[k] for k, p in model.named_parameters())
    assert model.state_dict().keys() == random_sd3_state_dict(config).keys()


def test_block_swap_limits_and_frozen_weights():
    with torch.device("meta"):
        full = SD3MMDiT(SD3Config.from_state_dict(_full_size_shapes("sd35_large")))
    with pytest.raises(ValueError, match="at most 36"):
        full.enable_block_swap(37, torch.device("cpu"))
    with pytest.raises(ValueError, match="at most 2, keeping 2"):
        _tiny_model().enable_block_swap(3, torch.device("cpu"))

    config = tiny_sd3_config()
    model = _tiny_model().train()  # base weights still trainable
    model.enable_block_swap(2, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="trainable weights"):
        model(**_inputs(config))
    with torch.no_grad():  # inference does not care
        model(**_inputs(config))
    model.enable_block_swap(0, torch.device("cpu"))
    assert model._offloader is None


def test_dtype_device_and_bf16_forward():
    config = tiny_sd3_config("sd35_large")
    x = _inputs(config)
    model = _tiny_model("sd35_large").eval()
    with torch.no_grad():
        reference = model(**x)
        model.to(torch.bfloat16)
        assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
        assert model.pos_embed.dtype == torch.bfloat16  # the table is a buffer: it follows the model
        out = model(**{k: v if k == "timesteps" else v.bfloat16() for k, v in x.items()})
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=0.15, rtol=0.05)
