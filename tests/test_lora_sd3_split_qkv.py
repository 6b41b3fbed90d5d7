"""``networks.lora_sd3`` with ``split_qkv``: block-diagonal LoRAs equal to independent q/k/v LoRAs,
also on MMDiT-X's ``attn2`` and the pre-only context block; saved and loaded in the usual file format."""

from __future__ import annotations

from tests.lora_sd3_helpers import *  # noqa: F401,F403 - the shared constants, tiny models and helpers


# --- 3. split_qkv ------------------------------------------------------------------------------

QKV_CASES = [  # (path, LoRA name): image stream, MMDiT-X's attn2, and the last (pre-only) context block
    ("joint_blocks.1.x_block.attn.qkv", _lora(1, "x_block.attn.qkv")),
    ("joint_blocks.0.x_block.attn2.qkv", _lora(0, "x_block.attn2.qkv")),
    (f"joint_blocks.{LAST}.context_block.attn.qkv", _lora(LAST, "context_block.attn.qkv")),
]


def _split_network(mmdit, multiplier=1.0, **kwargs):
    network = create_network(multiplier, DIM, ALPHA, None, None, mmdit, split_qkv="True", **kwargs)
    network.apply_to(None, mmdit, apply_text_encoder=False, apply_unet=True)
    return network


def test_split_qkv_state_dict_names_ranks_and_alphas():
    mmdit = _tiny_mmdit("sd35_medium")
    plain = create_network(1.0, DIM, ALPHA, None, None, mmdit)
    network = create_network(1.0, DIM, ALPHA, None, None, mmdit, split_qkv="True", emb_dims="[1,1,1,1,1,1]")
    assert set(network.state_dict()) - set(plain.state_dict()) == {
        f"{n}.{s}" for n in EMB_NAMES for s in ("alpha", "lora_down.weight", "lora_up.weight")}
    state = network.state_dict()
    split_names = {n for n in _names(network) if n.endswith("_qkv")}
    assert {name for _, name in QKV_CASES} <= split_names
    assert len(split_names) == 2 * DEPTH + len(MMDIT_X_BLOCKS)
    for name in split_names:
        assert list(state[f"{name}.lora_down.weight"].shape) == [3 * DIM, HIDDEN]
        assert list(state[f"{name}.lora_up.weight"].shape) == [3 * HIDDEN, 3 * DIM]
        assert float(state[f"{name}.alpha"]) == 3 * ALPHA
        lora = getattr(network, name)
        assert isinstance(lora, SplitLoRAModule) and lora in network.unet_loras
        assert lora.scale == pytest.approx(ALPHA / DIM)  # the per-part scale
        assert torch.equal(lora.up_mask, torch.block_diag(*[torch.ones(HIDDEN, DIM)] * 3))
    for name in _names(network) - split_names:
        assert type(getattr(network, name)) is LoRAModule, name
        assert float(state[f"{name}.alpha"]) == ALPHA
    assert "up_mask" not in "".join(state)  # not saved
    # the plain modules made for the plan and then replaced are gone: one module per name
    assert len(network.unet_loras) == len(plain.unet_loras) + len(EMB_NAMES)
    assert len(list(network.parameters())) == 2 * len(network.unet_loras)


def test_split_qkv_with_a_per_type_dim_multiplies_that_rank():
    network = create_network(1.0, DIM, ALPHA, None, None, _tiny_mmdit("sd35_medium"), split_qkv="True",
                             x_attn_dim="2", context_attn_dim="0")
    ranks = _ranks(network)
    assert ranks[_lora(0, "x_block.attn2.qkv")] == 6 and ranks[_lora(0, "x_block.attn2.proj")] == 2
    assert ranks[_lora(0, "x_block.attn.qkv")] == 6
    assert not [n for n in ranks if "_context_block_attn" in n]
    assert float(getattr(network, _lora(0, "x_block.attn.qkv")).alpha) == 3 * ALPHA


