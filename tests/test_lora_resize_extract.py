"""LoRA file tools: resize_lora, extract_lora_from_models, check_lora_weights, show_metadata."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import library.log
from library.io_utils import addnet_hashes
from networks import check_lora_weights, extract_lora_from_models, resize_lora
from networks.lora_file import LoRAWeights, lora_modules, modules_to_state_dict, read_lora, write_lora
from tools import show_metadata

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _keep_pytest_logging(monkeypatch):
    # main() configures the root logger for a user's console; inside pytest leave the handlers alone
    monkeypatch.setattr(library.log, "_configured", True)


# --- LoRAs with known singular values -------------------------------------------------------------

def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q


def module_with_spectrum(name: str, out: int, fan_in: int, singular_values: list[float], alpha: float,
                         seed: int = 0, kernel: tuple[int, int] | None = None) -> LoRAWeights:
    """A module whose ``up @ down`` has exactly ``singular_values`` (the update: times alpha/rank)."""
    generator = torch.Generator().manual_seed(seed)
    rank = len(singular_values)
    flat_in = fan_in * (kernel[0] * kernel[1] if kernel else 1)
    u, v = orthonormal(out, rank, generator), orthonormal(flat_in, rank, generator)
    root = torch.tensor(singular_values, dtype=torch.float64).sqrt()
    up, down = (u * root).float(), (root[:, None] * v.T).float()
    if kernel:
        up, down = up.reshape(out, rank, 1, 1), down.reshape(rank, fan_in, *kernel)
    return LoRAWeights(name, down.contiguous(), up.contiguous(), alpha)


def random_module(name: str, out: int, fan_in: int, rank: int, alpha: float, seed: int,
                  kernel: tuple[int, int] | None = None) -> LoRAWeights:
    generator = torch.Generator().manual_seed(seed)
    shape_in = (fan_in, *kernel) if kernel else (fan_in,)
    down = torch.randn(rank, *shape_in, generator=generator) * 0.1
    up = torch.randn(out, rank, *((1, 1) if kernel else ()), generator=generator) * 0.1
    return LoRAWeights(name, down, up, alpha)


TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
PROJ = "lora_unet_down_blocks_0_attentions_0_proj_in"  # 1x1 conv: network_dim
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # 3x3 conv: conv_dim

TRAINED_METADATA = {"ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_network_module": "networks.lora",
                    "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "1.0"}),
                    "ss_training_comment": "my style", "ss_output_name": "style",
                    "sshs_model_hash": "stale", "sshs_legacy_hash": "stale"}


@pytest.fixture
def trained_lora(tmp_path) -> tuple[Path, dict[str, LoRAWeights]]:
    """A rank-8 (alpha 4) LoRA with a 3x3-conv module of rank 4 (alpha 1), as a trained file has."""
    modules = {
        TE: random_module(TE, 32, 32, 8, 4.0, seed=1),
        ATTN: random_module(ATTN, 48, 40, 8, 4.0, seed=2),
        PROJ: random_module(PROJ, 32, 24, 8, 4.0, seed=3, kernel=(1, 1)),
        CONV: random_module(CONV, 16, 12, 4, 1.0, seed=4, kernel=(3, 3)),
    }
    path = tmp_path / "trained.safetensors"
    write_lora(path, modules_to_state_dict(modules), TRAINED_METADATA)
    return path, modules


def truncated_svd(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double().flatten(1), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape)


def assert_hashes_current(path: Path) -> None:
    state_dict, metadata = read_lora(path)
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == addnet_hashes(state_dict, metadata)


# --- resize_lora --------------------------------------------------------------------------------

def test_resize_to_the_same_rank_is_lossless(trained_lora, tmp_path):
    path, modules = trained_lora
    out = tmp_path / "same.safetensors"
    resize_lora.main(["--model", str(path), "--save_to", str(out), "--new_rank", "8", "--new_conv_rank", "4"])
    resized = lora_modules(read_lora(out)[0])
    assert resized.keys() == modules.keys()
    for name, module in modules.items():
        new = resized[name]
        assert new.rank == module.rank and new.alpha == pytest.approx(module.alpha)
        assert new.down.shape == module.down.shape and new.up.shape == module.up.shape
        torch.testing.assert_close(new.delta(), module.delta(), rtol=1e-5, atol=1e-6)


def test_resize_to_a_lower_rank_is_the_truncated_svd_and_updates_metadata(trained_lora, tmp_path):
    path, modules = trained_lora
    out = tmp_path / "r3.safetensors"
    resize_lora.main(["--model", str(path), "--save_to", str(out), "--new_rank", "3", "--new_conv_rank", "2"])
    state_dict, metadata = read_lora(out)
    resized = lora_modules(state_dict)
    for name, module in modules.items():
        rank = 2 if name == CONV else 3
        new = resized[name]
        assert new.rank == rank
        # the alpha-to-rank scale is kept: new alpha = old alpha / old rank * new rank
        assert new.alpha == pytest.approx(module.alpha / module.rank * rank)
        expected = truncated_svd(module.delta(torch.float64), rank)
        torch.testing.assert_close(new.delta(torch.float64), expected, rtol=1e-5, atol=1e-6)
    assert state_dict[f"{ATTN}.lora_down.weight"].dtype == torch.float32  # --save_precision default: float
    assert metadata["ss_network_dim"] == "3"
    assert metadata["ss_network_alpha"] == "1.5"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "0.5"}
    assert metadata["ss_training_comment"] == "my style; dimension is resized from 8 to 3 (conv: 2)"
    assert metadata["ss_output_name"] == "style"  # the rest of the input's metadata is kept
    assert metadata["sshs_model_hash"] != "stale"
    assert_hashes_current(out)


def test_resize_save_precision_and_refuses_to_overwrite_its_input(trained_lora, tmp_path):
    path, _ = trained_lora
    out = tmp_path / "half.safetensors"
    resize_lora.main(["--model", str(path), "--save_to", str(out), "--new_rank", "2", "--save_precision", "fp16"])
    assert {t.dtype for t in read_lora(out)[0].values()} == {torch.float16}
    before = path.read_bytes()
    with pytest.raises(SystemExit, match="input"):
        resize_lora.main(["--model", str(path), "--save_to", str(path), "--new_rank", "2"])
    assert path.read_bytes() == before
    with pytest.raises(SystemExit):  # a dynamic method needs its parameter
        resize_lora.main(["--model", str(path), "--save_to", str(out), "--dynamic_method", "sv_fro"])


SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]


def reference_rank(method: str, param: float, s: list[float], max_rank: int) -> int:
    """The methods' definitions, spelled out independently of the tool."""
    if method == "sv_ratio":
        rank = sum(1 for v in s if v >= max(s) / param)
    elif method == "sv_fro":
        total = sum(v * v for v in s) ** 0.5
        rank = next(k for k in range(1, len(s) + 1) if sum(v * v for v in s[:k]) ** 0.5 >= param * total)
    else:
        rank = next(k for k in range(1, len(s) + 1) if sum(s[:k]) >= param * sum(s))
    return max(1, min(rank, max_rank))


