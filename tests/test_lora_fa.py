"""networks.lora_fa: LoRA with a frozen down projection, in the plain LoRA file format."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from library.demo.shapes import write_shapes_folder
from networks import lora, lora_fa
from tests.test_lora_network import run, tiny_models
from tests.test_oft import train_in_process
from tests.train_helpers import base_train_args, read_metadata


def test_down_is_a_frozen_buffer_with_the_lora_keys():
    te, unet = tiny_models()
    network = lora_fa.create_network(1.0, 4, 2, None, te, unet, conv_dim="2")
    plain = lora.create_network(1.0, 4, 2, None, *tiny_models(), conv_dim="2")
    assert {k: v.shape for k, v in network.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    names = [n for n, _ in network.named_parameters()]
    assert names and all(n.endswith(".lora_up.weight") for n in names)
    assert len(names) == len(network.loras) == len(network.get_trainable_params())
    groups, _ = network.prepare_optimizer_params(1e-4, 1e-4, 1e-3)
    assert sum(len(g["params"]) for g in groups) == len(names)

    network.apply_to(te, unet)
    network.prepare_grad_etc(te, unet)
    network.on_epoch_start(te, unet)
    downs = {m.lora_name: m.lora_down.weight.clone() for m in network.loras}
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    run(te, unet).square().mean().backward()
    optimizer.step()
    assert all(torch.equal(m.lora_down.weight, downs[m.lora_name]) for m in network.loras)
    assert any(m.lora_up.weight.abs().sum() > 0 for m in network.loras)
    assert not any(m.lora_down.weight.requires_grad for m in network.loras)


def test_max_norm_scales_only_up():
    te, unet = tiny_models()
    network = lora_fa.create_network(1.0, 4, 2, None, te, unet)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.normal_()
    downs = [m.lora_down.weight.clone() for m in network.loras]
    norms = [m.delta_weight().norm().item() for m in network.loras]
    cap = sorted(norms)[len(norms) // 2]
    keys_scaled, _, _ = network.apply_max_norm_regularization(cap, "cpu")
    assert int(keys_scaled) == sum(n > cap for n in norms)
    assert max(m.delta_weight().norm().item() for m in network.loras) <= cap * (1 + 1e-5)
    assert all(torch.equal(m.lora_down.weight, d) for m, d in zip(network.loras, downs))


def test_lora_files_load_both_ways(tmp_path):
    te, unet = tiny_models()
    source = lora.create_network(1.0, 4, 2, None, te, unet)
    with torch.no_grad():
        for m in source.loras:
            m.lora_up.weight.normal_(0, 0.1)
    source.save_weights(tmp_path / "lora.safetensors", None, None)
    fa, _ = lora_fa.create_network_from_weights(1.0, tmp_path / "lora.safetensors", None, *tiny_models())
    assert isinstance(fa, lora_fa.LoRAFANetwork)
    assert all(torch.equal(fa.state_dict()[k], v) for k, v in source.state_dict().items())
    fa.save_weights(tmp_path / "fa.safetensors", None, None)
    back, _ = lora.create_network_from_weights(1.0, tmp_path / "fa.safetensors", None, *tiny_models())
    assert all(torch.equal(back.state_dict()[k], v) for k, v in source.state_dict().items())


def test_training_keeps_the_starting_down_weights(tmp_path, tiny_sd1_ckpt):
    """train_network.py --network_module networks.lora_fa, continued from a LoRA file: down stays as it was."""
    import train_network
    from library.families.sd.loading import load_sd_models

    models = load_sd_models(tiny_sd1_ckpt, v2=False)
    start = lora.create_network(1.0, 4, 2, None, models.text_encoder, models.unet)
    start.save_weights(tmp_path / "start.safetensors", None, None)
    write_shapes_folder(tmp_path / "train" / "2_toy", 2, seed=8)
    argv = base_train_args(tiny_sd1_ckpt, tmp_path / "out", output_name="fa", network_module="networks.lora_fa",
                           network_weights=tmp_path / "start.safetensors", train_data_dir=tmp_path / "train",
                           caption_extension=".txt", max_train_steps=2, train_batch_size=1, cache_latents=True)
    train_in_process(train_network.main, argv)
    saved, initial = load_file(str(tmp_path / "out" / "fa.safetensors")), load_file(str(tmp_path / "start.safetensors"))
    assert saved.keys() == initial.keys()
    downs = [k for k in saved if k.endswith("lora_down.weight")]
    assert downs and all(torch.equal(saved[k], initial[k]) for k in downs)
    assert any(saved[k].abs().max() > 0 for k in saved if k.endswith("lora_up.weight"))
    assert read_metadata(tmp_path / "out" / "fa.safetensors")["ss_network_module"] == "networks.lora_fa"


def test_full_size_keys_are_the_reference_lora_keys():
    from tests.reference import load_reference
    from tests.test_lora_keys_full_size import assert_same_keys, network_shapes, sd1_models

    network = lora_fa.create_network(1.0, 8, 4, None, *sd1_models(), conv_dim="4", conv_alpha="1")
    assert_same_keys(network_shapes(network), load_reference("lora_keys.json")["sd1_lora_dim8_conv4"])
