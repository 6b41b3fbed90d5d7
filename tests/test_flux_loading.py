"""Loading FLUX.1 files as users have them: DiT precisions and prefixes, wrong files, fp8 T5."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.demo.tiny_flux import tiny_flux_config, write_tiny_flux_dit
from library.families.flux.loading import load_flux_dit
from library.families.sd.checkpoint.common import CheckpointError


def test_dit_files_in_every_precision_and_with_the_checkpoint_prefix_load(tmp_path):
    reference = load_file(str(write_tiny_flux_dit(tmp_path / "fp32.safetensors")))
    for dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        path = write_tiny_flux_dit(tmp_path / f"{dtype}.safetensors".replace("torch.", ""), dtype=dtype,
                                   prefix="model.diffusion_model." if dtype == torch.bfloat16 else "")
        model = load_flux_dit(path, dtype=torch.float32)
        assert model.config == tiny_flux_config()
        for key, value in model.state_dict().items():
            # what the file held, upcast exactly (every fp8/bf16/fp16 value is a float32 value)
            assert torch.equal(value, reference[key].to(dtype).float()), key


def test_schnell_file_is_read_as_schnell(tmp_path):
    model = load_flux_dit(write_tiny_flux_dit(tmp_path / "s.safetensors", guidance_embed=False))
    assert model.config.guidance_embed is False and model.guidance_in is None


@pytest.mark.parametrize("keys, message", [
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 4)}, "looks like a LoRA"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, "SD/SDXL checkpoint"),
    ({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2)}, "Diffusers FluxTransformer2DModel"),
    ({"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2)}, "SD3 model"),
])
def test_other_files_are_refused_with_what_they_are(tmp_path, keys, message):
    path = tmp_path / "other.safetensors"
    save_file(keys, str(path))
    with pytest.raises(CheckpointError, match=message):
        load_flux_dit(path)


def test_a_truncated_dit_names_what_is_missing(tmp_path):
    state = load_file(str(write_tiny_flux_dit(tmp_path / "full.safetensors")))
    del state["double_blocks.1.img_mlp.2.weight"]
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="lacks 1 tensors.*double_blocks.1.img_mlp.2.weight"):
        load_flux_dit(path)


def test_t5_in_fp8_keeps_wo_so_its_input_is_not_quantized():
    """--fp8_base stores T5's Linear weights in fp8 except the feed-forward ``wo``: transformers casts
    wo's input to wo's weight dtype, which would clip T5's large feed-forward activations at fp8's
    448 and round them to 3 mantissa bits."""
    from library.demo.tiny_flux_encoders import build_tiny_t5
    from library.training.accelerator import store_in_fp8

    ids = torch.randint(0, 451, (2, 12), generator=torch.Generator().manual_seed(0))

    def wo_input_dtypes(skip):
        t5 = build_tiny_t5(451, seed=0).to(torch.bfloat16).eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            reference = t5(input_ids=ids).last_hidden_state.float()
            converted = store_in_fp8(t5, skip)
            seen = []
            for block in t5.encoder.block:
                block.layer[1].DenseReluDense.wo.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
            out = t5(input_ids=ids).last_hidden_state.float()
        return seen, converted, t5, (out - reference).abs().mean() / reference.abs().mean()

    seen, converted, t5, error = wo_input_dtypes(lambda path: path.endswith(".wo"))
    assert converted == 2 * 6  # 2 layers x (q, k, v, o, wi_0, wi_1)
    assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert 0 < error < 0.3  # fp8 weights: close to bf16, not equal
    seen, _, _, _ = wo_input_dtypes(None)
    assert seen == [torch.float8_e4m3fn, torch.float8_e4m3fn]  # what skipping wo prevents
