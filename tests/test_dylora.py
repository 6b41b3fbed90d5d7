"""networks.dylora and networks/extract_lora_from_dylora.py: slice training, file format, extraction, runs."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from library.demo.shapes import write_shapes_folder
from library.io_utils import addnet_hashes
from networks import dylora, extract_lora_from_dylora, lora
from networks.dylora import DyLoRAModule
from networks.lora_file import lora_modules
from tests.test_lora_network import run, tiny_models
from tests.test_oft import train_in_process
from tests.train_helpers import base_train_args, read_metadata


def module(kind: str = "linear", rank: int = 6, unit: int = 2, alpha: float = 3.0, seed: int = 0) -> DyLoRAModule:
    torch.manual_seed(seed)
    layer = nn.Linear(5, 7) if kind == "linear" else nn.Conv2d(5, 7, 3, padding=1)
    m = DyLoRAModule("lora_unet_x", layer, lora_dim=rank, alpha=alpha, unit=unit)
    with torch.no_grad():
        for part in m.lora_up.slices():
            part.normal_(0, 0.5)
    return m


def inputs(kind: str) -> torch.Tensor:
    return torch.randn(3, 4, 5) if kind == "linear" else torch.randn(2, 5, 6, 6)


# --- module ------------------------------------------------------------------------------------

def test_slices_are_parameters_but_the_state_dict_is_the_lora_format():
    m = module()
    names = [n for n, _ in m.named_parameters()]
    assert names == ["lora_down.unit0", "lora_down.unit1", "lora_down.unit2", "lora_up.unit0", "lora_up.unit1",
                     "lora_up.unit2"]
    state = m.state_dict()
    assert set(state) == {"alpha", "lora_down.weight", "lora_up.weight"}
    assert state["lora_down.weight"].shape == (6, 5) and state["lora_up.weight"].shape == (7, 6)
    other = module(seed=1)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), m.parameters()))
    with pytest.raises(RuntimeError, match="size mismatch"):
        module(rank=4).load_state_dict(state)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        other.load_state_dict(state | {"lora_up.unit0": torch.zeros(7, 2)})


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_training_forward_is_the_truncated_lora_with_sqrt_scale_eval_is_full(kind):
    m = module(kind)
    layer = m.org_module
    x = inputs(kind)
    base = layer(x)
    m.apply_to()
    m.eval()
    full = base + m.lora_up(m.lora_down(x)) * (3.0 / 6)
    torch.testing.assert_close(layer(x), full)
    m.train()
    for index, rank in enumerate((2, 4, 6)):
        m.trained_unit = index
        expected = base + m.lora_up.apply(m.lora_down.apply(x, m.lora_down.weight[:rank]), m.lora_up.weight[:, :rank]) \
            * (3.0 / 6 * math.sqrt(6 / rank))
        torch.testing.assert_close(layer(x), expected)
        # the same update in weight space
        merged = nn.functional.linear(x, layer.weight + m.truncated_delta_weight(rank), layer.bias) if kind == "linear" \
            else nn.functional.conv2d(x, layer.weight + m.truncated_delta_weight(rank), layer.bias, padding=1)
        torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    m.trained_unit = 2
    torch.testing.assert_close(layer(x), full)  # the last slice trains the whole rank at the plain scale


def test_only_the_chosen_slice_is_trained_even_with_adam_momentum():
    m = module()
    m.apply_to()
    m.train()
    optimizer = torch.optim.AdamW(m.parameters(), lr=0.1)
    x, target = torch.randn(8, 5), torch.randn(8, 7)

    def step(index: int) -> list[torch.Tensor]:
        before = [p.detach().clone() for p in m.parameters()]
        m.trained_unit = index
        optimizer.zero_grad(set_to_none=True)
        (m.org_module(x) - target).square().mean().backward()
        with_grad = [n for n, p in m.named_parameters() if p.grad is not None]
        assert with_grad == [f"lora_down.unit{index}", f"lora_up.unit{index}"]
        optimizer.step()
        return [not torch.equal(b, p) for b, p in zip(before, m.parameters())]

    assert step(1) == [False, True, False, False, True, False]
    assert step(0) == [True, False, False, True, False, False]  # slice 1 has Adam state but no update now
    assert step(2) == [False, False, True, False, False, True]


def test_random_slice_per_forward_replays_under_checkpointing():
    m = module()
    m.apply_to()
    m.train()
    layer, x = m.org_module, torch.randn(4, 5)
    torch.manual_seed(0)
    outputs = {tuple(layer(x).flatten()[:3].tolist()) for _ in range(40)}
    assert len(outputs) == 3, "each of the 3 slices is drawn"

    def grads(checkpointed: bool) -> list[torch.Tensor]:
        m.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = sum((checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)).sum() for _ in range(4))
        loss.backward()
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b)


def test_rank_must_be_a_multiple_of_unit_and_unit_is_parsed():
    with pytest.raises(ValueError, match="rank 4 is not a multiple of unit 3"):
        module(rank=4, unit=3)
    te, unet = tiny_models()
    with pytest.raises(ValueError, match="unit='x'"):
        dylora.create_network(1.0, 4, 2, None, te, unet, unit="x")
    with pytest.raises(ValueError, match="not a multiple of unit 2"):
        dylora.create_network(1.0, 4, 2, None, te, unet, unit="2", conv_dim="3")
    assert dylora.parse_unit({"unit": "4", "conv_dim": "8"}) == (4, {"conv_dim": "8"})
    assert dylora.parse_unit({})[0] == 1


# --- network and file --------------------------------------------------------------------------

@pytest.fixture
def trained_like(tmp_path):
    """A DyLoRA network on tiny models (rank 4, unit 2, conv rank 2) with random up weights, saved."""
    te, unet = tiny_models()
    network = dylora.create_network(1.0, 4, 2, None, te, unet, unit="2", conv_dim="2", conv_alpha="1")
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if ".lora_up." in name:
                p.normal_(0, 0.2)
    path = tmp_path / "dylora.safetensors"
    metadata = {"ss_network_module": "networks.dylora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                "ss_network_args": json.dumps({"unit": "2", "conv_dim": "2", "conv_alpha": "1"})}
    network.save_weights(path, None, metadata)
    return network, (te, unet), path


def test_file_is_a_plain_lora_that_networks_lora_loads(trained_like):
    network, (te, unet), path = trained_like
    plain = lora.create_network(1.0, 4, 2, None, *tiny_models(), conv_dim="2", conv_alpha="1")
    saved = load_file(str(path))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    network.apply_to(te, unet)
    network.eval()
    with torch.no_grad():
        expected = run(te, unet)
    te2, unet2 = tiny_models()
    as_lora, _ = lora.create_network_from_weights(1.0, path, None, te2, unet2, for_inference=True)
    as_lora.apply_to(te2, unet2)
    with torch.no_grad():
        torch.testing.assert_close(run(te2, unet2), expected)
    rebuilt, _ = dylora.create_network_from_weights(1.0, path, None, *tiny_models(), unit="2")
    assert isinstance(rebuilt, dylora.DyLoRANetwork) and {m.unit for m in rebuilt.loras} == {2}
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in network.state_dict().items())
    network.set_trained_unit(1)
    assert {m.lora_dim: m.trained_unit for m in network.loras} == {4: 1, 2: 0}  # conv: rank 2, one slice
    network.set_trained_unit(None)
    assert {m.trained_unit for m in network.loras} == {None}


def test_max_norm_scales_the_slices(trained_like):
    network, _, _ = trained_like
    norms = [m.delta_weight().norm().item() for m in network.loras]
    cap = sorted(norms)[len(norms) // 2]
    keys_scaled, _, max_norm = network.apply_max_norm_regularization(cap, "cpu")
    assert int(keys_scaled) == sum(n > cap for n in norms)
    assert max(m.delta_weight().norm().item() for m in network.loras) <= cap * (1 + 1e-5)


def test_extract_writes_every_rank_equal_to_the_trained_truncation(trained_like, tmp_path):
    network, _, path = trained_like
    extract_lora_from_dylora.main(["--model", str(path), "--save_to", str(tmp_path / "split.safetensors")])
    assert sorted(p.name for p in tmp_path.glob("split-*")) == ["split-0002.safetensors", "split-0004.safetensors"]
    for rank in (2, 4):
        out = tmp_path / f"split-{rank:04d}.safetensors"
        modules = lora_modules(load_file(str(out)))
        assert set(modules) == {m.lora_name for m in network.loras}
        for m in network.loras:
            sliced = modules[m.lora_name]
            keep = min(rank, m.lora_dim)  # the rank-2 conv modules keep their 2 ranks
            assert sliced.rank == keep
            assert torch.equal(sliced.down, m.lora_down.weight.detach()[:keep])
            assert torch.equal(sliced.up, m.lora_up.weight.detach()[:, :keep])
            assert sliced.alpha == pytest.approx(float(m.alpha) * math.sqrt(keep / m.lora_dim))
            torch.testing.assert_close(sliced.delta(), m.truncated_delta_weight(keep).detach())
        meta = read_metadata(out)
        assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == str(rank)
        assert float(meta["ss_network_alpha"]) == pytest.approx(2.0 * math.sqrt(rank / 4))
        assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
        assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == addnet_hashes(load_file(str(out)), meta)
        lora.create_network_from_weights(1.0, out, None, *tiny_models())  # an ordinary LoRA file
    full = load_file(str(tmp_path / "split-0004.safetensors"))
    original = load_file(str(path))
    assert all(torch.equal(full[k], original[k]) for k in original)
    with pytest.raises(SystemExit, match="not a multiple of --unit 3"):
        extract_lora_from_dylora.main(["--model", str(path), "--save_to", str(tmp_path / "x.safetensors"),
                                       "--unit", "3"])
    assert extract_lora_from_dylora.output_path("a/b.pt", 12).as_posix() == "a/b-0012.pt"


# --- training run (tiny SD1, in process) -------------------------------------------------------

def test_training_run_resume_and_generation(tmp_path, tiny_sd1_ckpt):
    """train_network.py --network_module networks.dylora (in process), --resume, and gen_img.py loading the file.

    ``--network_weights`` goes through the same ``load_weights`` as ``create_network_from_weights``
    (test_file_is_a_plain_lora_that_networks_lora_loads)."""
    import train_network
    from library.families.sd.loading import load_sd_models
    from library.generation.runner import load_generator, run as generate
    from tests.test_gen_img import make_args, pixels

    write_shapes_folder(tmp_path / "train" / "2_toy", 2, seed=6)

    def args(out, **overrides):
        values = dict(output_name="dy", network_module="networks.dylora", network_dim=4, network_alpha=2,
                      network_args=["unit=2", "conv_dim=2"], train_data_dir=tmp_path / "train", caption_extension=".txt",
                      max_train_steps=2, train_batch_size=1, cache_latents=True)
        values.update(overrides)
        return base_train_args(tiny_sd1_ckpt, out, **values)

    out = tmp_path / "out"
    assert math.isfinite(train_in_process(train_network.main, args(out, save_every_n_steps=1, save_state=True)))
    saved = load_file(str(out / "dy.safetensors"))
    models = load_sd_models(tiny_sd1_ckpt, v2=False)
    plain = lora.create_network(1.0, 4, 2, None, models.text_encoder, models.unet, conv_dim="2")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    assert any(v.abs().max() > 0 for k, v in saved.items() if k.endswith("lora_up.weight"))
    meta = read_metadata(out / "dy.safetensors")
    assert meta["ss_network_module"] == "networks.dylora" and meta["ss_network_dim"] == "4"
    assert json.loads(meta["ss_network_args"]) == {"unit": "2", "conv_dim": "2"}

    # resume from the step-1 state (per-slice optimizer state, the slices' state dict): the same final weights
    train_in_process(train_network.main, args(tmp_path / "resumed", resume=out / "dy-step00000001-state"))
    resumed = load_file(str(tmp_path / "resumed" / "dy.safetensors"))
    assert saved.keys() == resumed.keys() and all(torch.equal(saved[k], resumed[k]) for k in saved)

    # generation: DyLoRA at full rank is the plain LoRA of the file
    net = ["--network_module", "networks.dylora", "--network_weights", out / "dy.safetensors", "--network_args", "unit=2"]
    generator = load_generator(make_args(tiny_sd1_ckpt, tmp_path, "--prompt", "x", *net), torch.device("cpu"))
    (loaded,) = generator.networks.networks
    assert isinstance(loaded, dylora.DyLoRANetwork) and not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    image = generate(make_args(tiny_sd1_ckpt, tmp_path / "img", "--prompt", "a cat --d 2"), generator)[0]
    assert pixels(image).shape == (64, 64, 3)


def test_full_size_keys_are_the_reference_lora_keys():
    from tests.reference import load_reference
    from tests.test_lora_keys_full_size import assert_same_keys, network_shapes, sd1_models

    # the layers and names are networks.lora's (its SDXL parity is tests/test_lora_keys_full_size.py)
    network = dylora.create_network(1.0, 8, 4, None, *sd1_models(), unit="4", conv_dim="4", conv_alpha="1")
    assert_same_keys(network_shapes(network), load_reference("lora_keys.json")["sd1_lora_dim8_conv4"])


def test_unknown_network_args_still_warn(caplog):
    te, unet = tiny_models()
    with caplog.at_level(logging.WARNING, logger="networks.lora"):
        dylora.create_network(1.0, 4, 2, None, te, unet, unit="2", bogus="1")
    assert "bogus" in caplog.text and "unit" not in caplog.text.split("known:")[0]
