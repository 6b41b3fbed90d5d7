"""Steps/s, seconds to the first step and peak RSS of ``train_network.py``, against plain PyTorch.

    python bench/train_network_bench.py --model tiny --steps 60
    python bench/train_network_bench.py --model sd15 --steps 20 --results bench/results.jsonl
    python bench/train_network_bench.py --model sd15 --dry_run
    python bench/train_network_bench.py --model tiny -- --max_data_loader_n_workers 0   # extra trainer flags
    python bench/train_network_bench.py --model sd15 --disk_cache   # the latent cache already on disk
    python bench/train_network_bench.py --model sd15 --first_use    # latents cached as batches need them

Runs the user's command line in a child process (through bench/timed_run.py, which timestamps the
``steps`` progress bar): ``--network_module networks.lora --network_dim 8 --cache_latents
--optimizer_type AdamW --mixed_precision no --train_batch_size 1 --resolution 256`` on a generated
dataset (``--images`` pictures x 10 repeats), for ``--steps`` steps. Then bench/raw_step.py times
the same models, LoRA and optimizer in a hand-written loop (another child). Printed: one table row
-- steady-state seconds per step (mean after ``--warmup`` steps) and steps/s, the raw step, their
ratio (the framework's overhead; target <= 1.05), seconds from launch to the end of the first step
(target for sd15 < 30 s), peak RSS of the training process (target for sd15 < 6 GiB), and how much
of the start went into the VAE pass of latent caching (``caching s``).

``--disk_cache`` adds ``--cache_latents_to_disk`` and first writes the cache with
tools/cache_latents.py and the same flags (untimed), so the timed run finds every file valid and
encodes nothing: the start of a user's second run on the same folder (or of a resumed run).
Without it the latents are cached in memory by the timed run itself, as on a first run.
``--first_use`` adds ``--cache_latents_on_first_use``: the timed run encodes each image when a batch
first needs it, so the VAE time is inside the steps (``caching s`` is then 0): the first step comes
after one encode, and ``s/step`` includes the encodes of the steps timed.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # python bench/train_network_bench.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (REPO, add_common_arguments, base_record, dry_run_model, mib, raw_reference, rate_stats,  # noqa: E402
                          ratio, report, run_child, split_extra)
from bench.models import checkpoint_path, dataset_path, prepare_dataset, prepare_model  # noqa: E402

COLUMNS = [("model", "model"), ("px", "resolution"), ("steps", "steps"), ("threads", "threads"),
           ("s/step", "step_s"), ("steps/s", "steps_per_s"), ("raw s/step", "raw_step_s"),
           ("overhead", "overhead"), ("latent cache", "latent_cache"), ("caching s", "caching_s"),
           ("first step s", "first_step_s"), ("peak RSS MiB", "peak_rss_mib"), ("raw RSS MiB", "raw_peak_rss_mib")]
TARGETS = {"overhead": 1.05, "first_step_s": 30.0, "peak_rss_mib": 6 * 1024}


def parse_args(argv):
    import argparse

    own, extra = split_extra(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p, steps=None, warmup=None)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--network_dim", type=int, default=8)
    p.add_argument("--images", type=int, default=8, help="generated training images (10 repeats each)")
    p.add_argument("--disk_cache", action="store_true",
                   help="time a run whose latent cache is already on disk (--cache_latents_to_disk, written "
                        "beforehand by tools/cache_latents.py)")
    p.add_argument("--first_use", action="store_true",
                   help="cache latents on first use (--cache_latents_on_first_use): encodes inside the steps")
    args = p.parse_args(own)
    args.extra = extra
    # a tiny step takes ~0.1 s, an sd15 step on a CPU seconds: fewer steps, same warm-up share
    args.steps = args.steps or (60 if args.model == "tiny" else 20)
    args.warmup = args.warmup or (5 if args.model == "tiny" else 3)
    if args.steps < 2:
        p.error("--steps must be at least 2 (one warm-up step, one timed)")
    return args


def trainer_argv(model: Path, data: Path, out: Path, args) -> list[str]:
    return [str(REPO / "train_network.py"), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--caption_extension", ".txt", "--resolution", str(args.resolution),
            "--train_batch_size", str(args.batch_size), "--network_module", "networks.lora",
            "--network_dim", str(args.network_dim), "--network_alpha", str(args.network_dim), "--cache_latents",
            "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--mixed_precision", "no",
            "--max_train_steps", str(args.steps), "--output_dir", str(out), "--output_name", "bench_lora",
            "--save_model_as", "safetensors", "--seed", "1", "--console_log_simple",
            *(["--cache_latents_to_disk"] if args.disk_cache else []),
            *(["--cache_latents_on_first_use"] if args.first_use else []), *args.extra]


def latent_cache_mode(args) -> str:
    where = "disk" if args.disk_cache else "memory"
    return f"first use, {where}" if args.first_use else where


def caching_seconds(run) -> float:
    """Seconds the timed run spent in its 'caching latents' bar (0 when every latent came from disk)."""
    try:
        bar = run.bar("caching latents")
    except RuntimeError:  # no bar: nothing to encode
        return 0.0
    events = bar["events"]
    return float(events[-1][0]) - float(bar["created"]) if events else 0.0


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    workdir = args.workdir
    if args.dry_run:
        dry_run_model(args)
        argv = trainer_argv(checkpoint_path(args.model, workdir, dtype=args.checkpoint_dtype),
                            dataset_path(workdir, resolution=args.resolution, images=args.images),
                            workdir / f"out_train_{args.model}", args)
        print("would run: train_network.py " + " ".join(argv[1:]))
        return None
    model = prepare_model(args.model, workdir, dtype=args.checkpoint_dtype)
    data = prepare_dataset(workdir, resolution=args.resolution, images=args.images)
    out = workdir / f"out_train_{args.model}"
    argv = trainer_argv(model, data, out, args)
    for stale in data.rglob("*.npz"):  # a cache left by another run (other seed or flags) is not this run's
        stale.unlink()
    if args.disk_cache:
        run_child([sys.executable, str(REPO / "tools" / "cache_latents.py"), *argv[1:]], threads=args.threads,
                  timeout_s=args.timeout).check()
    run = run_child(argv, threads=args.threads, timeout_s=args.timeout, timed=True).check()
    stats = rate_stats(run.bar("steps"), warmup=args.warmup, launched=run.launched)
    raw = raw_reference("train", model, args, items=args.steps,
                        extra=["--batch_size", str(args.batch_size), "--network_dim", str(args.network_dim),
                               "--network_alpha", str(args.network_dim)])
    record = {**base_record("train_network", args), "batch_size": args.batch_size, "network_dim": args.network_dim,
              "steps": stats.items, "step_s": stats.seconds_per_item, "steps_per_s": stats.items_per_s,
              "first_step_s": stats.first_item_after_launch_s, "loop_first_step_s": stats.first_item_after_bar_s,
              # launch -> the loop's progress bar: imports, loading, latent caching, network set-up
              "loop_start_s": stats.first_item_after_launch_s - stats.first_item_after_bar_s,
              "latent_cache": latent_cache_mode(args),
              "caching_s": caching_seconds(run),
              "wall_s": run.wall_s, "peak_rss_mib": mib(run.peak_rss_bytes),
              "raw_step_s": raw and raw["seconds_per_item"], "raw_fwd_bwd_s": raw and raw["fwd_bwd_s"],
              "raw_peak_rss_mib": raw and mib(raw["child_peak_rss_bytes"]), "extra_args": " ".join(args.extra)}
    record["overhead"] = ratio(record["step_s"], record["raw_step_s"])
    record["threads"] = record["threads"] or (raw and raw["threads"])
    report(record, COLUMNS, args.results)
    checks = [f"{key} {record[key]:.3g} {'<=' if record[key] <= limit else '>'} {limit:g}"
              for key, limit in TARGETS.items() if record.get(key) is not None]
    print("targets: " + "; ".join(checks))
    return record


if __name__ == "__main__":
    main()
