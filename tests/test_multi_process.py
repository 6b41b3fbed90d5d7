"""`accelerate launch` with two CPU processes (gloo): split work, one writer, the result of one process.

The two processes see different images with different noise than a single process with the same
global batch, so the weights cannot be bit-identical; "within tolerance" is measured against the
spread that the noise alone causes: two single-process runs that differ only in --seed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from library.demo.shapes import write_shapes_folder
from tests.train_helpers import REPO, base_train_args, read_metadata, run_script


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(REPO / script), *map(str, args)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"two-process run failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def up_distance(a: dict, b: dict) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a if "lora_up" in k) ** 0.5)


@pytest.mark.slow
def test_two_cpu_processes_train_like_one_with_the_same_global_batch(tmp_path, tiny_sd1_ckpt):
    data = tmp_path / "train"
    write_shapes_folder(data / "1_toy", 16, seed=7)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --d 1\na blue square --w 64 --h 64 --s 2 --d 2\n")
    # SGD: its update is proportional to the gradient, so the averaged gradient shows in the weights
    # (AdamW's first steps are nearly sign(gradient) and hide it under the noise).
    common = dict(train_data_dir=data, caption_extension=".txt", optimizer_type="SGD", learning_rate=1.0,
                  max_train_steps=4, cache_latents=True)

    two = tmp_path / "two"
    proc = launch_two("train_network.py", base_train_args(
        tiny_sd1_ckpt, two, train_batch_size=8, cache_latents_to_disk=True, sample_prompts=prompts,
        sample_every_n_steps=2, **common))
    one, other_seed = tmp_path / "one", tmp_path / "one_seed"
    run_script("train_network.py", base_train_args(tiny_sd1_ckpt, one, train_batch_size=16, **common))
    run_script("train_network.py", base_train_args(tiny_sd1_ckpt, other_seed, train_batch_size=16, seed=43,
                                                   **common))

    # one writer: a single complete file, no temporary leftovers, metadata of the global batch
    assert sorted(p.name for p in two.iterdir() if p.is_file()) == ["lora.safetensors"]
    metadata = read_metadata(two / "lora.safetensors")
    assert metadata["ss_total_batch_size"] == "16" and metadata["ss_max_train_steps"] == "4"
    assert metadata["ss_num_epochs"] == "4"  # 16 images = one global batch of 2 x 8 per step
    # the processes shared the latent cache files and the sample prompts: each file exactly once
    assert len(list((data / "1_toy").glob("*_sd.npz"))) == 16
    samples = sorted(p.name for p in (two / "sample").glob("*.png"))
    assert len(samples) == 4 and len(set(samples)) == 4  # 2 prompts x steps 2 and 4
    # only the main process reports progress
    assert proc.stderr.count("training finished") == 1

    a, b, c = (load_file(str(folder / "lora.safetensors")) for folder in (two, one, other_seed))
    assert a.keys() == b.keys()
    trained = up_distance(b, {k: torch.zeros_like(v) for k, v in b.items()})
    noise_spread = up_distance(b, c)
    assert trained > 0.0
    assert up_distance(a, b) < 0.6 * noise_spread, (up_distance(a, b), noise_spread, trained)


def test_deepspeed_without_the_package_says_how_to_get_it(tmp_path, tiny_sd1_ckpt):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here: the missing-package message cannot be shown")
    write_shapes_folder(tmp_path / "train" / "1_toy", 1)
    out = tmp_path / "out"
    proc = run_script("train_network.py", base_train_args(tiny_sd1_ckpt, out, train_data_dir=tmp_path / "train",
                                                          deepspeed=True, zero_stage=2), expect_ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--deepspeed needs the optional deepspeed package" in proc.stderr and "pip install deepspeed" in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_single_process_launch_on_a_cpu_machine_warns_how_to_start_several(monkeypatch, caplog):
    from library.training import accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with caplog.at_level("WARNING"):
        assert accelerator._cpu_processes() is False
    assert "accelerate launch --multi_gpu --num_processes N" in caplog.text
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert accelerator._cpu_processes() is True  # several processes, no GPU: one gloo group


def test_fsdp_without_a_gpu_is_refused_in_one_line(monkeypatch):
    from library.args import ArgumentError
    from library.training.accelerator import make_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ArgumentError, match="FSDP .* needs GPUs .* --multi_gpu --num_processes N"):
        make_accelerator(object())  # refused before any flag is read


@pytest.mark.slow
def test_two_processes_cache_latents_on_first_use_into_one_set_of_files(tmp_path, tiny_sd1_ckpt):
    data = tmp_path / "train"
    write_shapes_folder(data / "1_toy", 8, seed=3)
    out = tmp_path / "two"
    # 2 steps x 2 processes x batch 1: four images are needed, each by one of the processes
    proc = launch_two("train_network.py", base_train_args(
        tiny_sd1_ckpt, out, train_data_dir=data, caption_extension=".txt", train_batch_size=1, max_train_steps=2,
        cache_latents_on_first_use=True, cache_latents_to_disk=True))
    assert "latents are cached on first use (on disk): 8 image(s)" in proc.stderr
    files = list((data / "1_toy").glob("*_sd.npz"))
    assert len(files) == 4 and not list((data / "1_toy").glob(".*tmp*"))
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["lora.safetensors"]
