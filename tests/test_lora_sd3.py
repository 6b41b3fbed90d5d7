"""``networks.lora_sd3``: the SD3 / SD3.5 LoRA network module (kohya plug-in API).

Full-size key/shape parity with ``reference/lora_keys.json`` for SD3 Medium (with and without
CLIP-L/G), SD3.5 Large and SD3.5 Medium (models on the meta device), the SD3 ``--network_args``
on the tiny MMDiTs (block indices, per-type ranks, ``emb_dims`` including the 2x2 patch conv),
applying/merging/round-tripping files, the three text-encoder learning rates, and the
pass-through of dropouts and LoRA+ ratios. ``split_qkv``: ``test_lora_sd3_split_qkv.py``.
"""

from __future__ import annotations

from tests.lora_sd3_helpers import *  # noqa: F401,F403 - the shared constants, tiny models and helpers


# --- 1. full size on meta: the file format -----------------------------------------------------

def _full_size_mmdit(variant: str) -> SD3MMDiT:
    keys = load_reference("checkpoint_keys.json")[f"{variant}_mmdit_keys"]
    shapes = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    with torch.device("meta"):
        return SD3MMDiT(SD3Config.from_state_dict(shapes))


@pytest.fixture(scope="module")
def full_size_encoders():
    """CLIP-L, CLIP-G (both with projection) and T5-XXL with their real shapes, on the meta device."""
    with torch.device("meta"):
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77, projection_dim=768))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
            hidden_act="gelu", vocab_size=49408, max_position_embeddings=77, projection_dim=1280))
        t5 = T5EncoderModel(T5Config(
            d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
            vocab_size=32128, is_encoder_decoder=False, use_cache=False))
    return [clip_l, clip_g, t5]


@pytest.mark.parametrize("case, variant, apply_text_encoder", [
    ("sd3_medium_lora_dim8_unet_only", "sd3_medium", False),
    ("sd3_medium_lora_dim8_with_clip", "sd3_medium", True),
    ("sd35_large_lora_dim8_unet_only", "sd35_large", False),
    ("sd35_medium_lora_dim8_unet_only", "sd35_medium", False),
])
def test_full_size_keys_and_shapes_match_reference(full_size_encoders, case, variant, apply_text_encoder):
    mmdit = _full_size_mmdit(variant)
    if variant == "sd3_medium":
        assert mmdit.config == SD3Config()  # the reference file is for the defaults
    network = create_network(1.0, 8, 4, None, full_size_encoders, mmdit)
    network.apply_to(full_size_encoders, mmdit, apply_text_encoder=apply_text_encoder, apply_unet=True)
    try:
        expected = load_reference("lora_keys.json")[case]
        got = _shapes(network)
        assert sorted(set(got) - set(expected))[:5] == [] and sorted(set(expected) - set(got))[:5] == []
        assert got == expected
        assert network.train_t5xxl is False
    finally:
        network.restore()


def test_full_size_split_qkv_keeps_the_names_and_triples_the_qkv_ranks(full_size_encoders):
    mmdit = _full_size_mmdit("sd35_medium")  # has attn2 and a pre-only last context block
    network = create_network(1.0, 8, 4, None, full_size_encoders, mmdit, split_qkv="True")
    network.apply_to(full_size_encoders, mmdit, apply_text_encoder=False, apply_unet=True)
    try:
        expected = dict(load_reference("lora_keys.json")["sd35_medium_lora_dim8_unet_only"])
        assert "lora_unet_joint_blocks_23_context_block_attn_qkv.lora_up.weight" in expected
        assert "lora_unet_joint_blocks_12_x_block_attn2_qkv.lora_up.weight" in expected
        for key, shape in expected.items():
            parts = 3 if "_qkv." in key else 1
            if key.endswith("lora_down.weight"):
                expected[key] = [shape[0] * parts, shape[1]]
            elif key.endswith("lora_up.weight"):
                expected[key] = [shape[0], shape[1] * parts]
        assert _shapes(network) == expected
    finally:
        network.restore()


