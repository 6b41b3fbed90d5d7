"""What the benchmarks share: one child process per measurement, its peak RSS, the progress-bar
timestamps it records, the statistics taken from them, and the one-row report.

Measurements
------------
* Every measured run is a fresh child process (:func:`run_child`), so its peak RSS is its own: the
  parent waits for it with ``os.wait4``, whose ``ru_maxrss`` is the peak resident set of the child
  or of any of its waited-for children (DataLoader workers), whichever was largest. Nothing
  outside the standard library (no psutil).
* Scripts run unchanged through ``bench/timed_run.py``, which records a timestamp
  (``time.monotonic``, one clock for all processes of the machine) at every update of every tqdm
  bar: the trainer's ``steps`` bar, the latent cache's ``caching latents`` bar, ``gen_img.py``'s
  ``images`` bar. No host syncs are added: a timestamp is a clock read.
* Step statistics (:func:`rate_stats`): the first ``warmup`` items are excluded; the steady-state
  time per item is (t(last) - t(warmup)) / (last - warmup), the mean over the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
TIMED_RUN = REPO / "bench" / "timed_run.py"
DEFAULT_WORKDIR = REPO / "bench" / "work"
EVENTS_ENV = "BENCH_EVENTS"  # where timed_run.py writes its progress-bar events (JSON)


@dataclasses.dataclass
class ChildRun:
    """A finished child process: exit code, wall time from launch, peak RSS, its output and, when
    it ran under ``timed_run.py``, the progress-bar events it recorded."""

    argv: list[str]
    returncode: int
    launched: float  # time.monotonic() just before the launch
    wall_s: float
    peak_rss_bytes: int
    output: str
    events: dict[str, Any] | None = None

    def check(self) -> "ChildRun":
        if self.returncode != 0:
            tail = "\n".join(self.output.splitlines()[-25:])
            raise RuntimeError(f"{' '.join(self.argv[:3])} ... exited with {self.returncode}:\n{tail}")
        return self

    def bar(self, desc: str) -> dict[str, Any]:
        """The last progress bar named ``desc`` the child opened (its ``events`` are [(t, n), ...])."""
        bars = [b for b in (self.events or {}).get("bars", []) if b.get("desc") == desc]
        if not bars:
            seen = sorted({str(b.get("desc")) for b in (self.events or {}).get("bars", [])})
            raise RuntimeError(f"no '{desc}' progress bar recorded (bars seen: {', '.join(seen) or 'none'})")
        return bars[-1]


def child_env(threads: int | None) -> dict[str, str]:
    """The environment of a measured child: the repository importable, ``threads`` intra-op threads."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    if threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(threads)
    return env


def run_child(argv: Sequence[str], *, threads: int | None = None, timeout_s: float | None = None,
              timed: bool = False, env: dict[str, str] | None = None) -> ChildRun:
    """Run ``argv`` (``timed``: through ``timed_run.py``, recording its progress bars) in a new
    process from the repository root; return its :class:`ChildRun` (call ``.check()`` to require
    exit code 0). ``timeout_s``: the child is killed after that many seconds."""
    argv = [str(a) for a in argv]
    env = dict(env or child_env(threads))
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        events_path = Path(tmp) / "events.json"
        log_path = Path(tmp) / "output.log"
        if timed:
            argv = [sys.executable, str(TIMED_RUN), *argv]
            env[EVENTS_ENV] = str(events_path)
        with open(log_path, "wb") as log:
            launched = time.monotonic()
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            timer = threading.Timer(timeout_s, proc.kill) if timeout_s else None
            if timer:
                timer.start()
            try:
                # wait4 (not Popen.wait) hands back the child's resource usage, peak RSS included
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                if timer:
                    timer.cancel()
            wall = time.monotonic() - launched
            proc.returncode = os.waitstatus_to_exitcode(status)
        events = json.loads(events_path.read_text()) if events_path.is_file() else None
        output = log_path.read_text(encoding="utf-8", errors="replace")
    return ChildRun(argv=argv, returncode=proc.returncode, launched=launched, wall_s=wall,
                    peak_rss_bytes=usage.ru_maxrss * 1024, output=output, events=events)  # Linux: KiB


@dataclasses.dataclass(frozen=True)
class RateStats:
    """Timing of one progress bar: ``items`` done, seconds per item after ``warmup`` items (mean),
    and when the first item was done, counted from the bar's creation and from the process launch."""

    items: int
    warmup: int
    seconds_per_item: float
    first_item_after_bar_s: float
    first_item_after_launch_s: float | None

    @property
    def items_per_s(self) -> float:
        return 1.0 / self.seconds_per_item if self.seconds_per_item > 0 else float("inf")


def rate_stats(bar: dict[str, Any], *, warmup: int, launched: float | None = None) -> RateStats:
    """Statistics of a recorded bar (see the module docstring); ``launched``: the child's launch time."""
    events = [(float(t), int(n)) for t, n in bar["events"]]
    start_n = int(bar.get("initial") or 0)
    done = [(t, n) for t, n in events if n > start_n]
    if not done:
        raise RuntimeError(f"the '{bar.get('desc')}' bar recorded no finished item")
    last_t, last_n = done[-1]
    warmup = min(warmup, last_n - start_n - 1)
    if warmup < 1:
        raise RuntimeError(f"'{bar.get('desc')}': {last_n - start_n} item(s) are too few for a steady-state time; "
                           "run at least 2")
    # the first event at or past the warm-up count (a throttled bar may skip counts)
    warm_t, warm_n = next((t, n) for t, n in done if n >= start_n + warmup)
    if warm_n == last_n:
        raise RuntimeError(f"'{bar.get('desc')}': no item finished after the warm-up")
    first_t = done[0][0]
    return RateStats(items=last_n - start_n, warmup=warm_n - start_n,
                     seconds_per_item=(last_t - warm_t) / (last_n - warm_n),
                     first_item_after_bar_s=first_t - float(bar["created"]),
                     first_item_after_launch_s=None if launched is None else first_t - launched)


