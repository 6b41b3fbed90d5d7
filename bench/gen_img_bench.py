"""Images/s of ``gen_img.py``, against a plain text-encoder + DDIM + VAE-decode loop.

    python bench/gen_img_bench.py --model tiny --steps 8 --sample_steps 20
    python bench/gen_img_bench.py --model sd15 --steps 4 --results bench/results.jsonl

Runs ``gen_img.py --prompt ... --images_per_prompt N --batch_size 1 --sampler ddim --steps S
--scale 7.5 --W/--H resolution`` in a child process (through bench/timed_run.py, which timestamps
the ``images`` bar), then bench/raw_step.py ``--mode sample`` times the same work on the same
models by hand (CFG pair through the U-Net, S DDIM steps, VAE decode). Printed: images/s
(steady state, after ``--warmup`` images), raw images/s, the time ratio, seconds from launch to the
first image, peak RSS.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # python bench/gen_img_bench.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (REPO, add_common_arguments, dry_run_model, image_rate_record, raw_reference,  # noqa: E402
                          rate_stats, report, run_child, split_extra)
from bench.models import prepare_model  # noqa: E402
from bench.raw_step import CAPTION  # noqa: E402

COLUMNS = [("model", "model"), ("px", "resolution"), ("images", "images"), ("steps", "sample_steps"),
           ("threads", "threads"), ("images/s", "images_per_s"), ("raw images/s", "raw_images_per_s"),
           ("overhead", "overhead"), ("first image s", "first_image_s"), ("peak RSS MiB", "peak_rss_mib")]


def parse_args(argv):
    import argparse

    own, extra = split_extra(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p, steps=8, warmup=1)
    p.add_argument("--sample_steps", type=int, default=20, help="denoising steps per image")
    args = p.parse_args(own)
    args.extra = extra
    if args.steps < 2:
        p.error("--steps (images) must be at least 2")
    return args


def gen_argv(model: Path, out: Path, args) -> list[str]:
    return [str(REPO / "gen_img.py"), "--ckpt", str(model), "--outdir", str(out), "--prompt", CAPTION,
            "--images_per_prompt", str(args.steps), "--batch_size", "1", "--sampler", "ddim",
            "--steps", str(args.sample_steps), "--scale", "7.5", "--W", str(args.resolution),
            "--H", str(args.resolution), "--seed", "1", *args.extra]


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        dry_run_model(args)
        print("would run: gen_img.py " + " ".join(gen_argv(Path("MODEL"), Path("OUT"), args)[1:]))
        return None
    model = prepare_model(args.model, args.workdir, dtype=args.checkpoint_dtype)
    out = args.workdir / f"out_gen_{args.model}"
    run = run_child(gen_argv(model, out, args), threads=args.threads, timeout_s=args.timeout, timed=True).check()
    stats = rate_stats(run.bar("images"), warmup=args.warmup, launched=run.launched)
    raw = raw_reference("sample", model, args, items=args.steps, extra=["--sample_steps", str(args.sample_steps)])
    record = image_rate_record("gen_img", args, run, stats, raw, sample_steps=args.sample_steps)
    report(record, COLUMNS, args.results)
    return record


if __name__ == "__main__":
    main()