def test_full_size_train_t5xxl_adds_lora_te3(full_size_encoders):
    mmdit = _full_size_mmdit("sd3_medium")
    network = create_network(1.0, 8, 4, None, full_size_encoders, mmdit, train_t5xxl="True")
    network.apply_to(full_size_encoders, mmdit, apply_text_encoder=True, apply_unet=True)
    try:
        shapes = _shapes(network)
        reference = load_reference("lora_keys.json")["sd3_medium_lora_dim8_with_clip"]
        assert {k: v for k, v in shapes.items() if not k.startswith("lora_te3_")} == reference
        te3 = {k.partition(".")[0] for k in shapes if k.startswith("lora_te3_")}
        assert len(te3) == 24 * 7  # q, k, v, o, wi_0, wi_1, wo per T5 block
        assert shapes["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] == [8, 4096]
        assert shapes["lora_te3_encoder_block_23_layer_1_DenseReluDense_wo.lora_down.weight"] == [8, 10240]
        assert network.train_t5xxl is True
    finally:
        network.restore()


# --- 2. network_args on the tiny models ----------------------------------------------------------

@pytest.mark.parametrize("variant", ["sd3_medium", "sd35_large", "sd35_medium"])
def test_default_network_targets_every_block_linear_and_the_clips(variant):
    network = create_network(1.0, DIM, ALPHA, None, _tiny_encoders(), _tiny_mmdit(variant))
    expected = {_lora(i, p) for i in range(DEPTH) for p in _expected_block_layers(variant, i)}
    assert {lora.lora_name for lora in network.unet_loras} == expected
    # 10 Linears a block, 7 in the last (pre-only context), 2 more with attn2 (blocks 0 and 1 of 3.5 Medium)
    assert len(expected) == (12 + 12 + 10 + 7 if variant == "sd35_medium" else 10 * 3 + 7)
    names = _names(network)
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2" in names
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj" in names
    assert len([n for n in names if n.startswith("lora_te1_")]) == len([n for n in names if n.startswith("lora_te2_")])
    assert not [n for n in names if n.startswith("lora_te3_")]  # T5 only with train_t5xxl
    assert not [n for n in names if "text_projection" in n]
    assert not EMB_NAMES & names  # no embedders by default
    assert set(_ranks(network).values()) == {DIM}
    assert all(float(lora.alpha) == ALPHA for lora in network.loras)
    assert network.train_t5xxl is False and network.num_text_encoders == 3


@pytest.mark.parametrize("text, expected", [
    ("0", {0}), ("1-2", {1, 2}), ("none", set()), ("NONE", set()), ("all", set(range(DEPTH))),
    (" 0, 3 ", {0, 3}), ("0,2-3", {0, 2, 3}), ("3", {3}),
])
def test_train_block_indices(text, expected):
    variant = "sd35_medium"
    network = create_network(1.0, DIM, ALPHA, None, _tiny_encoders(), _tiny_mmdit(variant), train_block_indices=text)
    assert _block_indices(network) == expected
    # every layer of a chosen block is adapted, and nothing else of the MMDiT
    assert {lora.lora_name for lora in network.unet_loras} == {
        _lora(i, p) for i in expected for p in _expected_block_layers(variant, i)}
    assert network.text_encoder_loras  # the text encoders are not affected


@pytest.mark.parametrize("text", ["x", "4", "2-1", "0-9", "0,,1", "-1", "1;2", "1.5"])
def test_bad_train_block_indices_raise_with_the_key(text):
    with pytest.raises(ValueError, match="train_block_indices"):
        create_network(1.0, DIM, ALPHA, None, None, _tiny_mmdit(), train_block_indices=text)


def test_per_type_dims_set_ranks_and_zero_removes_modules():
    variant = "sd35_medium"
    dims = {"context_attn_dim": 2, "context_mlp_dim": 0, "context_mod_dim": 3, "x_attn_dim": 1, "x_mlp_dim": 5,
            "x_mod_dim": 0}
    network = create_network(1.0, DIM, ALPHA, None, _tiny_encoders(), _tiny_mmdit(variant),
                             **{k: str(v) for k, v in dims.items()})
    expected = {_lora(i, p): dims[key] for i in range(DEPTH) for p, key in _expected_block_layers(variant, i).items()
                if dims[key]}
    assert {lora.lora_name: lora.lora_dim for lora in network.unet_loras} == expected
    # x_attn_dim covers MMDiT-X's attn2; the pre-only block's qkv follows context_attn_dim
    assert expected[_lora(0, "x_block.attn2.qkv")] == 1 and expected[_lora(1, "x_block.attn2.proj")] == 1
    assert expected[_lora(LAST, "context_block.attn.qkv")] == 2
    assert not [n for n in expected if n.endswith(("_mlp_fc1", "_mlp_fc2")) and "_context_block_" in n]
    assert not [n for n in expected if n.endswith("_x_block_adaLN_modulation_1")]
    # the text encoders keep network_dim, and the alphas stay network_alpha whatever the rank
    assert {lora.lora_dim for lora in network.text_encoder_loras} == {DIM}
    state = network.state_dict()
    assert all(float(v) == ALPHA for k, v in state.items() if k.endswith(".alpha"))
    assert list(state[_lora(0, "x_block.mlp.fc1") + ".lora_down.weight"].shape) == [5, HIDDEN]
    assert list(state[_lora(0, "x_block.mlp.fc1") + ".lora_up.weight"].shape) == [4 * HIDDEN, 5]


@pytest.mark.parametrize("key", lora_sd3.TYPE_DIM_KEYS)
def test_each_per_type_dim_of_zero_removes_exactly_its_layers(key):
    variant = "sd35_medium"
    network = create_network(1.0, DIM, ALPHA, None, None, _tiny_mmdit(variant), **{key: "0"})
    assert _names(network) == {_lora(i, p) for i in range(DEPTH)
                               for p, k in _expected_block_layers(variant, i).items() if k != key}


@pytest.mark.parametrize("value", ["2.5", "two", "-1"])
def test_bad_per_type_dim_raises(value):
    with pytest.raises(ValueError, match="x_mlp_dim"):
        create_network(1.0, DIM, ALPHA, None, None, _tiny_mmdit(), x_mlp_dim=value)


def test_emb_dims_add_the_embedders_and_the_final_layer():
    mmdit = _tiny_mmdit()
    config = mmdit.config
    network = create_network(1.0, DIM, ALPHA, None, None, mmdit, emb_dims="[2,2,2,2,2,2]")
    ranks = _ranks(network)
    assert {n: r for n, r in ranks.items() if "_joint_blocks_" not in n} == dict.fromkeys(EMB_NAMES, 2)
    state = _shapes(network)
    assert state["lora_unet_context_embedder.lora_down.weight"] == [2, config.context_in_dim]
    assert state["lora_unet_t_embedder_mlp_0.lora_down.weight"] == [2, 256]  # the timestep embedding width
    assert state["lora_unet_y_embedder_mlp_0.lora_down.weight"] == [2, config.adm_in_channels]
    assert state["lora_unet_y_embedder_mlp_2.lora_up.weight"] == [HIDDEN, 2]
    assert state["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"] == [2 * HIDDEN, 2]
    assert state["lora_unet_final_layer_linear.lora_up.weight"] == [4 * config.out_channels, 2]
    # the patch embedder is a 2x2 conv of stride 2: the LoRA down is the same conv, the up a 1x1 conv
    lora = network.lora_unet_x_embedder_proj
    assert lora.is_conv and isinstance(lora.lora_down, torch.nn.Conv2d)
    assert lora.lora_down.kernel_size == (2, 2) and lora.lora_down.stride == (2, 2)
    assert lora.lora_up.kernel_size == (1, 1)
    assert state["lora_unet_x_embedder_proj.lora_down.weight"] == [2, config.in_channels, 2, 2]
    assert state["lora_unet_x_embedder_proj.lora_up.weight"] == [HIDDEN, 2, 1, 1]
    assert all(float(lora.alpha) == ALPHA for lora in network.loras)


def test_emb_dims_select_entries_in_order():
    network = create_network(1.0, DIM, ALPHA, None, None, _tiny_mmdit(), emb_dims=" 0, 3, 0, 1, 0, 5 ")
    assert {n: r for n, r in _ranks(network).items() if "_joint_blocks_" not in n} == {
        "lora_unet_t_embedder_mlp_0": 3, "lora_unet_t_embedder_mlp_2": 3, "lora_unet_y_embedder_mlp_0": 1,
        "lora_unet_y_embedder_mlp_2": 1, "lora_unet_final_layer_linear": 5}
    network = create_network(1.0, DIM, ALPHA, None, None, _tiny_mmdit(), emb_dims="[0,0,0,0,0,0]")
    assert not EMB_NAMES & _names(network)


def test_x_embedder_lora_changes_the_output():
    mmdit = _tiny_mmdit()
    inputs = _inputs(mmdit.config)
    with torch.no_grad():
        base = mmdit(**inputs)
    network = create_network(1.0, DIM, ALPHA, None, None, mmdit, emb_dims="[0,0,2,0,0,0]")
    network.apply_to(None, mmdit, apply_text_encoder=False, apply_unet=True)
    name = "lora_unet_x_embedder_proj"
    lora = getattr(network, name)
    x = inputs["x"]
    with torch.no_grad():
        assert torch.equal(mmdit(**inputs), base)
        _randomize_up(network, std=0.3, only=name)
        out = mmdit(**inputs)
        assert (out - base).abs().max() > 1e-3
        # the conv LoRA term is up(down(x)) * scale, with down a 2x2/stride-2 conv
        conv = mmdit.x_embedder.proj
        expected = (lora.org_forward(x)
                    + torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, lora.lora_down.weight, stride=2),
                                                 lora.lora_up.weight) * (ALPHA / 2))
        assert torch.allclose(conv(x), expected, atol=1e-5)
    network.restore()


