"""Streaming checkpoint files: the tensor-by-tensor reader/writer, the converter trace, and the
LoRA merge that uses them without loading the checkpoint (tests/test_lora_merge_tools.py checks
the merge results against LoRAs applied to loaded models)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.model_tools.checkpoints import load_models
from library.model_tools.converter_trace import trace_single_file_layout
from library.model_tools.tensor_files import SafetensorsWriter, TensorInfo, open_tensor_file, write_safetensors
from networks import lora, merge_lora


def test_reader_and_writer_match_the_safetensors_library(tmp_path):
    tensors = {"w": torch.randn(3, 4), "bf": torch.randn(5).bfloat16(), "h": torch.randn(2, 2).half(),
               "scalar": torch.tensor(2.5), "ids": torch.arange(7), "empty": torch.zeros(0, 3),
               "mask": torch.tensor([True, False])}
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"k": "v"})
    with open_tensor_file(tmp_path / "lib.safetensors") as f:
        assert f.metadata == {"k": "v"}
        read = {name: f.get(name) for name in f.keys()}
    write_safetensors(tmp_path / "ours.safetensors", tensors, {"m": "1"})
    for got in (read, load_file(str(tmp_path / "ours.safetensors"))):
        assert got.keys() == tensors.keys()
        assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in tensors.items())


def test_writer_leaves_no_file_unless_complete(tmp_path):
    target = tmp_path / "out.safetensors"
    layout = [TensorInfo("a", torch.float32, (2,)), TensorInfo("b", torch.float16, (3,))]
    with pytest.raises(ValueError, match="expected a next"):
        with SafetensorsWriter(target, layout) as writer:
            writer.write("b", torch.zeros(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="not written"):
        with SafetensorsWriter(target, layout) as writer:
            writer.write("a", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fixture", ["tiny_sd2_ckpt", "tiny_sdxl_ckpt"])  # SD1 and SDXL share CLIP-L
def test_trace_locates_every_model_weight_in_the_file(fixture, request):
    path = request.getfixturevalue(fixture)
    kind = {"tiny_sd1_ckpt": "sd1", "tiny_sd2_ckpt": "sd2", "tiny_sdxl_ckpt": "sdxl"}[fixture]
    with open_tensor_file(path) as f:
        skeleton = load_models(path, kind, device="meta", state_dict=f.meta_state_dict())
        stored = {name: f.get(name) for name in f.keys()}
    layout = trace_single_file_layout(skeleton, {k: tuple(v.shape) for k, v in stored.items()})
    models = load_models(path, kind)
    for part in ("unet", "vae", "text_encoder", "text_encoder1", "text_encoder2"):
        if not hasattr(models, part):
            continue
        for name, value in getattr(models, part).state_dict().items():
            if (part, name) == ("text_encoder2", "text_projection.weight"):
                assert (part, name) not in layout  # stored transposed: not traced, a LoRA on it is refused
                continue
            segments = layout[(part, name)]
            assert sum(s.length for s in segments) == value.shape[0]
            for s in segments:
                rows = stored[s.key][s.dst_start: s.dst_start + s.length]
                assert torch.equal(rows.reshape(-1), value[s.src_start: s.src_start + s.length].reshape(-1)), name
    if kind != "sd1":  # the fused q/k/v of OpenCLIP: three parameters, one file tensor
        openclip = "text_encoder2" if kind == "sdxl" else "text_encoder"
        q = next(k for k in layout if k[0] == openclip and k[1].endswith("layers.0.self_attn.q_proj.weight"))
        v = (q[0], q[1].replace("q_proj", "v_proj"))
        assert layout[q][0].key == layout[v][0].key and layout[v][0].dst_start == 2 * layout[q][0].length


def test_streamed_merge_equals_the_merge_into_loaded_models(tiny_sd1_ckpt, tiny_sd1_diffusers, tmp_path,
                                                            monkeypatch):
    models = load_models(tiny_sd1_ckpt, "sd1")
    network = lora.create_network(1.0, 4, 2, None, models.text_encoder, models.unet, conv_dim="2")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in network.loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.2)
    network.save_weights(tmp_path / "l.safetensors", None, {"ss_network_module": "networks.lora"})

    loaded = tmp_path / "from_folder.safetensors"  # a Diffusers folder is loaded as models and merge_to'd
    merge_lora.main(["--sd_model", str(tiny_sd1_diffusers), "--save_to", str(loaded), "--models",
                     str(tmp_path / "l.safetensors"), "--ratios", "0.6", "--console_log_level", "ERROR"])

    import library.families.sd.loading as sd_loading

    def no_whole_file(*_args, **_kwargs):
        raise AssertionError("the streamed merge read the whole checkpoint")

    monkeypatch.setattr(sd_loading, "read_checkpoint", no_whole_file)
    monkeypatch.setattr(sd_loading, "load_file", no_whole_file)
    streamed = tmp_path / "streamed.safetensors"
    merge_lora.main(["--sd_model", str(tiny_sd1_ckpt), "--save_to", str(streamed), "--models",
                     str(tmp_path / "l.safetensors"), "--ratios", "0.6", "--console_log_level", "ERROR"])
    a, b = load_file(str(loaded)), load_file(str(streamed))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(not torch.equal(b[k], v) for k, v in load_file(str(tiny_sd1_ckpt)).items()) == len(network.loras)
