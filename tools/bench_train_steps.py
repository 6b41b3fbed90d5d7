"""Time training steps of a trainer script on the tiny built-in models (CPU or GPU).

    python tools/bench_train_steps.py --script sdxl_train_network.py --steps 40 \
        -- --network_train_unet_only --cache_text_encoder_outputs

Runs the script twice on the same tiny model and dataset, once for 1 step and once for 1 + N
steps, and reports (T(1 + N) - T(1)) / N: the time of a training step without the loading,
caching and saving that both runs share. Extra arguments after ``--`` go to both runs. The numbers
compare flags on one machine; tiny models say little about full-size speed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_inputs(root: Path, script: str) -> tuple[Path, Path]:
    from library.demo.shapes import write_shapes_folder

    write_shapes_folder(root / "train" / "5_sks", 8, seed=1, trigger="sks")
    if script.startswith("sdxl"):
        from library.demo.tiny_sdxl import write_tiny_sdxl_checkpoint

        return write_tiny_sdxl_checkpoint(root / "model.safetensors"), root / "train"
    from library.demo.tiny_sd import write_tiny_sd_checkpoint

    return write_tiny_sd_checkpoint(root / "model.safetensors"), root / "train"


def run(script: str, model: Path, data: Path, out: Path, steps: int, extra: list[str]) -> float:
    argv = [sys.executable, str(REPO / script), "--pretrained_model_name_or_path", str(model), "--train_data_dir",
            str(data), "--caption_extension", ".txt", "--output_dir", str(out), "--output_name", "bench",
            "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "4", "--resolution", "64",
            "--bucket_reso_steps", "32", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--learning_rate", "1e-4", "--max_data_loader_n_workers", "0", "--seed", "1", "--cache_latents",
            "--console_log_simple", *extra]
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", default="train_network.py")
    parser.add_argument("--steps", type=int, default=40, help="timed steps (after one warm-up step)")
    args = parser.parse_args(own)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = build_inputs(root, args.script)
        base = run(args.script, model, data, root / "a", 1, extra)
        full = run(args.script, model, data, root / "b", 1 + args.steps, extra)
    per_step = (full - base) / args.steps
    print(f"{args.script} {' '.join(extra)}: {per_step * 1000:.1f} ms/step ({1 / per_step:.2f} steps/s) over "
          f"{args.steps} steps; run overhead {base:.1f} s")


if __name__ == "__main__":
    main()