@pytest.mark.parametrize("value", ["[2,2,2,2,2]", "[2,2,2,2,2,2,2]", "[a,0,0,0,0,0]", "[1,0,0,0,0,-1]",
                                   "[1.5,0,0,0,0,0]", "[]"])
def test_malformed_emb_dims_raise(value):
    with pytest.raises(ValueError, match="emb_dims"):
        create_network(1.0, DIM, ALPHA, None, None, _tiny_mmdit(), emb_dims=value)


def test_not_an_sd3_model_raises():
    with pytest.raises(ValueError, match="not an SD3 MMDiT"):
        create_network(1.0, DIM, ALPHA, None, None, torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_bad_network_dim_raises():
    with pytest.raises(ValueError, match="network_dim"):
        create_network(1.0, 0, ALPHA, None, None, _tiny_mmdit())


def test_defaults_without_dim_and_alpha():
    network = create_network(1.0, None, None, None, None, _tiny_mmdit())
    assert {(lora.lora_dim, float(lora.alpha)) for lora in network.loras} == {(4, 1.0)}


# --- 4. applied network, merge, files ----------------------------------------------------------

@pytest.mark.parametrize("variant", ["sd3_medium", "sd35_medium"])
def test_applied_network_changes_the_output_and_multiplier_zero_does_not(variant):
    mmdit = _tiny_mmdit(variant)
    inputs = _inputs(mmdit.config)
    with torch.no_grad():
        base = mmdit(**inputs)
    network = create_network(1.0, DIM, ALPHA, None, None, mmdit, emb_dims="[2,2,2,2,2,2]")
    network.apply_to(None, mmdit, apply_text_encoder=False, apply_unet=True)
    with torch.no_grad():
        assert torch.equal(mmdit(**inputs), base)  # lora_up starts at zero
        _randomize_up(network)
        lora_out = mmdit(**inputs)
        assert (lora_out - base).abs().max() > 1e-3
        network.set_multiplier(0.0)
        assert torch.allclose(mmdit(**inputs), base, atol=1e-6)
        network.set_multiplier(1.0)
        assert torch.equal(mmdit(**inputs), lora_out)
    network.restore()
    with torch.no_grad():
        assert torch.equal(mmdit(**inputs), base)


def _encoder_outputs(encoders, clip_tokens, t5_tokens):
    clip_l, clip_g, t5 = encoders
    out = []
    for clip in (clip_l, clip_g):
        result = clip(clip_tokens, output_hidden_states=True)
        out += [result.text_embeds, result.hidden_states[-2], result.last_hidden_state]
    return out + [t5(t5_tokens).last_hidden_state]


@pytest.mark.parametrize("variant, network_args", [
    ("sd3_medium", {}),
    ("sd35_medium", {"split_qkv": "True", "emb_dims": "[2,2,2,2,2,2]", "train_t5xxl": "True"}),
])
def test_merge_to_equals_the_applied_network(variant, network_args):
    mmdit = _tiny_mmdit(variant)
    encoders = _tiny_encoders()
    inputs = _inputs(mmdit.config)
    clip_tokens = torch.randint(0, 49408, (2, 6), generator=torch.Generator().manual_seed(6))
    t5_tokens = torch.randint(0, T5_VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = [mmdit(**inputs)] + _encoder_outputs(encoders, clip_tokens, t5_tokens)
    network = create_network(0.8, DIM, ALPHA, None, encoders, mmdit, **network_args)
    network.apply_to(encoders, mmdit, apply_text_encoder=True, apply_unet=True)
    assert {n.split("_")[1] for n in _names(network)} == (
        {"te1", "te2", "te3", "unet"} if "train_t5xxl" in network_args else {"te1", "te2", "unet"})
    _randomize_up(network, std=0.1)
    with torch.no_grad():
        applied = [mmdit(**inputs)] + _encoder_outputs(encoders, clip_tokens, t5_tokens)
    network.restore()
    network.merge_to(encoders, mmdit)
    with torch.no_grad():
        merged = [mmdit(**inputs)] + _encoder_outputs(encoders, clip_tokens, t5_tokens)
    for index, (a, m, b) in enumerate(zip(applied, merged, base)):
        assert torch.allclose(a, m, atol=1e-5), index
        if index == 7:  # T5 is only adapted with train_t5xxl
            assert ((m - b).abs().max() > 1e-4) == ("train_t5xxl" in network_args)
        else:
            assert (m - b).abs().max() > 1e-4, index  # the merge did change the weights


def test_create_network_from_weights_round_trips_and_sets_train_t5xxl(tmp_path):
    mmdit = _tiny_mmdit("sd35_medium")
    encoders = _tiny_encoders()
    network = create_network(1.0, DIM, ALPHA, None, encoders, mmdit, train_t5xxl="True", x_mlp_dim="2",
                             emb_dims="[0,0,3,0,0,1]", train_block_indices="0,3")
    network.apply_to(encoders, mmdit, apply_text_encoder=True, apply_unet=True)
    _randomize_up(network)
    inputs = _inputs(mmdit.config)
    with torch.no_grad():
        out = mmdit(**inputs)
    path = tmp_path / "with_t5.safetensors"
    network.save_weights(path, None, None)
    saved = network.state_dict()
    network.restore()
    assert any(k.startswith("lora_te3_encoder_block_0_layer_0_SelfAttention_q.") for k in saved)
    assert any(k.startswith("lora_te2_") for k in saved)

    loaded, weights_sd = create_network_from_weights(1.0, path, None, encoders, mmdit)
    assert loaded.train_t5xxl is True and loaded.num_text_encoders == 3
    assert set(loaded.state_dict()) == set(saved) == set(weights_sd)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert _ranks(loaded) == _ranks(network)
    assert loaded.lora_unet_x_embedder_proj.lora_dim == 3 and loaded.lora_unet_x_embedder_proj.is_conv
    assert getattr(loaded, _lora(0, "x_block.mlp.fc1")).lora_dim == 2
    assert {lora.lora_name for lora in loaded.text_encoder_loras} == {
        lora.lora_name for lora in network.text_encoder_loras}
    loaded.apply_to(encoders, mmdit, apply_text_encoder=True, apply_unet=True)
    with torch.no_grad():
        assert torch.equal(mmdit(**inputs), out)
    loaded.restore()

    # without T5 modules in the file: train_t5xxl is False
    clip_only = {k: v for k, v in saved.items() if not k.startswith("lora_te3_")}
    loaded, _ = create_network_from_weights(1.0, None, None, encoders, mmdit, weights_sd=clip_only,
                                            for_inference=True)
    assert loaded.train_t5xxl is False
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert {lora.lora_name.split("_")[1] for lora in loaded.text_encoder_loras} == {"te1", "te2"}


def test_create_network_from_weights_rejects_flux_keys():
    mmdit = _tiny_mmdit()
    flux_style = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, HIDDEN),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(3 * HIDDEN, 4),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0),
    }
    with pytest.raises(ValueError, match="name no layer") as info:
        create_network_from_weights(1.0, None, None, _tiny_encoders(), mmdit, weights_sd=flux_style)
    assert "lora_unet_double_blocks_0_img_attn_qkv" in str(info.value)
    assert "lora_unet_joint_blocks_0" in str(info.value)  # shows how this model's names look


