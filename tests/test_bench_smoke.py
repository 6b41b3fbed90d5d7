"""bench/: the tiny train_network benchmark end to end, the progress-bar timing it relies on, and the
sd15 checkpoint writer (at a small width) and dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from bench.common import REPO, rate_stats, run_child


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def run_tiny_train_bench(tmp_path, *flags: str) -> dict:
    """Two steps of the tiny train bench without the raw reference; the record it appended."""
    results = tmp_path / "results.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_network_bench.py"), "--model", "tiny",
                           "--steps", "2", "--warmup", "1", "--images", "2", "--resolution", "64", "--no_raw",
                           *flags, "--workdir", str(tmp_path / "work"), "--results", str(results)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(results.read_text().splitlines()[-1])


def test_tiny_train_bench_prints_and_records_its_fields(tmp_path):
    results = tmp_path / "results.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_network_bench.py"), "--model", "tiny",
                           "--steps", "2", "--warmup", "1", "--images", "2", "--resolution", "64",
                           "--workdir", str(tmp_path / "work"), "--results", str(results)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    titles = [c.strip() for c in lines[header].strip("|").split("|")]
    cells = dict(zip(titles, (c.strip() for c in lines[header + 2].strip("|").split("|"))))
    assert titles == ["model", "px", "steps", "threads", "s/step", "steps/s", "raw s/step", "overhead",
                      "latent cache", "caching s", "first step s", "peak RSS MiB", "raw RSS MiB"]
    assert cells["model"] == "tiny" and cells["px"] == "64" and cells["steps"] == "2" and cells["threads"] == "1"
    assert cells["latent cache"] == "memory"
    assert all(float(cells[k]) > 0 for k in titles[4:] if k != "latent cache")
    assert any(line.startswith("targets: overhead ") for line in lines)

    record = json.loads(results.read_text().splitlines()[-1])
    assert record["bench"] == "train_network" and record["steps"] == 2 and record["warmup"] == 1
    assert record["overhead"] == pytest.approx(record["step_s"] / record["raw_step_s"])
    assert record["steps_per_s"] == pytest.approx(1 / record["step_s"])
    # the first step comes after process start, imports, loading and latent caching
    assert record["first_step_s"] > record["loop_first_step_s"] > 0 and record["first_step_s"] > record["step_s"]
    assert 0 < record["caching_s"] < record["loop_start_s"]  # the VAE pass is part of the start
    assert 100 < record["peak_rss_mib"] < 8192 and 100 < record["raw_peak_rss_mib"] < 8192
    assert 0 < record["raw_fwd_bwd_s"] < record["raw_step_s"]
    assert (tmp_path / "work" / "out_train_tiny" / "bench_lora.safetensors").is_file()


def test_disk_cache_mode_times_a_run_that_encodes_nothing(tmp_path):
    record = run_tiny_train_bench(tmp_path, "--disk_cache")
    assert record["latent_cache"] == "disk" and record["caching_s"] == 0  # no caching bar: nothing encoded
    assert len(list((tmp_path / "work").rglob("*_sd.npz"))) == 2  # written by tools/cache_latents.py, then reused


def test_first_use_mode_has_no_caching_pass_before_the_steps(tmp_path):
    record = run_tiny_train_bench(tmp_path, "--first_use")
    assert record["latent_cache"] == "first use, memory"
    assert record["caching_s"] == 0  # no caching pass before the loop: the steps encoded the images
    dry = subprocess.run([sys.executable, str(REPO / "bench" / "train_network_bench.py"), "--model", "tiny",
                          "--first_use", "--dry_run", "--workdir", str(tmp_path / "work")],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and "--cache_latents --" in dry.stdout and " --cache_latents_on_first_use" in dry.stdout


def test_timed_run_records_update_and_iteration_bars(tmp_path):
    script = tmp_path / "bars.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from tqdm.auto import tqdm
        bar = tqdm(total=3, desc="steps")
        for _ in range(3):
            time.sleep(0.02)
            bar.update(1)
        bar.close()
        for _ in tqdm(range(4), desc="caching latents"):
            time.sleep(0.01)
        sys.exit(0)  # the events are written on exit too
    """))
    run = run_child([str(script)], timed=True, env=_env()).check()
    steps = run.bar("steps")
    assert [n for _, n in steps["events"]] == [1, 2, 3] and steps["total"] == 3
    caching = run.bar("caching latents")
    assert [n for _, n in caching["events"]] == [0, 1, 2, 3, 4]
    stats = rate_stats(steps, warmup=1, launched=run.launched)
    assert stats.items == 3 and stats.warmup == 1 and stats.seconds_per_item >= 0.02
    assert stats.first_item_after_launch_s > stats.first_item_after_bar_s >= 0.02
    assert rate_stats(caching, warmup=2).seconds_per_item >= 0.01
    assert run.peak_rss_bytes > 10 * 2**20
    with pytest.raises(RuntimeError, match="no 'images' progress bar"):
        run.bar("images")


