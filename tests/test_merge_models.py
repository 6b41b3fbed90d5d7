"""tools/merge_models.py: weighted sums of tiny checkpoints, streamed; mismatched inputs refused."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.demo.tiny_sd import build_tiny_sd
from tools import merge_models

QUIET = ["--console_log_level", "ERROR"]


@pytest.fixture(scope="module")
def sd1_files(tmp_path_factory):
    """Three tiny SD1 single files with different weights (seeds 0, 1, 2), and their state dicts."""
    folder = tmp_path_factory.mktemp("merge_models")
    paths, states = [], []
    for seed in range(3):
        state = build_tiny_sd(False, seed).ldm
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        path = folder / f"m{seed}.safetensors"
        save_file(state, str(path))
        paths.append(path)
        states.append(state)
    return paths, states


def run(*argv) -> None:
    merge_models.main([*map(str, argv), *QUIET])


def test_merge_is_the_weighted_sum(sd1_files, tmp_path):
    (a, b, c), (sa, sb, sc) = sd1_files
    out = tmp_path / "merged.safetensors"
    run("--models", a, b, c, "--ratios", 0.5, 0.3, 0.2, "--output", out)
    merged = load_file(str(out))
    assert list(merged) == list(load_file(str(a)))  # same keys, in the first file's order
    for key, value in sa.items():
        if value.is_floating_point():
            expected = value.float() * 0.5
            expected.add_(sb[key].float() * 0.3).add_(sc[key].float() * 0.2)
            assert torch.equal(merged[key], expected), key
        else:
            assert torch.equal(merged[key], value)  # position_ids: copied from the first model


def test_default_ratios_average_and_saving_precision(sd1_files, tmp_path):
    (a, b, _), (sa, sb, _) = sd1_files
    out = tmp_path / "avg.safetensors"
    run("--models", a, b, "--output", out, "--saving_precision", "fp16")
    merged = load_file(str(out))
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert merged[key].dtype == torch.float16
    assert torch.equal(merged[key], (sa[key] * 0.5 + sb[key] * 0.5).half())
    assert merged["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64


def test_unet_only_keeps_the_first_models_other_parts(sd1_files, tmp_path, caplog):
    (a, b, _), (sa, sb, _) = sd1_files
    out = tmp_path / "unet.safetensors"
    with caplog.at_level(logging.INFO, logger="library.model_tools.merge_models"):
        merge_models.main(["--models", str(a), str(b), "--ratios", "0.25", "0.75", "--unet_only", "--show_skipped",
                           "--output", str(out)])
    merged = load_file(str(out))
    for key, value in sa.items():
        if key.startswith("model.diffusion_model."):
            assert torch.equal(merged[key], value * 0.25 + sb[key] * 0.75)
        else:
            assert torch.equal(merged[key], value)
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert len(skipped) == sum(not k.startswith("model.diffusion_model.") for k in sa)
    assert any("first_stage_model." in m and "--unet_only" in m for m in skipped)


def test_mismatched_models_are_refused_before_writing(sd1_files, tiny_sdxl_ckpt, tmp_path):
    (a, b, _), (sa, _, _) = sd1_files
    out = tmp_path / "never.safetensors"
    with pytest.raises(SystemExit, match="SDXL base but .* is an SD 1.x"):
        run("--models", a, tiny_sdxl_ckpt, "--output", out)
    reshaped = dict(sa)
    key = "model.diffusion_model.out.2.weight"
    reshaped[key] = torch.zeros(8, *sa[key].shape[1:])
    save_file(reshaped, str(tmp_path / "odd.safetensors"))
    with pytest.raises(SystemExit, match=r"out\.2\.weight has shape \[8, 32, 3, 3\]"):
        run("--models", a, tmp_path / "odd.safetensors", "--output", out)
    with pytest.raises(SystemExit, match="one of the input models"):
        run("--models", a, b, "--output", a)
    with pytest.raises(SystemExit, match="--ratios has 1 values"):
        run("--models", a, b, "--ratios", 1, "--output", out)
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_missing_tensors_are_copied_from_the_first_model(sd1_files, tmp_path):
    (a, b, _), (sa, sb, _) = sd1_files
    partial = {k: v for k, v in sb.items() if not k.startswith("first_stage_model.")}
    partial["model_ema.decay"] = torch.tensor(0.999)
    save_file(partial, str(tmp_path / "no_vae.safetensors"))
    out = tmp_path / "merged.safetensors"
    run("--models", a, tmp_path / "no_vae.safetensors", "--output", out)
    merged = load_file(str(out))
    assert "model_ema.decay" not in merged  # only the first model's keys are written
    vae = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(merged[vae], sa[vae])
    unet = "model.diffusion_model.out.2.weight"
    assert torch.equal(merged[unet], sa[unet] * 0.5 + sb[unet] * 0.5)