def test_create_network_from_weights_needs_a_source():
    with pytest.raises(ValueError, match="file or weights_sd"):
        create_network_from_weights(1.0, None, None, None, _tiny_mmdit())


# --- per-text-encoder learning rates ------------------------------------------------------------

def _param_prefixes(network, groups) -> list[set[str]]:
    by_id = {id(p): n for n, p in network.named_parameters()}
    return [{by_id[id(p)].split("_", 2)[1] for p in g["params"]} for g in groups]


def test_train_t5xxl_adds_lora_te3_and_three_text_encoder_lrs():
    mmdit = _tiny_mmdit()
    encoders = _tiny_encoders()
    network = create_network(1.0, DIM, ALPHA, None, encoders, mmdit, train_t5xxl="True")
    network.apply_to(encoders, mmdit, apply_text_encoder=True, apply_unet=True)
    assert network.train_t5xxl is True
    te3 = {n for n in _names(network) if n.startswith("lora_te3_")}
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in te3
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0" in te3
    assert len(te3) == 2 * 7
    for prepare in (network.prepare_optimizer_params, network.prepare_optimizer_params_with_multiple_te_lrs):
        groups, descriptions = prepare([1e-4, 2e-4, 3e-4], 1e-3, 1e-3)
        assert descriptions == ["textencoder1", "textencoder2", "textencoder3", "unet"]
        assert [g["lr"] for g in groups] == [1e-4, 2e-4, 3e-4, 1e-3]
        assert _param_prefixes(network, groups) == [{"te1"}, {"te2"}, {"te3"}, {"unet"}]
        assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))
    network.restore()