@pytest.mark.parametrize("method, param, max_rank, expected", [
    ("sv_ratio", 2.0, 6, 2),  # keep S >= 4
    ("sv_ratio", 5.0, 6, 3),  # keep S >= 1.6
    ("sv_ratio", 8.0, 6, 4),  # S == max/param is kept
    ("sv_ratio", 1000.0, 4, 4),  # capped by new_rank
    ("sv_fro", 0.8, 6, 1),  # sqrt(64/85.3125) = 0.866
    ("sv_fro", 0.9, 6, 2),  # sqrt(80/85.3125) = 0.968
    ("sv_fro", 0.99, 6, 3),  # sqrt(84/85.3125) = 0.992
    ("sv_cumulative", 0.5, 6, 1),  # 8/15.75 = 0.508
    ("sv_cumulative", 0.8, 6, 3),  # 14/15.75 = 0.889
    ("sv_cumulative", 0.95, 6, 4),  # 15/15.75 = 0.952
    ("sv_cumulative", 1.0, 3, 3),
])
def test_dynamic_methods_pick_the_rank_of_their_definition(method, param, max_rank, expected, tmp_path):
    assert reference_rank(method, param, SPECTRUM, max_rank) == expected
    # on the singular values directly, and through a file whose update has this spectrum (x alpha/rank)
    assert resize_lora.choose_rank(torch.tensor(SPECTRUM), max_rank, method, param) == expected
    module = module_with_spectrum(ATTN, 24, 20, SPECTRUM, alpha=3.0, seed=5)
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_lora(path, modules_to_state_dict({ATTN: module}), {"ss_network_dim": "6"})
    resize_lora.main(["--model", str(path), "--save_to", str(out), "--new_rank", str(max_rank),
                      "--dynamic_method", method, "--dynamic_param", str(param)])
    new = lora_modules(read_lora(out)[0])[ATTN]
    assert new.rank == expected
    torch.testing.assert_close(new.delta(torch.float64), truncated_svd(module.delta(torch.float64), expected),
                               rtol=1e-5, atol=1e-6)


