"""The quick start: train a LoRA end to end on a tiny model and dataset, on the CPU, in a minute or two.

    python tools/quickstart.py [--workdir demo_out] [--steps 120]

What it does, as a user would:
1. writes a tiny Stable Diffusion 1.x checkpoint (random weights, the real single-file layout);
2. writes a small DreamBooth-style dataset (``train/10_sks/`` images with captions) and a
   sample-prompt file;
3. runs ``train_network.py`` with a kohya-style command line (printed) and previews on the way;
4. measures how well the model denoises the training images without and with the LoRA.

Until the bundled demo model exists, the base model is random, so previews are noise; the
denoising loss is the honest measure that the LoRA learned its images.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="demo_out", help="where the model, data and results go")
    parser.add_argument("--steps", type=int, default=120, help="training steps")
    opts = parser.parse_args()

    from library.demo.shapes import write_shapes_folder
    from library.demo.tiny_sd import write_tiny_sd_checkpoint

    work = Path(opts.workdir).resolve()
    model = work / "tiny_sd1.safetensors"
    if not model.exists():
        write_tiny_sd_checkpoint(model, v2=False)
    images = write_shapes_folder(work / "train" / "10_sks", 6, seed=7, trigger="sks")
    prompts = work / "prompts.txt"
    prompts.write_text("sks, a red circle on a blue background --w 64 --h 64 --s 8 --d 1\n", encoding="utf-8")

    out = work / "output"
    command = [
        sys.executable, str(REPO / "train_network.py"),
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(work / "train"), "--caption_extension", ".txt", "--resolution", "64",
        "--output_dir", str(out), "--output_name", "sks_lora", "--save_model_as", "safetensors",
        "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "4",
        "--learning_rate", "3e-3", "--optimizer_type", "AdamW", "--lr_scheduler", "constant",
        "--train_batch_size", "2", "--max_train_steps", str(opts.steps), "--save_every_n_epochs", "4",
        "--cache_latents", "--max_data_loader_n_workers", "0", "--seed", "42",
        "--sample_prompts", str(prompts), "--sample_every_n_epochs", "4", "--sample_sampler", "euler_a",
        "--logging_dir", str(work / "logs"),
    ]
    print("$", " ".join(shlex.quote(c) for c in command), flush=True)
    started = time.time()
    subprocess.run(command, check=True, cwd=REPO)
    seconds = time.time() - started

    from library.demo.evaluate import denoising_loss, load_images

    pixels = load_images(images)
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8") for p in images]
    before = denoising_loss(model, None, pixels, captions)
    after = denoising_loss(model, out / "sks_lora.safetensors", pixels, captions)
    print()
    print(f"trained in {seconds:.0f} s")
    print(f"LoRA:            {out / 'sks_lora.safetensors'}")
    print(f"previews:        {out / 'sample'}")
    print(f"TensorBoard:     tensorboard --logdir {work / 'logs'}")
    print(f"denoising loss on the training images: {before:.4f} without the LoRA -> {after:.4f} with it")


if __name__ == "__main__":
    main()
