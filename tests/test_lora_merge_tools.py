"""networks/merge_lora.py, sdxl_merge_lora.py and svd_merge_lora.py on tiny SD1 and SDXL models.

The scripts run in-process through ``main([...])``. References are computed independently: the
unmerged LoRA applied with ``networks.lora`` (hooks), and deltas from the files with
``up @ down * alpha / rank``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.families.sd.loading import load_sd_models, read_checkpoint
from library.families.sdxl.loading import load_sdxl_models
from library.io_utils import addnet_hashes
from networks import lora
from networks import merge_lora, sdxl_merge_lora, svd_merge_lora
from networks.lora_file import lora_modules, read_lora
from networks.lora_merge import lbw_block

REPO = Path(__file__).resolve().parents[1]
INPUT_IDS = torch.tensor([[49406, 320, 1125, 539, 49407, 0, 0, 0], [49406, 1929, 49407, 0, 0, 0, 0, 0]])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_up(network, std: float = 0.2, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * std)


def save_lora(path: Path, text_encoder, unet, dim: int, alpha: float, seed: int, **network_args) -> Path:
    network = lora.create_network(1.0, dim, alpha, None, text_encoder, unet, **network_args)
    randomize_up(network, seed=seed)
    network.save_weights(path, None, {"ss_network_dim": str(dim), "ss_network_alpha": str(float(alpha)),
                                      "ss_network_module": "networks.lora", "ss_output_name": path.stem,
                                      "ss_seed": str(seed)})
    return path


def deltas(path: Path) -> dict[str, torch.Tensor]:
    """``{name: alpha/rank * up @ down}`` computed here from the raw tensors."""
    state = load_file(str(path))
    out = {}
    for key in state:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = state[key].float(), state[f"{name}.lora_up.weight"].float()
            alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else down.shape[0]
            out[name] = (up.flatten(1) @ down.flatten(1) * alpha / down.shape[0]).reshape(up.shape[0], *down.shape[1:])
    return out


def ranks(path: Path) -> dict[str, int]:
    return {k.partition(".")[0]: v.shape[0] for k, v in load_file(str(path)).items() if k.endswith("lora_down.weight")}


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# --- the LoRA files ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd_loras(tiny_sd1_ckpt, tmp_path_factory):
    """Three SD1 LoRAs: a (rank 4, alpha 2, conv 2), b (rank 2, alpha 1, U-Net only), c (rank 4, alpha 4)."""
    folder = tmp_path_factory.mktemp("sd_loras")
    models = load_sd_models(tiny_sd1_ckpt, v2=False)
    te, unet = models.text_encoder, models.unet
    a = save_lora(folder / "a.safetensors", te, unet, 4, 2, 1, conv_dim="2", conv_alpha="1")
    b = save_lora(folder / "b.safetensors", None, unet, 2, 1, 2, conv_dim="1", conv_alpha="1")
    c = save_lora(folder / "c.safetensors", te, unet, 4, 4, 3, conv_dim="2", conv_alpha="2")
    return a, b, c


@pytest.fixture(scope="module")
def sdxl_loras(tiny_sdxl_ckpt, tmp_path_factory):
    """Two SDXL LoRAs: rank 4 / alpha 2 with conv modules, rank 2 / alpha 2 attention only."""
    folder = tmp_path_factory.mktemp("sdxl_loras")
    models = load_sdxl_models(tiny_sdxl_ckpt)
    a = save_lora(folder / "xa.safetensors", models.text_encoders, models.unet, 4, 2, 4, conv_dim="2")
    b = save_lora(folder / "xb.safetensors", models.text_encoders, models.unet, 2, 2, 5)
    return a, b


# --- into a checkpoint ------------------------------------------------------------------------

def run_sd(models) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = models.text_encoder(INPUT_IDS).last_hidden_state
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return hidden, models.unet(latents, torch.tensor([10, 500]), encoder_hidden_states=hidden).sample


def run_sdxl(models) -> tuple[torch.Tensor, torch.Tensor]:
    te1, te2 = models.text_encoders
    out2 = te2(INPUT_IDS)
    context = torch.cat([te1(INPUT_IDS).last_hidden_state, out2.last_hidden_state], dim=-1)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    return context, models.unet(latents, torch.tensor([10, 500]), encoder_hidden_states=context,
                                added_cond_kwargs={"text_embeds": out2.text_embeds, "time_ids": time_ids}).sample


def unmerged_outputs(models, files, ratios, run, text_encoder):
    for path, ratio in zip(files, ratios):
        network, _ = lora.create_network_from_weights(ratio, path, models.vae, text_encoder, models.unet,
                                                      for_inference=True)
        network.apply_to(text_encoder, models.unet)
    with torch.no_grad():
        return run(models)


def layers_of(path: Path) -> int:
    """How many checkpoint tensors the file's modules change: the SDXL checkpoint keeps te2's q/k/v
    fused in one ``in_proj_weight`` per layer (OpenCLIP layout)."""
    names = lora_modules(read_lora(path)[0])
    qkv = [n for n in names if n.startswith("lora_te2_") and n.endswith(("_q_proj", "_k_proj", "_v_proj"))]
    return len(names) - len(qkv) + len({n[: -len("_q_proj")] for n in qkv})


def changed_keys(original: dict, merged: dict) -> set[str]:
    assert merged.keys() == original.keys()
    return {k for k in original if not torch.equal(original[k], merged[k])}


def test_merge_into_sd1_checkpoint_equals_applied_loras(tiny_sd1_ckpt, sd_loras, tmp_path):
    a, b, _ = sd_loras
    out = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(tiny_sd1_ckpt), "--save_to", str(out), "--models", str(a), str(b),
                     "--ratios", "0.7", "-0.5"])
    reference = load_sd_models(tiny_sd1_ckpt, v2=False)
    expected = unmerged_outputs(reference, [a, b], [0.7, -0.5], run_sd, reference.text_encoder)
    with torch.no_grad():
        got = run_sd(load_sd_models(out, v2=False))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    original, merged = read_checkpoint(tiny_sd1_ckpt), read_checkpoint(out)
    changed = changed_keys(original, merged)
    assert len(changed) == layers_of(a)  # b's modules are a subset of a's
    assert all(k.endswith(".weight") for k in changed)
    assert all(merged[k].dtype == original[k].dtype for k in original)


def test_merge_into_sd1_checkpoint_half_precision_keeps_untouched_tensors(tiny_sd1_ckpt, sd_loras, tmp_path):
    a, _, _ = sd_loras
    out = tmp_path / "merged.ckpt"
    merge_lora.main(["--sd_model", str(tiny_sd1_ckpt), "--save_to", str(out), "--models", str(a),
                     "--precision", "fp16", "--save_precision", "fp16"])
    original, merged = read_checkpoint(tiny_sd1_ckpt), read_checkpoint(out)
    assert all(v.dtype == torch.float16 for v in merged.values() if v.is_floating_point())
    changed = changed_keys({k: v.half() if v.is_floating_point() else v for k, v in original.items()}, merged)
    assert len(changed) == layers_of(a)


def test_merge_into_sdxl_checkpoint_equals_applied_loras(tiny_sdxl_ckpt, sdxl_loras, tmp_path):
    a, b = sdxl_loras
    out = tmp_path / "merged_xl.safetensors"
    sdxl_merge_lora.main(["--sd_model", str(tiny_sdxl_ckpt), "--save_to", str(out), "--models", str(a), str(b),
                          "--ratios", "0.8", "0.6"])
    reference = load_sdxl_models(tiny_sdxl_ckpt)
    expected = unmerged_outputs(reference, [a, b], [0.8, 0.6], run_sdxl, reference.text_encoders)
    with torch.no_grad():
        got = run_sdxl(load_sdxl_models(out))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    original, merged = read_checkpoint(tiny_sdxl_ckpt), read_checkpoint(out)
    assert len(changed_keys(original, merged)) == layers_of(a)


def test_sdxl_lbws_zero_blocks_leave_their_tensors_untouched(tiny_sdxl_ckpt, sdxl_loras, tmp_path):
    a, _ = sdxl_loras
    # 20 values: BASE, IN00-IN08, M00, OUT00-OUT08; zero the text encoders, IN03 and the middle block
    lbw = [0] + [1, 1, 1, 0, 1, 1, 1, 1, 1] + [0] + [1] * 9
    out = tmp_path / "lbw_xl.safetensors"
    sdxl_merge_lora.main(["--sd_model", str(tiny_sdxl_ckpt), "--save_to", str(out), "--models", str(a),
                          "--lbws", json.dumps(lbw)])
    original, merged = read_checkpoint(tiny_sdxl_ckpt), read_checkpoint(out)
    changed = changed_keys(original, merged)
    kept = [n for n in lora_modules(read_lora(a)[0]) if lbw_block(n) not in ("BASE", "IN03", "M00")]
    assert len(changed) == len(kept) > 0
    assert not any(k.startswith(("conditioner.", "model.diffusion_model.middle_block.",
                                 "model.diffusion_model.input_blocks.3.")) for k in changed)


def test_diffusers_named_sdxl_lora_merges_like_the_sgm_named_one(tiny_sdxl_ckpt, sdxl_loras, tmp_path):
    a, _ = sdxl_loras
    models = load_sdxl_models(tiny_sdxl_ckpt)
    to_sgm = lora.name_aliases(lora.sd_scopes(models.text_encoders, models.unet))
    to_diffusers = {sgm: diffusers for diffusers, sgm in to_sgm.items()}
    renamed = tmp_path / "diffusers_named.safetensors"
    save_file({to_diffusers.get(k.partition(".")[0], k.partition(".")[0]) + "." + k.partition(".")[2]: v
               for k, v in load_file(str(a)).items()}, str(renamed))
    assert any(k.startswith("lora_unet_mid_block_") for k in load_file(str(renamed)))
    lbw = json.dumps([1] * 10 + [0] + [1] * 9)  # M00 off: the middle block must be found by its diffusers name too
    for source, out in ((a, tmp_path / "sgm.safetensors"), (renamed, tmp_path / "diffusers.safetensors")):
        sdxl_merge_lora.main(["--sd_model", str(tiny_sdxl_ckpt), "--save_to", str(out), "--models", str(source),
                              "--lbws", lbw])
    sgm, diffusers = read_checkpoint(tmp_path / "sgm.safetensors"), read_checkpoint(tmp_path / "diffusers.safetensors")
    assert all(torch.equal(sgm[k], diffusers[k]) for k in sgm)
    with pytest.raises(SystemExit, match="diffusers paths"):
        svd_merge_lora.main(["--save_to", str(tmp_path / "mixed.safetensors"), "--models", str(a), str(renamed)])


# --- into one LoRA ----------------------------------------------------------------------------

def test_concat_merge_is_the_exact_weighted_sum(sd_loras, tmp_path):
    a, b, _ = sd_loras
    out = tmp_path / "concat.safetensors"
    merge_lora.main(["--save_to", str(out), "--models", str(a), str(b), "--ratios", "0.7", "-0.5", "--concat",
                     "--shuffle"])
    da, db, dm = deltas(a), deltas(b), deltas(out)
    assert dm.keys() == da.keys() | db.keys()
    for name, delta in dm.items():
        expected = 0.7 * da.get(name, 0) - 0.5 * db.get(name, 0)
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)
    ra, rb, rm = ranks(a), ranks(b), ranks(out)
    assert all(rm[n] == ra.get(n, 0) + rb.get(n, 0) for n in rm)
    md = metadata(out)
    assert md["ss_network_dim"] == "Dynamic"  # text encoder rank 4 (only a), U-Net 4 + 2
    assert md["ss_output_name"] == "a" and md["ss_network_module"] == "networks.lora"
    assert json.loads(md["ss_network_args"])["conv_dim"] == "3"
    state = load_file(str(out))
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == addnet_hashes(state, md)


def test_same_rank_merge_warns_and_keeps_the_rank(sd_loras, tmp_path, caplog):
    a, _, c = sd_loras
    out = tmp_path / "same.safetensors"
    with caplog.at_level("WARNING"):
        merge_lora.main(["--save_to", str(out), "--models", str(a), str(c), "--ratios", "0.5", "0.5"])
    assert "approximate" in caplog.text and "--concat" in caplog.text
    assert ranks(out) == ranks(a)
    md = metadata(out)
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"  # the first file's alpha


def test_same_rank_merge_of_one_file_scales_it_exactly(sd_loras, tmp_path):
    a, _, _ = sd_loras
    out = tmp_path / "scaled.safetensors"
    merge_lora.main(["--save_to", str(out), "--models", str(a), "--ratios", "-0.6"])
    da, dm = deltas(a), deltas(out)
    for name in da:
        torch.testing.assert_close(dm[name], -0.6 * da[name], rtol=1e-5, atol=1e-6)


def test_same_rank_merge_refuses_different_ranks(sd_loras, tmp_path):
    a, b, _ = sd_loras
    with pytest.raises(SystemExit, match="--concat"):
        merge_lora.main(["--save_to", str(tmp_path / "x.safetensors"), "--models", str(a), str(b)])


def test_save_precision_fp16(sd_loras, tmp_path):
    a, b, _ = sd_loras
    out = tmp_path / "half.safetensors"
    merge_lora.main(["--save_to", str(out), "--models", str(a), str(b), "--concat", "--save_precision", "fp16",
                     "--no_metadata"])
    assert {v.dtype for v in load_file(str(out)).values()} == {torch.float16}
    md = metadata(out)
    assert "ss_output_name" not in md and md["ss_network_module"] == "networks.lora"
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == addnet_hashes(load_file(str(out)), md)


# --- svd_merge_lora.py ------------------------------------------------------------------------

def test_svd_merge_to_full_rank_is_lossless(sd_loras, tmp_path):
    a, b, _ = sd_loras
    out = tmp_path / "svd_full.safetensors"
    svd_merge_lora.main(["--save_to", str(out), "--models", str(a), str(b), "--ratios", "0.7", "-0.5",
                         "--new_rank", "6", "--new_conv_rank", "3"])
    da, db, dm = deltas(a), deltas(b), deltas(out)
    assert dm.keys() == da.keys() | db.keys()
    for name, delta in dm.items():
        torch.testing.assert_close(delta, 0.7 * da.get(name, 0) - 0.5 * db.get(name, 0), rtol=1e-4, atol=1e-5)
    md = metadata(out)
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("6", "6.0")
    assert json.loads(md["ss_network_args"])["conv_dim"] == "3"


def test_svd_merge_to_lower_rank_is_the_truncated_svd(sdxl_loras, tmp_path):
    a, b = sdxl_loras
    out = tmp_path / "svd_low.safetensors"
    svd_merge_lora.main(["--save_to", str(out), "--models", str(a), str(b), "--ratios", "1.0", "0.5",
                         "--new_rank", "2", "--new_conv_rank", "1"])
    da, db, dm = deltas(a), deltas(b), deltas(out)
    state = load_file(str(out))
    for name, delta in dm.items():
        summed = da[name] + 0.5 * db.get(name, 0)
        rank = 1 if summed.ndim == 4 and summed.shape[2:] != (1, 1) else 2
        u, s, vh = torch.linalg.svd(summed.flatten(1), full_matrices=False)
        expected = (u[:, :rank] * s[:rank]) @ vh[:rank]
        torch.testing.assert_close(delta.flatten(1), expected, rtol=1e-4, atol=1e-5)
        assert float(state[f"{name}.alpha"]) == rank == state[f"{name}.lora_down.weight"].shape[0]


def test_svd_merge_lbws_zero_removes_exactly_those_modules(sdxl_loras, tmp_path):
    a, b = sdxl_loras
    out = tmp_path / "svd_lbw.safetensors"
    # 12 values: BASE, IN04 IN05 IN07 IN08, M00, OUT00-OUT05; zero BASE and M00 of the first file only
    lbw_a = [0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]
    svd_merge_lora.main(["--save_to", str(out), "--models", str(a), str(b), "--ratios", "1", "0", "--new_rank", "8",
                         "--new_conv_rank", "4", "--lbws", json.dumps(lbw_a), json.dumps([1] * 12)])
    da, dm = deltas(a), deltas(out)
    removed = {n for n in da if lbw_block(n) in ("BASE", "M00")}
    assert removed and any(n.startswith("lora_te2_") for n in removed)
    assert dm.keys() == da.keys() - removed
    for name, delta in dm.items():
        torch.testing.assert_close(delta, da[name], rtol=1e-4, atol=1e-5)


def test_lbws_with_the_wrong_length_is_a_clear_error(sdxl_loras, tmp_path):
    a, _ = sdxl_loras
    with pytest.raises(SystemExit, match=r"17 values.*SD 1\.x/2\.x layout.*12 values.*20 values"):
        svd_merge_lora.main(["--save_to", str(tmp_path / "x.safetensors"), "--models", str(a),
                             "--lbws", json.dumps([1] * 17)])


# --- errors and --help ------------------------------------------------------------------------

def test_sdxl_lora_given_to_merge_lora_names_the_right_script(sdxl_loras, tmp_path):
    a, _ = sdxl_loras
    with pytest.raises(SystemExit, match=rf"{a.name}.*SDXL LoRA.*sdxl_merge_lora\.py"):
        merge_lora.main(["--save_to", str(tmp_path / "x.safetensors"), "--models", str(a)])


def test_output_equal_to_an_input_is_refused(sd_loras, tiny_sd1_ckpt):
    a, b, _ = sd_loras
    before = a.read_bytes()
    with pytest.raises(SystemExit, match="one of the input files"):
        merge_lora.main(["--save_to", str(a), "--models", str(a), str(b), "--concat"])
    with pytest.raises(SystemExit, match="one of the input files"):
        merge_lora.main(["--sd_model", str(tiny_sd1_ckpt), "--save_to", str(tiny_sd1_ckpt), "--models", str(a)])
    assert a.read_bytes() == before


def test_scripts_help_runs_from_the_command_line():
    for script in ("merge_lora.py", "sdxl_merge_lora.py", "svd_merge_lora.py"):
        result = subprocess.run([sys.executable, str(REPO / "networks" / script), "--help"], capture_output=True,
                                text=True, timeout=60, cwd=REPO.parent)
        assert result.returncode == 0, result.stderr
        assert "--save_to" in result.stdout and "--models" in result.stdout
