"""Bad input to the LoRA/model tools, gen_img.py and the metadata scripts: one line naming the file and
the fix, a non-zero exit, and no output written (the trainers: ``test_bad_input.py``)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import gen_img
from finetune import merge_captions_to_metadata
from library.demo.shapes import write_shapes_folder
from networks import check_lora_weights, extract_lora_from_models, merge_lora, resize_lora, sdxl_merge_lora
from tests.test_bad_input import fails

SD_LORA_NAMES = ["lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1"]


def sd_lora(path: Path, rank: int = 2, width: int = 8) -> Path:
    """An SD 1.x-named LoRA file (the merge tools judge the family by the names)."""
    tensors = {}
    for name in SD_LORA_NAMES:
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, width)
        tensors[f"{name}.lora_up.weight"] = torch.randn(width, rank)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


@pytest.fixture
def corrupt_lora(tmp_path) -> Path:
    (tmp_path / "in").mkdir()
    lora = sd_lora(tmp_path / "in" / "cut.safetensors")
    lora.write_bytes(lora.read_bytes()[:50])  # an interrupted copy
    return lora


def assert_unreadable(message: str, lora: Path) -> None:
    assert message.startswith(f"error: {lora}: not a readable safetensors file (")
    assert message.endswith("an interrupted download or copy leaves such files, fetch or save it again")


# ------------------------------------------------------------------------------------ damaged files

def test_merge_lora_with_a_corrupt_lora(tmp_path, corrupt_lora):
    out = tmp_path / "out"
    assert_unreadable(fails(merge_lora.main, ["--models", corrupt_lora, "--save_to", out / "m.safetensors"], out=out),
                      corrupt_lora)


def test_resize_lora_with_a_corrupt_lora(tmp_path, corrupt_lora):
    out = tmp_path / "out"
    assert_unreadable(fails(resize_lora.main, ["--model", corrupt_lora, "--save_to", out / "r.safetensors",
                                               "--new_rank", "1"], out=out), corrupt_lora)


def test_check_lora_weights_with_a_corrupt_lora(corrupt_lora):
    assert_unreadable(fails(check_lora_weights.main, [corrupt_lora]), corrupt_lora)


def test_check_lora_weights_refuses_a_model_checkpoint(tiny_sd1_ckpt, capsys):
    message = fails(check_lora_weights.main, [tiny_sd1_ckpt])
    assert message.startswith(f"error: {tiny_sd1_ckpt}: not a LoRA file: no lora_down/lora_up modules among its ")
    assert message.endswith("it looks like a model checkpoint. Give a kohya-format LoRA file")
    assert "0 modules" not in capsys.readouterr().out  # no report of an empty LoRA


# ----------------------------------------------------------------------------- the other family

def test_merge_lora_into_an_sdxl_checkpoint_names_sdxl_merge_lora(tmp_path, tiny_sdxl_ckpt):
    lora = sd_lora(tmp_path / "lora.safetensors")
    out = tmp_path / "out"
    message = fails(merge_lora.main, ["--sd_model", tiny_sdxl_ckpt, "--models", lora, "--save_to",
                                      out / "m.safetensors"], out=out)
    assert message == (f"error: --sd_model {tiny_sdxl_ckpt} is an SDXL checkpoint (conditioner.embedders.* keys): "
                       "use sdxl_merge_lora.py")


def test_sdxl_merge_lora_into_an_sd1_checkpoint_names_merge_lora(tmp_path, tiny_sd1_ckpt):
    lora = tmp_path / "xl.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 2)}, str(lora))
    out = tmp_path / "out"
    message = fails(sdxl_merge_lora.main, ["--sd_model", tiny_sd1_ckpt, "--models", lora, "--save_to",
                                           out / "m.safetensors"], out=out)
    assert message == (f"error: --sd_model {tiny_sd1_ckpt} is an SD1/SD2 checkpoint (cond_stage_model.* keys): "
                       "use merge_lora.py")


@pytest.mark.parametrize("flags, model_fixture, expected", [
    ([], "tiny_sdxl_ckpt", "is an SDXL checkpoint (conditioner.embedders.* keys): add --sdxl"),
    (["--sdxl"], "tiny_sd1_ckpt", "is an SD1/SD2 checkpoint (cond_stage_model.* keys): remove --sdxl"),
])
def test_extract_lora_names_the_sdxl_flag(tmp_path, request, flags, model_fixture, expected):
    model = request.getfixturevalue(model_fixture)
    out = tmp_path / "out"
    message = fails(extract_lora_from_models.main, [*flags, "--model_org", model, "--model_tuned", model,
                                                    "--save_to", out / "x.safetensors", "--dim", "2"], out=out)
    assert message == f"error: {model} {expected}"


# ------------------------------------------------------------------------------------------ outputs

def test_merge_lora_save_to_a_folder_that_cannot_exist_names_the_destination(tmp_path):
    lora = sd_lora(tmp_path / "lora.safetensors")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    destination = blocker / "merged.safetensors"
    message = fails(merge_lora.main, ["--models", lora, "--save_to", destination])
    assert message.startswith(f"error: cannot write {destination} (")  # not the temporary file's name
    assert message.endswith("choose a folder you can write to")
    assert ".tmp" not in message


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, where no file can be created")
def test_merge_lora_save_to_proc_names_the_destination(tmp_path):
    lora = sd_lora(tmp_path / "lora.safetensors")
    message = fails(merge_lora.main, ["--models", lora, "--save_to", "/proc/merged.safetensors"])
    assert message == ("error: cannot write /proc/merged.safetensors (No such file or directory); choose a folder "
                       "you can write to")


def test_full_disk_while_merging_keeps_the_previous_output(tmp_path, monkeypatch):
    lora = sd_lora(tmp_path / "lora.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    previous = out / "merged.safetensors"
    previous.write_bytes(b"last week's merge")

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    message = fails(merge_lora.main, ["--models", lora, "--save_to", previous])
    assert message == (f"error: cannot write {previous}: the disk is full (No space left on device); nothing was "
                       "replaced. Free space on that disk or choose another output folder, then run again")
    assert previous.read_bytes() == b"last week's merge"
    assert [p.name for p in out.iterdir()] == ["merged.safetensors"]


def test_gen_img_outdir_that_cannot_be_written_fails_before_loading(tmp_path, tiny_sd1_ckpt, monkeypatch):
    import library.generation.runner as runner

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before --outdir was checked")

    monkeypatch.setattr(runner, "load_generator", refuse)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    message = fails(gen_img.main, ["--ckpt", tiny_sd1_ckpt, "--outdir", blocker / "images", "--prompt", "a cat",
                                   "--steps", "2", "--W", "64", "--H", "64"])
    assert message == (f"error: --outdir {blocker / 'images'}: cannot be created, {blocker} is a file; give a "
                       "folder you can write to")


def test_merge_captions_output_that_cannot_be_written(tmp_path):
    write_shapes_folder(tmp_path / "images", 2, caption_extension=".caption")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out_json = blocker / "meta.json"
    message = fails(merge_captions_to_metadata.main, [tmp_path / "images", out_json])
    assert message == (f"error: out_json {out_json}: cannot write it ({blocker} is a file); give a path you can "
                       "write to")
