"""tools/convert_diffusers20_original_sd.py on the tiny SD1, SD2 and SDXL models.

Round trips are compared tensor by tensor (``torch.equal``, same dtype): Diffusers -> single file ->
Diffusers gives back every weight of the folder; single file -> Diffusers -> single file gives back
every tensor of the file except those the Diffusers format has no place for (SD2's last OpenCLIP
block, ``text_projection`` and ``logit_scale``, SDXL's ``logit_scale``), which must be exactly those.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.families.sd.checkpoint import OPENCLIP_PREFIX
from library.families.sd.loading import read_checkpoint
from tools import convert_diffusers20_original_sd as convert

QUIET = ["--console_log_level", "ERROR"]


def run(*argv) -> None:
    convert.main([*map(str, argv), *QUIET])


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a Diffusers folder as ``<sub-folder>/<key>``."""
    out = {}
    for path in sorted(Path(folder).glob("*/*.safetensors")):
        out.update({f"{path.parent.name}/{k}": v for k, v in load_file(str(path)).items()})
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, except_keys=()) -> set[str]:
    """Same keys; every tensor equal (dtype too) except ``except_keys``; returns the keys that differ."""
    assert a.keys() == b.keys()
    differ = {k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])}
    assert differ <= set(except_keys), sorted(differ - set(except_keys))[:5]
    return differ


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def kind(request):
    return request.param


@pytest.fixture
def model_pair(kind, request):
    """(single file, Diffusers folder) of the same tiny weights."""
    names = {"sd1": ("tiny_sd1_ckpt", "tiny_sd1_diffusers"), "sd2": ("tiny_sd2_ckpt", "tiny_sd2_diffusers"),
             "sdxl": ("tiny_sdxl_ckpt", "tiny_sdxl_diffusers")}[kind]
    return tuple(request.getfixturevalue(n) for n in names)


def test_diffusers_to_single_file_to_diffusers_is_exact(kind, model_pair, tmp_path):
    _, folder = model_pair
    single = tmp_path / "model.safetensors"
    run(folder, single)
    # SD2 Diffusers folders have Linear projections; the flag gives them back
    run(single, tmp_path / "back", "--use_safetensors", *(["--unet_use_linear_projection"] if kind == "sd2" else []))
    assert_same(folder_tensors(folder), folder_tensors(tmp_path / "back"))
    config = lambda f: json.loads((f / "unet" / "config.json").read_text())  # noqa: E731
    assert config(tmp_path / "back")["use_linear_projection"] == config(folder)["use_linear_projection"]
    assert (tmp_path / "back" / "model_index.json").is_file() and not (tmp_path / "back.tmp").exists()


def test_single_file_to_diffusers_to_single_file_is_exact(kind, model_pair, tmp_path):
    single, folder = model_pair
    linear = ["--unet_use_linear_projection"] if kind == "sd2" else []  # as the fixture folder has them
    run(single, tmp_path / "diffusers", "--use_safetensors", *linear)
    assert_same(folder_tensors(folder), folder_tensors(tmp_path / "diffusers"))  # the fixture folder: same weights
    back = tmp_path / "back.safetensors"
    run(tmp_path / "diffusers", back)
    original, converted = read_checkpoint(single), read_checkpoint(back)
    if kind == "sd1":
        assert_same(original, converted)
    elif kind == "sdxl":
        assert assert_same(original, converted, except_keys={"conditioner.embedders.1.model.logit_scale"}) == {
            "conditioner.embedders.1.model.logit_scale"}
    else:  # what SD2 never reads: made up again on the way back
        made_up = {k for k in original if k.startswith(OPENCLIP_PREFIX + "transformer.resblocks.2.")} | {
            OPENCLIP_PREFIX + "text_projection", OPENCLIP_PREFIX + "logit_scale"}
        assert assert_same(original, converted, except_keys=made_up) == made_up
        # stored as SD2 files store them: Linear projections
        assert converted["model.diffusion_model.middle_block.1.proj_in.weight"].ndim == 2


def test_precision_flags(tiny_sd1_ckpt, tiny_sd1_diffusers, tmp_path):
    run(tiny_sd1_ckpt, tmp_path / "half.safetensors", "--fp16")
    half = read_checkpoint(tmp_path / "half.safetensors")
    assert {v.dtype for v in half.values() if v.is_floating_point()} == {torch.float16}
    original = read_checkpoint(tiny_sd1_ckpt)
    assert all(torch.equal(half[k], v.half()) for k, v in original.items())

    # no flag: every tensor keeps the dtype it had (here an fp16 model with an fp32 VAE)
    mixed = {k: v if k.startswith("first_stage_model.") else v.half() for k, v in original.items()}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    run(tmp_path / "mixed.safetensors", tmp_path / "kept.safetensors")
    assert_same(mixed, read_checkpoint(tmp_path / "kept.safetensors"))
    run(tmp_path / "half.safetensors", tmp_path / "float.ckpt", "--save_precision_as", "float", "--epoch", "3",
        "--global_step", "120")
    ckpt = torch.load(tmp_path / "float.ckpt", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (3, 120)
    assert {v.dtype for v in ckpt["state_dict"].values()} == {torch.float32}

    run(tiny_sd1_diffusers, tmp_path / "bf16", "--bf16", "--use_safetensors")
    assert {v.dtype for v in folder_tensors(tmp_path / "bf16").values()} == {torch.bfloat16}
    with pytest.raises(SystemExit, match="one precision"):
        run(tiny_sd1_ckpt, tmp_path / "x.safetensors", "--fp16", "--save_precision_as", "bf16")


def test_metadata_reference_model_and_version_checks(tiny_sd1_ckpt, tiny_sd1_diffusers, tmp_path):
    out = tmp_path / "meta.safetensors"
    run(tiny_sd1_diffusers, out, "--metadata", '{"modelspec.title": "tiny", "note": "x"}', "--v1")
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"modelspec.title": "tiny", "note": "x"}

    reference = tmp_path / "reference"
    (reference / "scheduler").mkdir(parents=True)
    (reference / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
         "beta_start": 0.00085, "beta_end": 0.012}))
    run(tiny_sd1_ckpt, tmp_path / "with_ref", "--reference_model", reference)
    index = json.loads((tmp_path / "with_ref" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert (tmp_path / "with_ref" / "unet" / "diffusion_pytorch_model.bin").is_file()  # no --use_safetensors

    with pytest.raises(SystemExit, match="is an SD 1.x model but --v2"):
        run(tiny_sd1_ckpt, tmp_path / "y", "--v2")
    with pytest.raises(SystemExit, match="is the input"):
        run(tiny_sd1_ckpt, tiny_sd1_ckpt)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="other files"):
        run(tiny_sd1_ckpt, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
