"""Peak memory and step time of FLUX.1 LoRA training steps with the memory options on and off.

    python tools/bench_flux_memory.py                       # CPU, a narrow FLUX (fast)
    python tools/bench_flux_memory.py --preset full --device cuda --resolution 512

Each configuration runs in its own process (peak memory is per process): a FLUX DiT with random
weights in the BFL layout (``--preset``: ``small`` = width 1024, 3 double + 6 single blocks;
``wide`` = the real width 3072, 3 double + 4 single blocks; ``full`` = FLUX.1-dev, 19 + 38), a
``networks.lora_flux`` LoRA (dim 16), AdamW, bf16 autocast, batch 1, T5 length 256, cached text
encoder outputs (random), and a few optimizer steps. Reported per configuration: peak memory
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS minus its RSS before the
model was built) and the mean step time after one warm-up step.

Options compared: bf16 weights (plain), ``--fp8_base`` (Linear weights in float8_e4m3fn),
``--gradient_checkpointing``, ``--cpu_offload_checkpointing`` and ``--blocks_to_swap``. On a CPU
the two offloading options cannot save anything (CPU is where they offload to); they are run to
show that they compute the same thing and what they cost.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {
    "small": dict(hidden_size=1024, num_heads=8, depth=3, depth_single_blocks=6),
    "wide": dict(hidden_size=3072, num_heads=24, depth=3, depth_single_blocks=4),
    "full": dict(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38),
}

CONFIGS = {
    "plain": [],
    "fp8_base": ["fp8"],
    "gradient_checkpointing": ["ckpt"],
    "fp8 + checkpointing": ["fp8", "ckpt"],
    "cpu_offload_checkpointing": ["ckpt", "offload_ckpt"],
    "blocks_to_swap": ["ckpt", "swap"],
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(preset: str, options: list[str], device_name: str, resolution: int, steps: int, swap: int) -> dict:
    import torch

    import networks.lora_flux as lora_flux
    from library.families.flux.model import Flux, FluxConfig, image_ids, text_ids
    from library.training.accelerator import store_in_fp8

    torch.manual_seed(0)
    device = torch.device(device_name)
    base_rss = _rss_mb()
    config = FluxConfig(**PRESETS[preset])
    # Built on meta and cast there, then allocated once in the final dtypes: the peak never holds an
    # fp32 or bf16 copy of weights that end up in fp8.
    with torch.device("meta"):
        flux = Flux(config)
    flux.to(torch.bfloat16).requires_grad_(False)
    if "fp8" in options:
        store_in_fp8(flux)
    flux.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in flux.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.bfloat16) * 0.02)
    weights_mb = sum(p.numel() * p.element_size() for p in flux.parameters()) / 2**20
    if "swap" in options:
        flux.enable_block_swap(swap, device)
        flux.move_to_device_except_swap_blocks(device)
    else:
        flux.to(device)
    if "ckpt" in options:
        flux.enable_gradient_checkpointing(cpu_offload="offload_ckpt" in options)
    flux.train()
    network = lora_flux.create_network(1.0, 16, 16, None, None, flux)
    network.apply_to(None, flux, False, True)
    network.to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    side = resolution // 16
    tokens = side * side
    img = torch.randn(1, tokens, 64, device=device)
    txt = torch.randn(1, 256, config.context_in_dim, device=device)
    y = torch.randn(1, config.vec_in_dim, device=device)
    ids = image_ids(1, side * 2, side * 2, device=device)
    tids = text_ids(1, 256, device=device)
    guidance = torch.full((1,), 1.0, device=device)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            out = flux(img, ids, txt, tids, torch.rand(1, device=device), y, guidance)
            loss = (out.float() - img).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    params = sum(p.numel() for p in flux.parameters())
    return {"peak_mb": round(peak, 1), "weights_mb": round(weights_mb, 1), "step_s": round(sum(times) / len(times), 3),
            "params_m": round(params / 1e6, 1), "tokens": tokens}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (multiple of 16)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--blocks_to_swap", type=int, default=None,
                        help="blocks swapped in the blocks_to_swap configuration (default: the most the preset allows)")
    parser.add_argument("--only", nargs="*", default=None, help="configurations to run (default: all)")
    parser.add_argument("--_child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from library.families.flux.model import FluxConfig, max_blocks_to_swap

    swap = args.blocks_to_swap or max_blocks_to_swap(FluxConfig(**PRESETS[args.preset]))
    if args._child is not None:
        print(json.dumps(run_one(args.preset, args._child, args.device, args.resolution, args.steps, swap)))
        return
    print(f"FLUX LoRA step, preset {args.preset}, {args.resolution}px, device {args.device}, blocks_to_swap {swap}")
    print(f"{'configuration':28s} {'peak MB':>10s} {'weights MB':>11s} {'step s':>8s}")
    for name, options in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, __file__, "--preset", args.preset, "--device", args.device, "--resolution",
               str(args.resolution), "--steps", str(args.steps), "--blocks_to_swap", str(swap), "--_child", *options]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
        if proc.returncode != 0:
            print(f"{name:28s} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name:28s} {result['peak_mb']:10.1f} {result['weights_mb']:11.1f} {result['step_s']:8.3f}   "
              f"({result['params_m']}M DiT params, "
              f"{result['tokens']} image tokens)")


if __name__ == "__main__":
    main()