def test_dynamic_resize_metadata_and_the_untrained_edge(tmp_path, caplog):
    modules = {
        ATTN: module_with_spectrum(ATTN, 24, 20, SPECTRUM, alpha=6.0, seed=6),  # sv_fro 0.9 -> 2
        TE: module_with_spectrum(TE, 32, 32, [5.0, 4.0, 3.5, 0.01, 0.01, 0.01], alpha=6.0, seed=7),  # -> 3
        PROJ: LoRAWeights(PROJ, torch.randn(6, 24, 1, 1), torch.zeros(32, 6, 1, 1), 6.0),  # untrained -> 1
    }
    path, out = tmp_path / "in.safetensors", tmp_path / "dyn.safetensors"
    write_lora(path, modules_to_state_dict(modules), {"ss_network_dim": "6", "ss_network_alpha": "6.0"})
    caplog.set_level("INFO")
    resize_lora.main(["--model", str(path), "--save_to", str(out), "--new_rank", "6", "--dynamic_method", "sv_fro",
                      "--dynamic_param", "0.9", "--verbose"])
    state_dict, metadata = read_lora(out)
    resized = lora_modules(state_dict)
    assert {n: m.rank for n, m in resized.items()} == {ATTN: 2, TE: 3, PROJ: 1}
    assert {n: m.alpha for n, m in resized.items()} == {ATTN: 2.0, TE: 3.0, PROJ: 1.0}
    assert not resized[PROJ].up.any()
    assert metadata["ss_network_dim"] == "Dynamic" and metadata["ss_network_alpha"] == "Dynamic"
    assert metadata["ss_training_comment"] == "dynamic resize with sv_fro: 0.9 from 6"
    assert_hashes_current(out)
    assert f"{ATTN}: rank 6 -> 2" in caplog.text and "Frobenius norm retained 96.8%" in caplog.text
    assert "3 modules resized" in caplog.text


# --- extract_lora_from_models -------------------------------------------------------------------