@pytest.mark.parametrize("train_t5xxl", [False, True])
def test_two_text_encoder_lrs_raise_asking_for_three_or_one(train_t5xxl):
    encoders = _tiny_encoders()
    network = create_network(1.0, DIM, ALPHA, None, encoders, _tiny_mmdit(), train_t5xxl=str(train_t5xxl))
    with pytest.raises(ValueError, match="text_encoder_lr") as info:
        network.prepare_optimizer_params([1e-4, 2e-4], 1e-3, 1e-3)
    assert "give 1 or 3" in str(info.value)
    with pytest.raises(ValueError, match="give 1 or 3"):
        network.prepare_optimizer_params([1e-4, 2e-4, 3e-4, 4e-4], 1e-3, 1e-3)


@pytest.mark.parametrize("apply_text_encoder, expected", [
    (True, ["textencoder1", "textencoder2", "unet"]), (False, ["unet"])])
def test_three_text_encoder_lrs_without_t5_modules(apply_text_encoder, expected):
    # SD3 always has three text-encoder slots, so `--text_encoder_lr a b c` is valid without
    # train_t5xxl (and with --network_train_unet_only); the T5 lr then has nothing to apply to.
    encoders = _tiny_encoders()
    mmdit = _tiny_mmdit()
    network = create_network(1.0, DIM, ALPHA, None, encoders, mmdit)
    network.apply_to(encoders, mmdit, apply_text_encoder=apply_text_encoder, apply_unet=True)
    groups, descriptions = network.prepare_optimizer_params([1e-4, 2e-4, 3e-4], 1e-3, 1e-3)
    assert descriptions == expected
    assert [g["lr"] for g in groups] == [1e-4, 2e-4, 1e-3][-len(expected):]
    network.restore()


