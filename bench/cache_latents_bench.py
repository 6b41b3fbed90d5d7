"""Images/s of latent caching (``tools/cache_latents.py``), against a plain VAE encode loop.

    python bench/cache_latents_bench.py --model tiny --steps 32
    python bench/cache_latents_bench.py --model sd15 --steps 16 --results bench/results.jsonl

Writes ``--steps`` generated images at ``--resolution`` into a fresh folder of the work dir (old
``.npz`` caches removed, so every image is encoded), runs ``tools/cache_latents.py`` on it in a
child process (through bench/timed_run.py, which timestamps the ``caching latents`` bar; one VAE
batch per bar item), then bench/raw_step.py ``--mode encode`` times reading the same PNGs and
``vae.encode`` on the same VAE by hand.
Printed: images/s (steady state, after ``--warmup`` images), raw images/s, the time ratio, seconds
from launch to the first cached image, peak RSS.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # python bench/cache_latents_bench.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (REPO, add_common_arguments, dry_run_model, image_rate_record, raw_reference,  # noqa: E402
                          rate_stats, report, run_child, split_extra)
from bench.models import prepare_dataset, prepare_model  # noqa: E402

COLUMNS = [("model", "model"), ("px", "resolution"), ("images", "images"), ("threads", "threads"),
           ("images/s", "images_per_s"), ("raw images/s", "raw_images_per_s"), ("overhead", "overhead"),
           ("first image s", "first_image_s"), ("peak RSS MiB", "peak_rss_mib")]


def parse_args(argv):
    import argparse

    own, extra = split_extra(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p, steps=32, warmup=2)
    args = p.parse_args(own)
    args.extra = extra
    if args.steps < 2:
        p.error("--steps (images) must be at least 2")
    return args


def caching_argv(model: Path, data: Path, args) -> list[str]:
    return [str(REPO / "tools" / "cache_latents.py"), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--caption_extension", ".txt", "--resolution", str(args.resolution),
            "--mixed_precision", "no", "--vae_batch_size", "1", "--seed", "1", "--console_log_simple", *args.extra]


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        dry_run_model(args)
        print("would run: tools/cache_latents.py " + " ".join(caching_argv(Path("MODEL"), Path("DATA"), args)[1:]))
        return None
    model = prepare_model(args.model, args.workdir, dtype=args.checkpoint_dtype)
    data = prepare_dataset(args.workdir, resolution=args.resolution, images=args.steps, name="cache")
    for stale in data.rglob("*.npz"):
        stale.unlink()
    run = run_child(caching_argv(model, data, args), threads=args.threads, timeout_s=args.timeout, timed=True).check()
    stats = rate_stats(run.bar("caching latents"), warmup=args.warmup, launched=run.launched)
    raw = raw_reference("encode", model, args, items=args.steps, extra=["--images_dir", str(data)])
    record = image_rate_record("cache_latents", args, run, stats, raw)
    report(record, COLUMNS, args.results)
    return record


if __name__ == "__main__":
    main()