def low_rank_update(shape: tuple[int, ...], rank: int, max_abs: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randn(shape[0], rank, generator=generator) @ torch.randn(rank, math.prod(shape[1:]),
                                                                          generator=generator)
    return (flat * (max_abs / flat.abs().max())).reshape(shape)


def make_tuned(models, te, unet, out: Path, updates: dict[str, tuple[int, float]]) -> dict[str, torch.Tensor]:
    """Add a rank-``r`` update with the given max |value| to the named layers of the loaded models
    (changed in place) and save them as a single file ``out``; returns the updates."""
    layers = extract_lora_from_models.adapted_layers(te, unet, conv_dim=4)
    applied = {}
    with torch.no_grad():
        for seed, (name, (rank, max_abs)) in enumerate(updates.items()):
            weight = layers[name][0].weight
            update = low_rank_update(tuple(weight.shape), rank, max_abs, seed)
            weight += update
            applied[name] = update
    save_file(models.ldm_state_dict(), str(out))
    return applied


SD1_UPDATES = {
    "lora_te_text_model_encoder_layers_1_self_attn_q_proj": (2, 0.05),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (3, 0.5),
    "lora_unet_mid_block_attentions_0_proj_in": (1, 0.5),  # 1x1 conv
    "lora_unet_down_blocks_0_resnets_0_conv1": (2, 0.5),  # 3x3 conv
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v": (2, 0.001),  # below --min_diff
}


@pytest.fixture(scope="module")
def tuned_sd1(tiny_sd1_ckpt, tmp_path_factory):
    from library.families.sd.loading import load_sd_models

    models = load_sd_models(tiny_sd1_ckpt, v2=False)
    out = tmp_path_factory.mktemp("tuned_sd1") / "tuned.safetensors"
    return out, make_tuned(models, models.text_encoder, models.unet, out, SD1_UPDATES)


def test_extract_sd1_recovers_the_update(tiny_sd1_ckpt, tuned_sd1, tmp_path):
    tuned, updates = tuned_sd1
    out = tmp_path / "extracted.safetensors"
    extract_lora_from_models.main(["--model_org", str(tiny_sd1_ckpt), "--model_tuned", str(tuned), "--save_to",
                                   str(out), "--dim", "4", "--conv_dim", "4", "--clamp_quantile", "1.0"])
    state_dict, metadata = read_lora(out)
    modules = lora_modules(state_dict)
    expected = {name for name, (_, max_abs) in SD1_UPDATES.items() if max_abs >= 0.01}
    assert modules.keys() == expected  # unchanged layers and the one below --min_diff have no module
    for name in expected:
        module = modules[name]
        assert module.rank == 4 and module.alpha == 4.0
        torch.testing.assert_close(module.delta(), updates[name], rtol=0, atol=1e-5)
    assert modules["lora_unet_down_blocks_0_resnets_0_conv1"].down.shape[1:] == (32, 3, 3)
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "4.0")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}
    assert (metadata["ss_v2"], metadata["ss_base_model_version"]) == ("False", "sd_v1")
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.title"] == "extracted"
    assert_hashes_current(out)

    # the file is a LoRA of this model: our loader names every module as a layer of it
    from library.families.sd.loading import load_sd_models
    from networks.lora import create_network_from_weights

    base = load_sd_models(tiny_sd1_ckpt, v2=False)
    network, _ = create_network_from_weights(1.0, out, None, base.text_encoder, base.unet)
    assert {lora.lora_name for lora in network.loras} == expected


def test_extract_leaves_out_the_text_encoder_below_min_diff(tiny_sd1_ckpt, tuned_sd1, tmp_path):
    tuned, updates = tuned_sd1
    out = tmp_path / "unet_only.safetensors"
    extract_lora_from_models.main(["--model_org", str(tiny_sd1_ckpt), "--model_tuned", str(tuned), "--save_to",
                                   str(out), "--dim", "4", "--min_diff", "0.1", "--clamp_quantile", "1.0",
                                   "--no_metadata", "--save_precision", "bf16"])
    state_dict, metadata = read_lora(out)
    names = set(lora_modules(state_dict))
    # no conv_dim: only the attention layers; the text encoder's update (max 0.05) is below 0.1
    assert names == {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                     "lora_unet_mid_block_attentions_0_proj_in"}
    assert {t.dtype for t in state_dict.values()} == {torch.bfloat16}
    assert not any(k.startswith("modelspec.") for k in metadata)
    assert {k for k in metadata if k.startswith("ss_")} == {"ss_v2", "ss_base_model_version", "ss_network_module",
                                                             "ss_network_dim", "ss_network_alpha"}


