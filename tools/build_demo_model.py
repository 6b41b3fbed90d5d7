"""Build the bundled demo model, ``models/shapes_demo_sd1.safetensors``, from nothing.

    python tools/build_demo_model.py [--workdir demo_build] [--steps 3000] [--seed 0]

Every step uses this repository's own tools, the way a user would:

1. ``tools/train_demo_vae.py`` trains the VAE on synthetic pictures (shapes, stars, stripes);
2. a captioned dataset of the shapes world is drawn (``library/demo/scenes.py: captioned_shape``,
   "a red circle on a blue background", no stars) and ``finetune/merge_captions_to_metadata.py``
   turns its captions into a metadata file;
3. an SD1 single file is written with that VAE and freshly initialised U-Net and text encoder
   (diffusers' and transformers' own initialisation);
4. ``fine_tune.py --train_text_encoder`` trains U-Net and text encoder on the dataset and saves
   the result in fp16;
5. the file is copied to ``models/`` and checked: at most 25 MB, and a few prompts are generated
   with their colour statistics printed.

The seed fixes every random choice, so a rebuild follows the same path (CPU kernels of another
torch build differ in the last bits, so the weights will not be bit-identical there). Stages whose outputs exist in
``--workdir`` are reused, so an interrupted build continues; delete the folder to start over.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("build_demo_model")
MAX_BYTES = 25 * 1000 * 1000


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="demo_build", help="intermediate files (reused when present)")
    parser.add_argument("--output", default=None, help="where the final file goes (default: models/shapes_demo_sd1.safetensors)")
    parser.add_argument("--images", type=int, default=3000, help="captioned training images")
    parser.add_argument("--vae_steps", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=2000, help="fine_tune.py steps")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=6e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per step (0: torch's default). Use 1 when other work shares the cores: "
                             "oversubscribed torch threads can make every step ten times slower")
    parser.add_argument("--console_log_level", default=None)
    parser.add_argument("--console_log_file", default=None)
    parser.add_argument("--console_log_simple", action="store_true")
    return parser


def run(command: list[str], threads: int = 0) -> None:
    print("$", " ".join(shlex.quote(c) for c in command), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    subprocess.run(command, check=True, cwd=REPO, env=env)


def write_dataset(folder: Path, count: int, seed: int) -> None:
    from library.demo.demo_model import DEMO_RESOLUTION
    from library.demo.scenes import captioned_shape

    if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        image, caption = captioned_shape(rng, DEMO_RESOLUTION)
        image.save(folder / f"shape{i:05d}.png")
        (folder / f"shape{i:05d}.caption").write_text(caption, encoding="utf-8")


def write_initial_checkpoint(path: Path, vae_dir: Path, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from library.demo.demo_model import demo_text_config, demo_unet_config
    from library.demo.tiny_sd import write_single_file
    from library.families.sd.checkpoint import (
        TextEncoderShape,
        UNetShape,
        VAEShape,
        clip_diffusers_to_ldm,
        unet_diffusers_to_ldm,
        vae_diffusers_to_ldm,
    )

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**demo_unet_config())
    text_encoder = CLIPTextModel(demo_text_config())
    vae = AutoencoderKL.from_pretrained(str(vae_dir))
    ldm = {
        **unet_diffusers_to_ldm(unet.state_dict(), UNetShape.from_diffusers_config(unet.config)),
        **vae_diffusers_to_ldm(vae.state_dict(), VAEShape.from_diffusers_config(vae.config)),
        **clip_diffusers_to_ldm(text_encoder.state_dict(),
                                TextEncoderShape.from_transformers_config(text_encoder.config, "clip_l")),
    }
    ldm = {k: v.detach().float().contiguous() for k, v in ldm.items()}
    write_single_file(path, ldm, "safetensors")


def fine_tune_command(opts: argparse.Namespace, work: Path, init: Path) -> list[str]:
    from library.demo.demo_model import DEMO_RESOLUTION

    return [
        sys.executable, str(REPO / "fine_tune.py"),
        "--pretrained_model_name_or_path", str(init),
        "--train_data_dir", str(work / "images"), "--in_json", str(work / "meta.json"),
        "--resolution", str(DEMO_RESOLUTION), "--caption_dropout_rate", "0.1",
        "--output_dir", str(work / "fine_tune"), "--output_name", "shapes_demo_sd1",
        "--save_model_as", "safetensors", "--save_precision", "fp16",
        "--train_text_encoder", "--learning_rate", str(opts.learning_rate),
        "--optimizer_type", "AdamW", "--lr_scheduler", "cosine", "--lr_warmup_steps", str(min(200, opts.steps // 10)),
        "--min_snr_gamma", "5", "--max_grad_norm", "1.0",
        "--train_batch_size", str(opts.batch_size), "--max_train_steps", str(opts.steps),
        "--cache_latents", "--max_data_loader_n_workers", "0", "--seed", str(opts.seed),
        "--save_state", "--save_every_n_steps", "500",
        "--logging_dir", str(work / "logs"), "--console_log_simple",
    ]


def main(argv: list[str] | None = None) -> None:
    opts = setup_parser().parse_args(argv)
    from library.log import setup_logging

    setup_logging(opts)
    from library.demo.demo_model import DEMO_MODEL

    work = Path(opts.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    output = Path(opts.output) if opts.output else DEMO_MODEL
    started = time.time()

    vae_dir = work / "vae"
    if not (vae_dir / "config.json").exists():
        run([sys.executable, str(REPO / "tools" / "train_demo_vae.py"), "--output_dir", str(vae_dir),
             "--steps", str(opts.vae_steps), "--seed", str(opts.seed), "--threads", str(opts.threads), "--console_log_simple"])
    write_dataset(work / "images", opts.images, opts.seed)
    if not (work / "meta.json").exists():
        run([sys.executable, str(REPO / "finetune" / "merge_captions_to_metadata.py"), str(work / "images"),
             str(work / "meta.json"), "--caption_extension", ".caption", "--console_log_simple"])
    init = work / "init_sd1.safetensors"
    if not init.exists():
        write_initial_checkpoint(init, vae_dir, opts.seed)

    trained = work / "fine_tune" / "shapes_demo_sd1.safetensors"
    if not trained.exists():
        command = fine_tune_command(opts, work, init)
        states = sorted((work / "fine_tune").glob("*-state"), key=lambda p: p.stat().st_mtime)
        if states:  # an interrupted build continues from its last saved state
            command += ["--resume", str(states[-1])]
        run(command, opts.threads)

    size = trained.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"error: {trained} is {size / 1e6:.1f} MB, over the 25 MB the demo model may take")
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(trained, output)
    logger.info("wrote %s (%.1f MB) in %.0f min", output, size / 1e6, (time.time() - started) / 60)

    from library.demo.colour_check import colour_report

    for line in colour_report(output):
        print(line)


if __name__ == "__main__":
    main()