def test_one_text_encoder_lr_covers_all_three_encoders():
    network = create_network(1.0, DIM, ALPHA, None, _tiny_encoders(), _tiny_mmdit(), train_t5xxl="True")
    for lr in (5e-5, [5e-5]):
        groups, descriptions = network.prepare_optimizer_params(lr, None, 1e-3)
        assert descriptions == ["textencoder", "unet"]
        assert [g["lr"] for g in groups] == [5e-5, 1e-3]
        assert _param_prefixes(network, groups) == [{"te1", "te2", "te3"}, {"unet"}]


def test_text_encoders_may_be_missing():
    # the trainer may pass None for an encoder it did not load (e.g. T5 with cached outputs)
    clip_l, clip_g, _ = _tiny_encoders()
    network = create_network(1.0, DIM, ALPHA, None, [clip_l, None, None], _tiny_mmdit(), train_t5xxl="True")
    assert {n.split("_")[1] for n in _names(network)} == {"te1", "unet"}
    network = create_network(1.0, DIM, ALPHA, None, [None, clip_g, None], _tiny_mmdit())
    assert {n.split("_")[1] for n in _names(network)} == {"te2", "unet"}  # CLIP-G stays lora_te2


# --- 5. dropouts and LoRA+ -----------------------------------------------------------------------