def test_extract_sdxl_uses_sgm_names_and_both_text_encoders(tiny_sdxl_ckpt, tmp_path):
    from library.families.sdxl.loading import load_sdxl_models

    models = load_sdxl_models(tiny_sdxl_ckpt)
    names = list(extract_lora_from_models.adapted_layers(models.text_encoders, models.unet, conv_dim=None))
    chosen = {next(n for n in names if n.startswith("lora_te1_")): (2, 0.2),
              next(n for n in names if n.startswith("lora_te2_") and n.endswith("v_proj")): (1, 0.2),
              next(n for n in names if n.startswith("lora_unet_input_blocks_") and n.endswith("attn2_to_q")): (2, 0.3)}
    tuned = tmp_path / "tuned_sdxl.safetensors"
    updates = make_tuned(models, models.text_encoders, models.unet, tuned, chosen)
    out = tmp_path / "sdxl_lora.safetensors"
    extract_lora_from_models.main(["--sdxl", "--model_org", str(tiny_sdxl_ckpt), "--model_tuned", str(tuned),
                                   "--save_to", str(out), "--dim", "2", "--clamp_quantile", "1.0"])
    state_dict, metadata = read_lora(out)
    modules = lora_modules(state_dict)
    assert modules.keys() == chosen.keys()
    for name, update in updates.items():
        torch.testing.assert_close(modules[name].delta(), update, rtol=0, atol=1e-5)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_extract_clamp_quantile_bounds_the_factors(tiny_sd1_ckpt, tuned_sd1, tmp_path):
    tuned, _ = tuned_sd1
    out = tmp_path / "clamped.safetensors"
    extract_lora_from_models.main(["--model_org", str(tiny_sd1_ckpt), "--model_tuned", str(tuned), "--save_to",
                                   str(out), "--dim", "4", "--clamp_quantile", "0.5"])
    for module in lora_modules(read_lora(out)[0]).values():
        values = torch.cat([module.up.flatten(), module.down.flatten()]).abs()
        # clamped to the median of |value|: at least half the values sit at the limit
        assert (values >= values.max() * (1 - 1e-6)).float().mean() >= 0.5


# --- check_lora_weights and show_metadata -------------------------------------------------------------

def test_check_lora_weights_flags_a_zero_lora_up(tmp_path, capsys):
    modules = {ATTN: random_module(ATTN, 16, 16, 4, 4.0, seed=1),
               TE: LoRAWeights(TE, torch.randn(4, 16), torch.zeros(16, 4), 4.0)}
    path = tmp_path / "half_trained.safetensors"
    write_lora(path, modules_to_state_dict(modules), {})
    report = check_lora_weights.main([str(path)])
    out = capsys.readouterr().out
    assert [m.name for m in report.problems] == [TE]
    assert TE in out and "untrained" in out and ATTN not in out
    assert "2 modules (1 text encoder, 1 other): 1 with problems, 1 untrained" in out
    check_lora_weights.main([str(path), "-s"])
    out = capsys.readouterr().out
    assert ATTN in out and TE in out
    mean_up = float(modules[ATTN].up.abs().mean())
    assert f"{mean_up:.3e}" in out


def test_show_metadata_prints_nested_json(tmp_path, capsys):
    metadata = {"ss_network_dim": "8", "ss_network_args": json.dumps({"conv_dim": "4"}),
                "ss_tag_frequency": json.dumps({"10_sks": {"sks": 3, "red": 1}}),
                "ss_datasets": json.dumps([{"subsets": [{"num_repeats": 10}]}]), "ss_output_name": "[not json"}
    path = tmp_path / "meta.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata=metadata)
    show_metadata.main(["--model", str(path)])
    shown = json.loads(capsys.readouterr().out)
    assert shown == {"ss_datasets": [{"subsets": [{"num_repeats": 10}]}], "ss_network_args": {"conv_dim": "4"},
                     "ss_network_dim": "8", "ss_output_name": "[not json",
                     "ss_tag_frequency": {"10_sks": {"sks": 3, "red": 1}}}
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, str(bare))
    show_metadata.main(["--model", str(bare)])
    assert json.loads(capsys.readouterr().out) == {}
    with pytest.raises(SystemExit):
        show_metadata.main(["--model", str(tmp_path / "missing.safetensors")])


@pytest.mark.parametrize("script", ["networks/resize_lora.py", "networks/extract_lora_from_models.py",
                                    "networks/check_lora_weights.py", "tools/show_metadata.py"])
def test_scripts_run_by_path_with_help(script, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "--console_log_level" in proc.stdout
