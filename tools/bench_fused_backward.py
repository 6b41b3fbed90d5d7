"""Peak memory and step time of plain optimizer steps vs --fused_backward_pass vs --fused_optimizer_groups.

    python tools/bench_fused_backward.py --params 200 --steps 4
    python tools/bench_fused_backward.py --params 200 --optimizer adamw --modes plain groups4

Builds a stack of ``Linear(width, width) + GELU`` layers with about ``--params`` million parameters
(fp32) and trains it for a few steps on random data, each mode in its own process so that one
mode's allocations cannot hide another's. Reported per mode:

- peak memory above the memory held once the model is built (weights excluded; gradients,
  optimizer state, activations and temporaries included): ``torch.cuda.max_memory_allocated``
  on CUDA, peak RSS (``ru_maxrss``) on CPU, where the workers run with glibc's
  ``MALLOC_MMAP_THRESHOLD_`` fixed at ``--mmap_threshold`` (1 MiB) so that a freed gradient leaves
  RSS (with glibc's default, freed blocks stay in a heap that small live blocks keep from
  shrinking, and RSS then mostly measures that fragmentation);
- the mean step time without the first step (warm-up, optimizer state allocation); on CPU from a
  second run with glibc's default malloc (the fixed threshold costs page faults at every step);
- the loss after the last step: equal across modes for Adafactor and AdamW, since fusing the step
  into backward does not change the arithmetic (a sanity check at full size).

Modes: ``plain`` (backward, step, zero_grad), ``fused`` (``FusedBackward`` mode ``fused_backward``),
``groupsN`` (mode ``groups`` with N groups, e.g. ``groups4``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(opts) -> dict:
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    from library.training.fused_backward import FusedBackward

    device = torch.device(opts.device)
    torch.manual_seed(0)
    depth = max(1, round(opts.params * 1e6 / (opts.width * opts.width + opts.width)))
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(opts.width, opts.width), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers).to(device)
    n_params = sum(p.numel() for p in model.parameters())

    from transformers.optimization import Adafactor  # imported before the baseline: not counted as training memory

    def factory(groups):
        if opts.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=1e-4)
        return Adafactor(groups, lr=1e-4, relative_step=False, scale_parameter=False, warmup_init=False)

    # Warm-up on a throw-away layer: the first matmul, backward and optimizer step load kernels and
    # code pages (hundreds of MiB of RSS on CPU) that would otherwise count as training memory.
    scratch = torch.nn.Sequential(torch.nn.Linear(opts.width, opts.width), torch.nn.GELU()).to(device)
    scratch_opt = factory([{"params": list(scratch.parameters())}])
    scratch(torch.randn(opts.batch, opts.width, device=device)).pow(2).mean().backward()
    scratch_opt.step()
    del scratch, scratch_opt
    gc.collect()

    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(opts.batch, opts.width, generator=gen).to(device) for _ in range(opts.steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()

    fused = optimizer = None
    if opts.mode == "plain":
        optimizer = factory([{"params": list(model.parameters())}])
    elif opts.mode == "fused":
        fused = FusedBackward.create(model.parameters(), factory, mode="fused_backward")
    elif opts.mode.startswith("groups"):
        fused = FusedBackward.create(model.parameters(), factory, mode="groups", num_groups=int(opts.mode[6:]))
    else:
        raise SystemExit(f"unknown mode {opts.mode}")

    times, loss = [], None
    for x in data:
        t0 = time.perf_counter()
        loss = model(x).pow(2).mean()
        loss.backward()
        if fused is not None:
            fused.finish_step()
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss_bytes() - base
    step = sum(times[1:]) / max(1, len(times) - 1)
    return {"mode": opts.mode, "params": n_params, "depth": depth, "peak_bytes": peak, "step_s": step,
            "loss": float(loss), "device": str(device)}


def _run_worker(common: list[str], mode: str, mmap_threshold: int) -> dict:
    env = dict(os.environ)
    if mmap_threshold:
        # glibc otherwise serves freed large blocks from a heap it cannot shrink past live small
        # blocks, so peak RSS would measure fragmentation rather than the tensors alive.
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    out = subprocess.run([sys.executable, __file__, *common, "--worker", mode], capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"mode {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=200, help="model size in millions of parameters")
    parser.add_argument("--width", type=int, default=2048, help="width of each Linear layer")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="steps per mode (the first is not timed)")
    parser.add_argument("--optimizer", choices=["adafactor", "adamw"], default="adafactor")
    parser.add_argument("--modes", nargs="+", default=["plain", "fused", "groups4"])
    parser.add_argument("--device", default=None, help="cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--mmap_threshold", type=int, default=1 << 20,
                        help="CPU: glibc MALLOC_MMAP_THRESHOLD_ of the memory runs, so that blocks at least this "
                             "large go back to the system when freed (0: one run per mode, malloc as it is)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.device is None:
        import torch

        opts.device = "cuda" if torch.cuda.is_available() else "cpu"

    if opts.worker:
        opts.mode = opts.worker
        print("RESULT " + json.dumps(worker(opts)), flush=True)
        return

    common = ["--params", str(opts.params), "--width", str(opts.width), "--batch", str(opts.batch), "--steps",
              str(opts.steps), "--optimizer", opts.optimizer, "--device", opts.device, "--threads", str(opts.threads)]
    rows = []
    for mode in opts.modes:
        row = _run_worker(common, mode, opts.mmap_threshold if not opts.device.startswith("cuda") else 0)
        if opts.mmap_threshold and not opts.device.startswith("cuda"):
            row["step_s"] = _run_worker(common, mode, 0)["step_s"]  # timed with the usual malloc
        rows.append(row)
    first = rows[0]
    print(f"{first['params'] / 1e6:.1f}M parameters ({first['depth']} x Linear({opts.width})), {opts.optimizer}, "
          f"batch {opts.batch}, {opts.steps} steps, {first['device']}; fp32 gradients of all weights = "
          f"{first['params'] * 4 / 2**20:.0f} MiB")
    kind = "max_memory_allocated" if first["device"].startswith("cuda") else "peak RSS"
    print(f"{'mode':<10} {'peak above weights (' + kind + ')':>36} {'step time':>11} {'final loss':>14}")
    for r in rows:
        print(f"{r['mode']:<10} {r['peak_bytes'] / 2**20:>32.0f} MiB {r['step_s']:>9.2f} s {r['loss']:>14.8g}")


if __name__ == "__main__":
    main()
