"""Running the entry scripts as users do: a subprocess with a kohya-style command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_script(script: str, args: list[str], *, expect_ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def base_train_args(model: Path, out: Path, **overrides) -> list[str]:
    """A kohya-style command line for a quick CPU run on a tiny model."""
    values = {
        "pretrained_model_name_or_path": model, "output_dir": out, "output_name": "lora",
        "network_module": "networks.lora", "network_dim": 4, "network_alpha": 2, "learning_rate": 1e-3,
        "optimizer_type": "AdamW", "resolution": 64, "train_batch_size": 2, "max_train_steps": 6,
        "max_data_loader_n_workers": 0, "seed": 42, "save_model_as": "safetensors", "console_log_simple": True,
    }
    values.update(overrides)
    argv: list[str] = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        argv.append(f"--{key}")
        if value is not True:
            argv.extend(value if isinstance(value, list) else [str(value)])
    return argv




def read_metadata(path) -> dict[str, str]:
    """The safetensors metadata of a saved file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def tensorboard_events(logs: Path):
    """The one TensorBoard event file under ``logs``, loaded (``.Scalars(tag)``, ``.Tags()``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(next(Path(logs).rglob("events.out.tfevents.*"))))
    accumulator.Reload()
    return accumulator
