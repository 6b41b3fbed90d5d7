"""Running the entry scripts as users do: a subprocess with a kohya-style command line."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _script_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


class _Zygote:
    """The client of tests/zygote.py: one warm server per pytest worker, a fork per script run."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "zygote.py")], cwd=REPO, env=_script_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False)
        self.pending = b""

    def _reply(self, deadline: float | None) -> dict | None:
        while b"\n" not in self.pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.proc.stdout], [], [], wait)
            if not ready:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("the test zygote exited")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, script: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="run_script_") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"script": script, "args": args, "env": _script_env(), "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            pid = self._reply(None)["pid"]
            reply = self._reply(time.monotonic() + timeout)
            if reply is None:
                os.kill(pid, signal.SIGKILL)
                self._reply(None)
                raise subprocess.TimeoutExpired([script, *args], timeout, out.read_text(errors="replace"),
                                                err.read_text(errors="replace"))
            return subprocess.CompletedProcess([script, *args], reply["returncode"],
                                               out.read_text(errors="replace"), err.read_text(errors="replace"))


_zygote: _Zygote | None = None


def run_script(script: str, args: list[str], *, expect_ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python <script> <args>`` as a user would; ``SD_TRAINER_TESTS_NO_ZYGOTE=1`` starts a fresh
    interpreter each time instead of forking the warm one (same result, ~8 s more per run)."""
    global _zygote
    args = list(map(str, args))
    if os.environ.get("SD_TRAINER_TESTS_NO_ZYGOTE") == "1" or not hasattr(os, "fork"):
        proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=_script_env(),
                              capture_output=True, text=True, timeout=timeout)
    else:
        if _zygote is None or _zygote.proc.poll() is not None:
            _zygote = _Zygote()
        proc = _zygote.run(script, args, timeout)
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