def test_dropouts_pass_through_to_every_module_including_split_and_conv():
    mmdit = _tiny_mmdit("sd35_medium")
    network = create_network(1.0, DIM, ALPHA, None, _tiny_encoders(), mmdit, neuron_dropout=0.1,
                             rank_dropout="0.2", module_dropout="0.3", split_qkv="True", train_t5xxl="True",
                             emb_dims="[1,1,1,1,1,1]")
    assert any(isinstance(lora, SplitLoRAModule) for lora in network.loras)
    assert network.lora_unet_x_embedder_proj.is_conv
    for lora in network.loras:
        assert (lora.dropout, lora.rank_dropout, lora.module_dropout) == (0.1, 0.2, 0.3), lora.lora_name
    # the LyCORIS-style dropout=... the trainer injects is the neuron dropout when neuron_dropout is None
    network = create_network(1.0, DIM, ALPHA, None, None, mmdit, dropout="0.25", split_qkv="True")
    assert {lora.dropout for lora in network.loras} == {0.25}
    # and neuron_dropout wins over it
    network = create_network(1.0, DIM, ALPHA, None, None, mmdit, neuron_dropout=0.05, dropout="0.25")
    assert {lora.dropout for lora in network.loras} == {0.05}


def test_modules_train_with_dropouts():
    mmdit = _tiny_mmdit("sd35_medium")
    inputs = _inputs(mmdit.config)
    network = create_network(1.0, DIM, ALPHA, None, None, mmdit, neuron_dropout=0.5, rank_dropout="0.5",
                             split_qkv="True", emb_dims="[2,2,2,2,2,2]")
    network.apply_to(None, mmdit, apply_text_encoder=False, apply_unet=True)
    _randomize_up(network, std=0.3)
    with torch.no_grad():
        network.eval()
        eval_out = mmdit(**inputs)
        network.train()
        torch.manual_seed(0)
        train_out = mmdit(**inputs)
    assert torch.isfinite(train_out).all()
    assert not torch.allclose(train_out, eval_out, atol=1e-4)  # the dropouts act in training mode
    # the conv LoRA on the patch embedder trains with the dropouts too (its rank mask is per channel)
    x = inputs["x"]
    conv = mmdit.x_embedder.proj
    with torch.no_grad():
        torch.manual_seed(1)
        train_conv = conv(x)
        network.eval()
        eval_conv = conv(x)
    assert train_conv.shape == eval_conv.shape and torch.isfinite(train_conv).all()
    assert not torch.allclose(train_conv, eval_conv, atol=1e-4)
    network.restore()


