"""Faults during training: SIGKILL then --resume, Ctrl-C with a saved state, NaN losses, kills during saves.

Every test here sends real signals to real training processes (the entry scripts, as users run
them) and checks what is on disk afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.demo.shapes import write_shapes_folder
from tests.train_helpers import REPO, base_train_args, run_script

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def start_script(script: str, args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (status {proc.returncode}) before the condition:\n{err[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def complete_states(out: Path) -> dict[int, Path]:
    """step -> state folder, for the state folders that hold a train_state.json."""
    found = {}
    for folder in out.glob("*-state"):
        info = folder / "train_state.json"
        if info.is_file():
            found[json.loads(info.read_text())["current_step"]] = folder
    return found


def assert_same_weights(a_path: Path, b_path: Path) -> None:
    a, b = load_file(str(a_path)), load_file(str(b_path))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def lora_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fault_data")
    write_shapes_folder(root / "train" / "2_toy", 3, seed=4)
    return root / "train"


def lora_args(model, out, data, **overrides):
    common = dict(train_data_dir=data, caption_extension=".txt", train_batch_size=1, max_train_steps=18,
                  network_dropout=0.1)
    return base_train_args(model, out, **{**common, **overrides})


@pytest.fixture(scope="module")
def uninterrupted_lora(tmp_path_factory, tiny_sd1_ckpt, lora_data) -> Path:
    out = tmp_path_factory.mktemp("lora_full")
    run_script("train_network.py", lora_args(tiny_sd1_ckpt, out, lora_data))
    return out / "lora.safetensors"


@pytest.mark.slow
def test_sigkill_then_resume_ends_bit_identical_lora(tmp_path, tiny_sd1_ckpt, lora_data, uninterrupted_lora):
    out = tmp_path / "killed"
    proc = start_script("train_network.py", lora_args(tiny_sd1_ckpt, out, lora_data, save_every_n_steps=3,
                                                       save_state=True))
    wait_for(lambda: 6 in complete_states(out), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    states = complete_states(out)
    assert not (out / "lora.safetensors").exists()  # it really died before the end
    # every folder under a state name is complete: half-written states only ever exist as *.tmp
    assert all((f / "train_state.json").is_file() for f in out.glob("*-state"))
    last = states[max(states)]

    resumed = tmp_path / "resumed"
    run_script("train_network.py", lora_args(tiny_sd1_ckpt, resumed, lora_data, resume=last))
    assert_same_weights(resumed / "lora.safetensors", uninterrupted_lora)


@pytest.mark.slow
def test_ctrl_c_saves_a_state_that_resumes_bit_identical(tmp_path, tiny_sd1_ckpt, lora_data, uninterrupted_lora):
    out = tmp_path / "interrupted"
    proc = start_script("train_network.py", lora_args(tiny_sd1_ckpt, out, lora_data, save_state_on_interrupt=True,
                                                       save_every_n_steps=2))
    wait_for(lambda: (out / "lora-step00000002.safetensors").exists(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    states = complete_states(out)
    step = max(states)
    assert 2 <= step < 18  # stopped early, at a step boundary
    assert f"interrupted at step {step}; saved" in err and f"--resume {states[step]}" in err
    assert (out / f"lora-step{step:08d}.safetensors").is_file()
    assert not (out / "lora.safetensors").exists()

    resumed = tmp_path / "resumed"
    run_script("train_network.py", lora_args(tiny_sd1_ckpt, resumed, lora_data, resume=states[step]))
    assert_same_weights(resumed / "lora.safetensors", uninterrupted_lora)


def test_ctrl_c_without_a_state_flag_exits_cleanly_and_says_how_to_keep_one(tmp_path, tiny_sd1_ckpt, lora_data):
    out = tmp_path / "out"
    proc = start_script("train_network.py", lora_args(tiny_sd1_ckpt, out, lora_data, max_train_steps=400,
                                                       save_every_n_steps=1))
    wait_for(lambda: (out / "lora-step00000001.safetensors").exists(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert "Traceback" not in err and "nothing saved (--save_state or --save_state_on_interrupt" in err
    assert not (out / "lora.safetensors").exists() and not list(out.glob("*-state"))


@pytest.mark.slow
def test_sigkill_then_resume_ends_bit_identical_fine_tune(tmp_path, tiny_sd1_ckpt, lora_data):
    def ft(out, **overrides):
        return base_train_args(tiny_sd1_ckpt, out, network_module=None, network_dim=None, network_alpha=None,
                               train_data_dir=lora_data, caption_extension=".txt", train_batch_size=1,
                               max_train_steps=8, learning_rate=2e-4, output_name="model", **overrides)

    full = tmp_path / "full"
    run_script("fine_tune.py", ft(full))
    out = tmp_path / "killed"
    proc = start_script("fine_tune.py", ft(out, save_every_n_steps=2, save_state=True))
    wait_for(lambda: 4 in complete_states(out), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists()
    states = complete_states(out)
    resumed = tmp_path / "resumed"
    run_script("fine_tune.py", ft(resumed, resume=states[max(states)]))
    assert_same_weights(resumed / "model.safetensors", full / "model.safetensors")


def test_nan_loss_stops_without_saving_broken_weights(tmp_path, tiny_sd1_ckpt, lora_data):
    out = tmp_path / "nan"
    # A learning rate this large overflows the LoRA weights within a few steps.
    proc = run_script("train_network.py", lora_args(tiny_sd1_ckpt, out, lora_data, learning_rate=1e30,
                                                    optimizer_type="SGD", max_train_steps=30,
                                                    save_every_n_steps=1, network_dropout=None),
                      expect_ok=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "error: the loss became" in proc.stderr and "stopping without saving" in proc.stderr
    assert not (out / "lora.safetensors").exists()
    for saved in out.glob("lora-step*.safetensors"):  # what was saved before the NaN is finite
        assert all(torch.isfinite(t).all() for t in load_file(str(saved)).values()), saved


WRITER = """
import sys, torch
from library.io_utils import save_safetensors
path = sys.argv[1]
version = 0
while True:
    version += 1
    # ~24 MB per file: a save takes long enough to be killed in the middle of it
    save_safetensors({"w": torch.full((6_000_000,), float(version))}, path, metadata={"version": str(version)})
    print(version, flush=True)
"""


def test_kill_during_save_leaves_the_previous_file_intact(tmp_path):
    from safetensors import safe_open

    target = tmp_path / "lora.safetensors"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    killed_mid_save = 0
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=env, stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # one complete file exists
        assert first.strip().isdigit()
        time.sleep(0.013 * (attempt + 1))  # land somewhere inside a later save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with safe_open(str(target), "pt") as f:  # the file at the name is always a whole one
            version = float(f.metadata()["version"])
            w = f.get_tensor("w")
        assert w.shape == (6_000_000,) and bool((w == version).all())
        leftovers = list(tmp_path.glob(".lora.*.tmp.safetensors"))  # a kill inside a save leaves its temp file
        killed_mid_save += bool(leftovers)
        for leftover in leftovers:
            leftover.unlink()
    assert killed_mid_save  # the kills did land inside saves, so the check above means something