def machine_info(threads: int | None) -> dict[str, Any]:
    """Where a number was measured (without importing torch into the parent: only children measure)."""
    from importlib.metadata import version

    env_threads = os.environ.get("OMP_NUM_THREADS")
    return {"python": platform.python_version(), "torch": version("torch"), "machine": platform.machine(),
            "cores": os.cpu_count(), "threads": threads or (int(env_threads) if env_threads else None),
            "load_avg_1min": os.getloadavg()[0]}


def report(record: dict[str, Any], columns: Sequence[tuple[str, str]], results: str | os.PathLike | None) -> None:
    """Print ``record`` as one Markdown table row (header first) and append it to ``results`` (JSON lines)."""
    print("| " + " | ".join(title for title, _ in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    print("| " + " | ".join(_cell(record.get(key)) for _, key in columns) + " |")
    if results:
        append_json_line(Path(results), record)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def append_json_line(path: Path, record: dict[str, Any]) -> None:
    """Add ``record`` as one line to ``path``; the file is rewritten atomically, so a crash mid-write
    leaves the earlier results intact."""
    from library.io_utils import atomic_path

    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(old + json.dumps(record, sort_keys=True) + "\n", encoding="utf-8")


def mib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**20


def add_common_arguments(parser, *, steps: int | None, warmup: int | None) -> None:
    """Flags every bench script has."""
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny",
                        help="tiny: the bundled demo model; sd15: the full-size SD 1.5 architecture, random weights")
    parser.add_argument("--resolution", type=int, default=256, help="image size in pixels (square)")
    parser.add_argument("--steps", type=int, default=steps, help="timed items (training steps / images)")
    parser.add_argument("--warmup", type=int, default=warmup, help="first items left out of the steady-state mean")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP/MKL threads of the measured processes (default: the environment's)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="where the sd15 checkpoint, the datasets and outputs are kept (default bench/work)")
    parser.add_argument("--checkpoint_dtype", choices=["fp32", "fp16"], default="fp32",
                        help="dtype of the written sd15 checkpoint (the models run in fp32 either way)")
    parser.add_argument("--no_raw", action="store_true", help="skip the plain-PyTorch reference measurement")
    parser.add_argument("--timeout", type=float, default=None, help="kill a measured process after this many seconds")
    parser.add_argument("--results", type=Path, default=None, help="append the result as one JSON line to this file")
    parser.add_argument("--dry_run", action="store_true",
                        help="print what would run (sd15: build the models on meta and print parameter counts)")


def split_extra(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``own flags -- flags for the measured script``."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def raw_reference(mode: str, model: Path, args, *, items: int, extra: Sequence[str] = ()) -> dict[str, Any] | None:
    """Run bench/raw_step.py in a child; its ``BENCH_RAW`` result (None with ``--no_raw``)."""
    if args.no_raw:
        return None
    argv = [sys.executable, str(REPO / "bench" / "raw_step.py"), "--mode", mode, "--model", str(model),
            "--resolution", str(args.resolution), "--steps", str(items), "--warmup", str(args.warmup), *extra]
    run = run_child(argv, threads=args.threads, timeout_s=args.timeout).check()
    line = next((x for x in run.output.splitlines() if x.startswith("BENCH_RAW ")), None)
    if line is None:
        raise RuntimeError(f"bench/raw_step.py printed no BENCH_RAW line:\n{run.output[-2000:]}")
    result = json.loads(line[len("BENCH_RAW "):])
    result["child_peak_rss_bytes"] = run.peak_rss_bytes
    return result


def dry_run_model(args) -> None:
    """``--dry_run``: the sd15 build on meta (parameter counts, keys, the loader's read-back)."""
    if args.model == "sd15":
        from bench.models import sd15_dry_run

        print(json.dumps(sd15_dry_run(), indent=2))


def base_record(bench: str, args) -> dict[str, Any]:
    return {"bench": bench, "model": args.model, "resolution": args.resolution, "warmup": args.warmup,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **machine_info(args.threads)}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def image_rate_record(bench: str, args, run, stats: RateStats, raw: dict[str, Any] | None,
                      **fields: Any) -> dict[str, Any]:
    """The record of an images/s benchmark (caching, generation): the child's rate against the raw
    loop's, first image after launch, peak RSS; ``fields`` are the benchmark's own columns."""
    record = {**base_record(bench, args), "images": stats.items, **fields, "image_s": stats.seconds_per_item,
              "images_per_s": stats.items_per_s, "first_image_s": stats.first_item_after_launch_s,
              "wall_s": run.wall_s, "peak_rss_mib": mib(run.peak_rss_bytes),
              "raw_image_s": raw and raw["seconds_per_item"],
              "raw_images_per_s": raw and 1 / raw["seconds_per_item"], "extra_args": " ".join(args.extra)}
    record["overhead"] = ratio(record["image_s"], record["raw_image_s"])
    record["threads"] = record["threads"] or (raw and raw["threads"])
    return record