def test_module_dropout_one_skips_split_modules_in_training():
    mmdit = _tiny_mmdit()
    network = create_network(1.0, DIM, ALPHA, None, None, mmdit, module_dropout="0.999999", split_qkv="True")
    network.apply_to(None, mmdit, apply_text_encoder=False, apply_unet=True)
    _randomize_up(network, std=0.3)
    layer = mmdit.joint_blocks[LAST].context_block.attn.qkv
    lora = getattr(network, _lora(LAST, "context_block.attn.qkv"))
    x = torch.randn(1, 3, HIDDEN)
    with torch.no_grad():
        base = lora.org_forward(x)
        network.train()
        torch.manual_seed(0)
        assert torch.equal(layer(x), base)
        network.eval()
        assert not torch.allclose(layer(x), base)
    network.restore()


def test_loraplus_ratios_make_plus_groups():
    mmdit = _tiny_mmdit()
    encoders = _tiny_encoders()
    network = create_network(1.0, DIM, ALPHA, None, encoders, mmdit, loraplus_lr_ratio="4", split_qkv="True",
                             emb_dims="[0,0,2,0,0,0]")
    groups, descriptions = network.prepare_optimizer_params(1e-4, 1e-3, 1e-3)
    assert descriptions == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 4e-4, 1e-3, 4e-3])
    ups = {id(lora.lora_up.weight) for lora in network.loras}
    assert all(id(p) in ups for g in (groups[1], groups[3]) for p in g["params"])
    assert not any(id(p) in ups for g in (groups[0], groups[2]) for p in g["params"])
    plus = {id(p) for p in groups[3]["params"]}
    # the split modules' and the conv embedder's up weights are in the plus group too
    assert id(getattr(network, _lora(LAST, "context_block.attn.qkv")).lora_up.weight) in plus
    assert id(network.lora_unet_x_embedder_proj.lora_up.weight) in plus

    network = create_network(1.0, DIM, ALPHA, None, encoders, mmdit, loraplus_unet_lr_ratio="8",
                             loraplus_text_encoder_lr_ratio="2")
    groups, descriptions = network.prepare_optimizer_params([1e-4, 2e-4, 3e-4], 1e-3, 1e-3)
    assert dict(zip(descriptions, [g["lr"] for g in groups])) == pytest.approx(
        {"textencoder1": 1e-4, "textencoder1 plus": 2e-4, "textencoder2": 2e-4, "textencoder2 plus": 4e-4,
         "unet": 1e-3, "unet plus": 8e-3})


def test_create_network_from_weights_honours_dropouts_and_loraplus():
    mmdit = _tiny_mmdit()
    weights = create_network(1.0, DIM, ALPHA, None, None, mmdit).state_dict()
    loaded, _ = create_network_from_weights(1.0, None, None, None, mmdit, weights_sd=weights, rank_dropout="0.1",
                                            module_dropout="0.2", dropout="0.3", loraplus_unet_lr_ratio="16")
    assert {(m.dropout, m.rank_dropout, m.module_dropout) for m in loaded.loras} == {(0.3, 0.1, 0.2)}
    groups, descriptions = loaded.prepare_optimizer_params(None, 1e-3, 1e-3)
    assert descriptions == ["unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1.6e-2])


def test_sd3_keys_are_not_reported_as_unknown(caplog):
    with caplog.at_level(logging.WARNING):
        create_network(1.0, DIM, ALPHA, None, None, _tiny_mmdit(), train_block_indices="all", split_qkv="False",
                       context_attn_dim="2", x_mod_dim="1", emb_dims="[0,0,0,0,0,0]", train_t5xxl="False",
                       verbose="False", conv_dim="4", conv_alpha="1")
    assert "unknown" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        create_network(1.0, DIM, ALPHA, None, None, _tiny_mmdit(), not_an_sd3_arg="1")
    assert "not_an_sd3_arg" in caplog.text


def test_module_exports():
    for name in lora_sd3.__all__:
        assert hasattr(lora_sd3, name)