@pytest.mark.parametrize("path, name", QKV_CASES)
def test_split_qkv_equals_independent_q_k_v_loras(path, name):
    mmdit = _tiny_mmdit("sd35_medium")
    multiplier = 0.7
    network = _split_network(mmdit, multiplier)
    _randomize_up(network, std=0.3)
    layer = mmdit.get_submodule(path)
    lora = getattr(network, name)
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = layer(x)
    down, up = lora.lora_down.weight.detach(), lora.lora_up.weight.detach()
    weight, bias = layer.weight.detach(), layer.bias.detach()
    expected = []
    for i in range(3):  # q, k, v: each its own rank-DIM LoRA at scale alpha / rank
        rows, ranks = slice(i * HIDDEN, (i + 1) * HIDDEN), slice(i * DIM, (i + 1) * DIM)
        part_lora = (x @ down[ranks].T) @ up[rows, ranks].T * (ALPHA / DIM) * multiplier
        expected.append(x @ weight[rows].T + bias[rows] + part_lora)
    assert torch.allclose(out, torch.cat(expected, dim=-1), atol=1e-5)
    assert (out - (x @ weight.T + bias)).abs().max() > 1e-3  # the LoRA term is really there
    network.restore()


def test_split_qkv_off_diagonal_gradients_are_zero():
    mmdit = _tiny_mmdit("sd35_medium")
    network = _split_network(mmdit)
    network.prepare_grad_etc(None, mmdit)
    network.train()
    _randomize_up(network, std=0.3)
    mmdit(**_inputs(mmdit.config)).square().mean().backward()
    for _, name in QKV_CASES:
        lora = getattr(network, name)
        grad = lora.lora_up.weight.grad
        assert grad is not None
        assert torch.count_nonzero(grad * (1 - lora.up_mask)) == 0
        assert torch.count_nonzero(grad * lora.up_mask) > 0
        assert torch.count_nonzero(lora.lora_down.weight.grad) > 0
    network.restore()


def test_split_qkv_save_and_load_gives_the_same_outputs(tmp_path):
    mmdit = _tiny_mmdit("sd35_medium")
    inputs = _inputs(mmdit.config)
    with torch.no_grad():
        base = mmdit(**inputs)
    network = _split_network(mmdit)
    _randomize_up(network, std=0.1)
    with torch.no_grad():
        split_out = mmdit(**inputs)
    assert not torch.allclose(split_out, base, atol=1e-4)
    path = tmp_path / "split.safetensors"
    network.save_weights(path, None, {"ss_network_module": "networks.lora_sd3"})
    network.restore()

    loaded, weights_sd = create_network_from_weights(1.0, path, None, None, mmdit)
    # a standard LoRA whose fused ups are block-diagonal
    for _, name in QKV_CASES:
        up = weights_sd[f"{name}.lora_up.weight"]
        assert list(up.shape) == [3 * HIDDEN, 3 * DIM]
        assert torch.count_nonzero(up[:HIDDEN, DIM:]) == 0 and torch.count_nonzero(up[HIDDEN:2 * HIDDEN, :DIM]) == 0
        assert torch.count_nonzero(up[:HIDDEN, :DIM]) > 0
        assert getattr(loaded, name).scale == pytest.approx(ALPHA / DIM)
        assert type(getattr(loaded, name)) is LoRAModule
    loaded.apply_to(None, mmdit, apply_text_encoder=False, apply_unet=True)
    with torch.no_grad():
        assert torch.allclose(mmdit(**inputs), split_out, atol=1e-5)
    loaded.restore()

    # loading the file into a fresh split network (e.g. to resume) also gives the same outputs
    resumed = _split_network(mmdit)
    resumed.load_weights(path)
    with torch.no_grad():
        assert torch.allclose(mmdit(**inputs), split_out, atol=1e-5)
    resumed.restore()


def test_split_qkv_loading_a_dense_up_keeps_only_the_blocks(caplog):
    network = create_network(1.0, DIM, ALPHA, None, None, _tiny_mmdit(), split_qkv="True")
    name = _lora(LAST, "context_block.attn.qkv")
    dense = torch.ones_like(network.state_dict()[f"{name}.lora_up.weight"])
    with caplog.at_level(logging.WARNING, logger="networks.lora_dit"):
        network.load_state_dict_checked({f"{name}.lora_up.weight": dense})
    assert "block-diagonal" in caplog.text
    lora = getattr(network, name)
    assert torch.equal(lora.lora_up.weight.detach(), lora.up_mask)
