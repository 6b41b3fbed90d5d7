"""Loading Lumina-Image 2.0 files: the DiT single file (precisions, prefix, other families refused),
Gemma-2 from a file in its three layouts or a folder, the offline Gemma tokenizer and its sources."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.demo.tiny_lumina import (
    build_tiny_gemma2, random_lumina_state_dict, tiny_lumina_config, write_tiny_gemma2, write_tiny_gemma_tokenizer,
    write_tiny_lumina_dit,
)
from library.families.lumina.gemma import load_gemma2
from library.families.lumina.loading import load_lumina_dit, load_lumina_models
from library.families.lumina.tokenizer import GEMMA2_TOKENIZER_ID, load_gemma_tokenizer
from library.families.sd.checkpoint.common import CheckpointError
from library.io_utils import save_safetensors

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_tiny_gemma_tokenizer(tmp_path_factory.mktemp("gemma_tok")).parent


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_gemma_tokenizer(None, tokenizer_dir)


# -- the DiT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, prefix", [(torch.float32, ""), (torch.bfloat16, "model.diffusion_model."),
                                           (torch.float8_e4m3fn, "")], ids=["fp32", "bf16_prefixed", "fp8"])
def test_dit_files_in_every_precision_and_with_the_checkpoint_prefix_load(tmp_path, dtype, prefix):
    path = write_tiny_lumina_dit(tmp_path / "dit.safetensors", dtype=dtype, prefix=prefix, seed=2)
    model = load_lumina_dit(path, dtype=torch.float32)
    expected = random_lumina_state_dict(tiny_lumina_config(), seed=2)
    assert model.config == tiny_lumina_config()
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, expected[key].to(dtype).float()), key


@pytest.mark.parametrize("keys, message", [
    ({"double_blocks.0.img_attn.qkv.weight": (9, 3)}, "looks like a FLUX.1 DiT: use flux_train_network.py"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (9, 3)}, "looks like an SD3 model"),
    ({"time_caption_embed.caption_embedder.1.weight": (4, 4)}, "Diffusers Lumina2Transformer2DModel"),
    ({"lora_unet_layers_0_attention_qkv.lora_down.weight": (4, 4)}, "looks like a LoRA: pass it with --network_weights"),
    ({"distilled_guidance_layer.in_proj.bias": (4,)}, "looks like a Chroma DiT: use flux_train_network.py --model_type chroma"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4)}, "SD/SDXL checkpoint"),
])
def test_other_files_are_refused_with_what_they_are(tmp_path, keys, message):
    path = tmp_path / "other.safetensors"
    save_safetensors({k: torch.zeros(shape) for k, shape in keys.items()}, path)
    with pytest.raises(CheckpointError, match="not a Lumina-Image 2.0 DiT file") as info:
        load_lumina_dit(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_a_truncated_dit_names_what_is_missing(tmp_path):
    state_dict = random_lumina_state_dict(tiny_lumina_config())
    del state_dict["layers.1.feed_forward.w3.weight"]
    path = tmp_path / "cut.safetensors"
    save_safetensors(state_dict, path)
    with pytest.raises(CheckpointError, match="lacks 1 tensors, e.g. \\['layers.1.feed_forward.w3.weight'\\]"):
        load_lumina_dit(path)


def test_missing_dit_file_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
        load_lumina_dit(tmp_path / "nope.safetensors")


# -- Gemma-2 ------------------------------------------------------------------------------------------


def _hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[-2]


@pytest.mark.parametrize("prefix", ["", "model.", "text_encoders.gemma2_2b.transformer.model."],
                         ids=["gemma2_model", "causal_lm", "comfyui_all_in_one"])
def test_gemma2_file_layouts_load_to_identical_outputs(tmp_path, tokenizer, prefix):
    path = write_tiny_gemma2(tmp_path / "gemma.safetensors", len(tokenizer), seed=4, prefix=prefix)
    if prefix == "model.":  # the ForCausalLM file's head, which Lumina does not use
        from safetensors.torch import load_file

        state_dict = load_file(str(path))
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"].clone()
        save_safetensors(state_dict, path)
    loaded = load_gemma2(path)
    reference = build_tiny_gemma2(len(tokenizer), seed=4)
    assert loaded.config.head_dim == 256 and loaded.config.num_key_value_heads == 1
    assert loaded.config.num_hidden_layers == 3 and loaded.config.hidden_size == 64
    ids = tokenizer(["a red circle on a blue background"], return_tensors="pt").input_ids
    torch.testing.assert_close(_hidden(loaded, ids), _hidden(reference, ids), rtol=0, atol=0)


def test_gemma2_folder_and_bf16_file(tmp_path, tokenizer):
    reference = build_tiny_gemma2(len(tokenizer), seed=4)
    folder = tmp_path / "gemma-2-2b"
    reference.save_pretrained(str(folder))
    ids = tokenizer(["two green stars"], return_tensors="pt").input_ids
    torch.testing.assert_close(_hidden(load_gemma2(folder), ids), _hidden(reference, ids), rtol=0, atol=0)
    bf16 = load_gemma2(write_tiny_gemma2(tmp_path / "bf16.safetensors", len(tokenizer), seed=4, dtype=torch.bfloat16),
                       dtype=torch.float32)
    for key, value in bf16.state_dict().items():  # upcast from the file's bf16, nothing else changed
        assert value.dtype == torch.float32 and torch.equal(value, reference.state_dict()[key].bfloat16().float()), key


def test_gemma2_wrong_files(tmp_path):
    dit = write_tiny_lumina_dit(tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="is not a Gemma-2 text encoder \\(--gemma2\\)"):
        load_gemma2(dit)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_gemma2(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="folder without config.json"):
        load_gemma2(tmp_path / "empty")
    from safetensors.torch import load_file

    state_dict = load_file(str(write_tiny_gemma2(tmp_path / "g.safetensors", 300)))
    del state_dict["layers.2.mlp.up_proj.weight"]
    save_safetensors(state_dict, tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="lacks 1 tensors, e.g. \\['layers.2.mlp.up_proj.weight'\\]"):
        load_gemma2(tmp_path / "cut.safetensors")


def test_dit_and_gemma2_widths_must_agree(tmp_path, tokenizer_dir, tokenizer):
    from library.demo.tiny_flux_encoders import write_tiny_ae

    dit = write_tiny_lumina_dit(tmp_path / "dit.safetensors", config=tiny_lumina_config(cap_feat_dim=32))
    gemma = write_tiny_gemma2(tmp_path / "gemma.safetensors", len(tokenizer))
    with pytest.raises(CheckpointError, match="has width 64 but the DiT .* takes captions of width 32"):
        load_lumina_models(str(dit), gemma2_path=str(gemma), ae_path=str(write_tiny_ae(tmp_path / "ae.safetensors")),
                           tokenizer_cache_dir=str(tokenizer_dir))
    small = write_tiny_gemma2(tmp_path / "small_vocab.safetensors", 300)
    with pytest.raises(CheckpointError, match="tokenizer has 756 tokens but the --gemma2 model .* only 300"):
        load_lumina_models(str(write_tiny_lumina_dit(tmp_path / "dit64.safetensors")), gemma2_path=str(small),
                           ae_path=str(tmp_path / "ae.safetensors"), tokenizer_cache_dir=str(tokenizer_dir))


# -- the tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_sources_in_order(tmp_path, tokenizer_dir, monkeypatch):
    from library.families.lumina import tokenizer as lumina_tokenizer

    folder = tokenizer_dir / "google_gemma-2-2b"
    # 1. --gemma2 as a transformers folder with the tokenizer files beside the weights
    model_folder = tmp_path / "gemma-2-2b"
    model_folder.mkdir()
    for f in folder.iterdir():
        (model_folder / f.name).write_bytes(f.read_bytes())
    assert lumina_tokenizer.tokenizer_folder(model_folder, None) == model_folder
    # 2. --tokenizer_cache_dir
    assert lumina_tokenizer.tokenizer_folder(tmp_path / "weights.safetensors", tokenizer_dir) == folder
    # 3. the local Hugging Face cache (looked up only)
    asked = []
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache",
                        lambda repo, name: asked.append((repo, name)) or str(folder / name))
    assert lumina_tokenizer.tokenizer_folder(None, None) == folder
    assert asked[0] == (GEMMA2_TOKENIZER_ID, "tokenizer.json")


def test_missing_tokenizer_names_the_folder_expected(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo, name: None)
    with pytest.raises(CheckpointError, match="google_gemma-2-2b \\(from --tokenizer_cache_dir\\) does not exist"):
        load_gemma_tokenizer(None, tmp_path)
    with pytest.raises(CheckpointError, match="no --tokenizer_cache_dir was given"):
        load_gemma_tokenizer(None, None)
    (tmp_path / "google_gemma-2-2b").mkdir()
    with pytest.raises(CheckpointError, match="has neither tokenizer.json nor tokenizer.model"):
        load_gemma_tokenizer(None, tmp_path)


def test_a_t5_tokenizer_is_not_taken_for_gemma(tmp_path):
    from library.demo.tiny_flux_encoders import write_tiny_t5_tokenizer

    t5 = write_tiny_t5_tokenizer(tmp_path / "t5")
    target = tmp_path / "cache" / "google_gemma-2-2b"
    target.mkdir(parents=True)
    for f in t5.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="is not a Gemma tokenizer: pad/eos/bos ids"):
        load_gemma_tokenizer(None, tmp_path / "cache")


def test_tokenizer_pads_right_with_bos_first(tokenizer):
    assert tokenizer.padding_side == "right"
    ids = tokenizer(["a red circle"], padding="max_length", max_length=8, return_tensors="pt")
    assert ids.input_ids[0, 0] == 2 and ids.input_ids[0, -1] == 0
    assert ids.attention_mask[0].tolist() == sorted(ids.attention_mask[0].tolist(), reverse=True)