def test_rate_stats_rules():
    bar = {"desc": "steps", "created": 0.0, "initial": 0, "events": [(5.0, 1), (6.0, 2), (8.0, 4), (9.0, 5)]}
    stats = rate_stats(bar, warmup=2, launched=-1.0)
    assert (stats.items, stats.warmup, stats.seconds_per_item) == (5, 2, 1.0)  # (9 - 6) / 3
    # a throttled bar: count 3 was never seen, so the mean starts at the first event past the warm-up
    assert (rate_stats(bar, warmup=3).warmup, rate_stats(bar, warmup=3).seconds_per_item) == (4, 1.0)
    assert stats.first_item_after_bar_s == 5.0 and stats.first_item_after_launch_s == 6.0
    assert rate_stats(bar, warmup=100).warmup == 4  # capped: at least one timed item stays
    with pytest.raises(RuntimeError, match="too few"):
        rate_stats({**bar, "events": [(1.0, 1)]}, warmup=1)
    resumed = {**bar, "initial": 3, "events": [(1.0, 4), (3.0, 5), (4.0, 6)]}
    assert rate_stats(resumed, warmup=1).items == 3


def test_sd15_writer_at_small_width_loads_back(tmp_path, monkeypatch):
    """The sd15 write path (build, convert, save) on the same code with narrow configs."""
    from bench import models
    from library.families.sd.loading import load_sd_models

    monkeypatch.setitem(models.SD15_UNET_CONFIG, "block_out_channels", (32, 32, 64, 64))
    monkeypatch.setitem(models.SD15_UNET_CONFIG, "cross_attention_dim", 64)
    monkeypatch.setitem(models.SD15_UNET_CONFIG, "layers_per_block", 1)
    monkeypatch.setitem(models.SD15_VAE_CONFIG, "block_out_channels", (32, 32, 32, 32))
    monkeypatch.setitem(models.SD15_VAE_CONFIG, "layers_per_block", 1)
    for key, value in {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 1, "projection_dim": 64}.items():
        monkeypatch.setitem(models.CLIP_L_TEXT_CONFIG, key, value)
    path = models.prepare_model("sd15", tmp_path, dtype="fp16")
    assert path == tmp_path / "sd15_random_seed0_fp16.safetensors" and path.is_file()
    loaded = load_sd_models(path, v2=False)
    assert tuple(loaded.unet.config.block_out_channels) == (32, 32, 64, 64)
    assert loaded.unet.config.cross_attention_dim == 64 and loaded.text_encoder.config.num_hidden_layers == 2
    assert tuple(loaded.vae.config.block_out_channels) == (32, 32, 32, 32)
    unet, _, _ = models.build_sd15("cpu", seed=0)
    first = next(iter(unet.state_dict()))
    assert loaded.unet.state_dict()[first].half().equal(unet.state_dict()[first].half())  # the seed's weights
    mtime = path.stat().st_mtime_ns
    assert models.prepare_model("sd15", tmp_path, dtype="fp16") == path and path.stat().st_mtime_ns == mtime


def test_sd15_dry_run_matches_the_real_architecture():
    from bench.models import sd15_dry_run

    got = sd15_dry_run()
    # SD 1.5: U-Net 859.52 M, VAE 83.65 M, CLIP-L text 123.06 M parameters; kohya's 192 + 72 LoRA modules
    assert (got["unet_params"], got["vae_params"], got["text_encoder_params"]) == (859_520_964, 83_653_863,
                                                                                   123_060_480)
    assert got["loaded_unet_params"] == got["unet_params"] and got["loaded_vae_params"] == got["vae_params"]
    assert got["loaded_text_encoder_params"] == got["text_encoder_params"]
    assert got["config_mismatches"] == [] and got["lora_modules"] == 264
