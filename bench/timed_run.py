"""Run a script of the repository unchanged and record when each of its tqdm progress bars moved.

    BENCH_EVENTS=events.json python bench/timed_run.py train_network.py --flag ...

The script runs in this process exactly as ``python train_network.py --flag ...`` would (``runpy``,
``__name__ == "__main__"``). Before it starts, tqdm's ``__init__``, ``update`` and ``__iter__`` are
wrapped to append ``(time.monotonic(), n)`` -- ``n`` items done -- to a record per bar; at exit
(also through ``sys.exit``) the record is written to ``$BENCH_EVENTS`` as JSON:
``{"bars": [{"desc", "total", "initial", "created", "events": [[t, n], ...]}], "maxrss_kib", "started"}``.

This is how the benchmarks see step boundaries without a change to the training loop and without a
host sync: a clock read per bar update, stored in a list, written once at the end. (The hook the
loop could offer instead is described in bench/README.md.)
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import runpy
import sys
import time
from pathlib import Path

STARTED = time.monotonic()


def install_recorder(bars: list[dict]) -> None:
    """Wrap ``tqdm.std.tqdm`` (the base of ``tqdm.auto`` and ``tqdm.asyncio``) to record into ``bars``."""
    import tqdm.std

    cls = tqdm.std.tqdm
    original_init, original_update, original_iter = cls.__init__, cls.update, cls.__iter__

    def __init__(self, *args, **kwargs):
        created = time.monotonic()
        original_init(self, *args, **kwargs)
        desc = kwargs.get("desc", args[1] if len(args) > 1 else None)
        self._bench_record = {"desc": desc, "total": getattr(self, "total", None),
                              "initial": kwargs.get("initial", 0), "created": created, "events": []}
        bars.append(self._bench_record)

    def update(self, n=1):
        result = original_update(self, n)
        record = getattr(self, "_bench_record", None)
        if record is not None:
            record["events"].append((time.monotonic(), int(self.n)))
        return result

    def __iter__(self):
        record = getattr(self, "_bench_record", None)
        done = int(getattr(self, "n", 0) or 0)
        for item in original_iter(self):
            if record is not None:  # handing out item k means k items are done
                record["events"].append((time.monotonic(), done))
            yield item
            done += 1
        if record is not None:
            record["events"].append((time.monotonic(), done))

    cls.__init__, cls.update, cls.__iter__ = __init__, update, __iter__


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: BENCH_EVENTS=events.json python bench/timed_run.py SCRIPT [ARGS...]")
    script = Path(sys.argv[1]).resolve()
    out = os.environ.get("BENCH_EVENTS")
    bars: list[dict] = []
    pid = os.getpid()

    def write() -> None:
        if out and os.getpid() == pid:  # not from a forked DataLoader worker
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            Path(out).write_text(json.dumps({"bars": bars, "maxrss_kib": maxrss, "started": STARTED}))

    atexit.register(write)
    install_recorder(bars)
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path[0] = str(script.parent)
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
