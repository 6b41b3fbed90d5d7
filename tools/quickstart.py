"""The quick start: teach the bundled demo model a new concept with a LoRA, on the CPU, in a minute or two.

    python tools/quickstart.py [--workdir demo_out] [--steps 200]

What it does, as a user would:
1. trains a LoRA with ``train_network.py --config_file examples/star/train_args.toml`` on
   the bundled demo model (``models/shapes_demo_sd1.safetensors``, which knows coloured circles,
   squares and triangles but has never seen a star) and the example dataset (eight yellow stars,
   captioned "a sks star on a <colour> background");
2. generates the prompts of ``examples/star/grid_prompts.txt`` with ``gen_img.py`` without
   and with the LoRA (same seeds) and puts them side by side in ``<workdir>/before_after.png``;
3. prints how far the trigger-prompt images are from the training images before and after, and how
   much the images of prompts without the trigger word changed.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EXAMPLE = REPO / "examples" / "star"
TRIGGER = "sks"
GEN_FLAGS = ["--W", "64", "--H", "64", "--steps", "20", "--scale", "5", "--sampler", "euler_a"]


def run(command: list[str]) -> None:
    print("$", " ".join(shlex.quote(str(c)) for c in command), flush=True)
    subprocess.run([str(c) for c in command], check=True, cwd=REPO)


def train_command(work: Path, steps: int, model: Path) -> list:
    return [sys.executable, REPO / "train_network.py", "--config_file", EXAMPLE / "train_args.toml",
            "--pretrained_model_name_or_path", model, "--output_dir", work / "output",
            "--logging_dir", work / "logs", "--max_train_steps", steps]


def generate(model: Path, outdir: Path, lora: Path | None) -> list[Path]:
    command = [sys.executable, REPO / "gen_img.py", "--ckpt", model, "--outdir", outdir,
               "--from_file", EXAMPLE / "grid_prompts.txt", "--sequential_file_name", *GEN_FLAGS]
    if lora is not None:
        command += ["--network_module", "networks.lora", "--network_weights", lora, "--network_mul", "1.0"]
    before = set(outdir.glob("im_*.png")) if outdir.is_dir() else set()
    run(command)
    return sorted(set(outdir.glob("im_*.png")) - before)


def prompts_of_grid() -> list[str]:
    lines = (EXAMPLE / "grid_prompts.txt").read_text(encoding="utf-8").splitlines()
    return [line.split(" --")[0].strip() for line in lines if line.strip() and not line.startswith("#")]


def write_grid(before: list[Path], after: list[Path], path: Path, scale: int = 2) -> None:
    """Two rows (without / with the LoRA), one column per prompt, images enlarged ``scale`` times."""
    from PIL import Image

    tiles = [[Image.open(p).convert("RGB") for p in row] for row in (before, after)]
    w, h = tiles[0][0].width * scale, tiles[0][0].height * scale
    grid = Image.new("RGB", (w * len(before) + 4 * (len(before) - 1), h * 2 + 4), (128, 128, 128))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            grid.paste(tile.resize((w, h), Image.NEAREST), (c * (w + 4), r * (h + 4)))
    tmp = path.with_name(path.stem + ".tmp.png")
    grid.save(tmp)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="demo_out", help="where the LoRA, images and logs go")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--model", default=None, help="base model (default: the bundled demo model)")
    opts = parser.parse_args(argv)

    from library.demo.demo_model import DEMO_MODEL
    from library.demo.evaluate import image_change, nearest_distance, pixel_array

    model = Path(opts.model).resolve() if opts.model else DEMO_MODEL
    if not model.is_file():
        raise SystemExit(f"error: the demo model {model} is missing (it comes with the repository): "
                         f"restore it with git checkout, or rebuild it with python tools/build_demo_model.py")
    work = Path(opts.workdir).resolve()
    started = time.time()
    run(train_command(work, opts.steps, model))
    trained = time.time() - started
    lora = work / "output" / "sks_star.safetensors"

    before = generate(model, work / "before", None)
    after = generate(model, work / "after", lora)
    grid = work / "before_after.png"
    write_grid(before, after, grid)

    references = [pixel_array(p) for p in sorted((EXAMPLE / "images").glob("*.png"))]
    result = {"trigger_before": [], "trigger_after": [], "trigger_change": [], "other_change": []}
    for prompt, b, a in zip(prompts_of_grid(), before, after):
        if TRIGGER in prompt.split():
            result["trigger_before"].append(nearest_distance(b, references))
            result["trigger_after"].append(nearest_distance(a, references))
            result["trigger_change"].append(image_change(b, a))
        else:
            result["other_change"].append(image_change(b, a))

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    print()
    print(f"trained in {trained:.0f} s, {time.time() - started:.0f} s in all")
    print(f"LoRA:        {lora}")
    print(f"grid:        {grid}  (top: without the LoRA, bottom: with it)")
    print(f"previews:    {work / 'output' / 'sample'}")
    print(f"TensorBoard: tensorboard --logdir {work / 'logs'}")
    print(f"'{TRIGGER} star' prompts, distance to the nearest training image (0-255 per pixel): "
          f"{mean(result['trigger_before']):.1f} without the LoRA -> {mean(result['trigger_after']):.1f} with it")
    print(f"the LoRA changed the '{TRIGGER} star' images by {mean(result['trigger_change']):.1f} per pixel, "
          f"the others by {mean(result['other_change']):.1f}")
    return result


if __name__ == "__main__":
    main()
