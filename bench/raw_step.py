"""The plain-PyTorch reference the framework's numbers are divided by (run as a child process).

    python bench/raw_step.py --mode train --model M.safetensors --resolution 256 --steps 20

Loads the same checkpoint with the project's loader (the same modules, SDPA attention, fp32, CPU),
then times a hand-written loop with no framework around it:

* ``train``: LoRA (``networks.lora.create_network`` + ``apply_to``, on U-Net and text encoder,
  base weights frozen) trained with ``torch.optim.AdamW``; a step is: text encoder forward on the
  token ids, DDPM noising of random latents at a random timestep, U-Net forward, MSE loss,
  backward, optimizer step, ``zero_grad(set_to_none=True)`` -- what a training step of
  ``train_network.py --cache_latents`` computes. The forward+backward part is timed too.
* ``sample``: ``gen_img.py``'s work per image: prompt and empty negative through the text encoder,
  ``--sample_steps`` DDIM steps of the U-Net on the CFG pair (batch 2), VAE decode.
* ``encode``: the latent cache's work per image: read a PNG of ``--images_dir`` (PIL), VAE encode
  of the ``[1, 3, H, W]`` image, one posterior sample.

Prints one line ``BENCH_RAW {json}`` with the steady-state seconds per item (mean after
``--warmup`` items, as bench/common.py's ``rate_stats``) and the peak RSS of this process.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # python bench/raw_step.py: the repository root on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

CAPTION = "sks, a red circle on a blue background"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["train", "sample", "encode"], default="train")
    p.add_argument("--model", required=True, help="SD1 single-file checkpoint")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="timed items (training steps, images)")
    p.add_argument("--warmup", type=int, default=2, help="items excluded from the mean")
    p.add_argument("--network_dim", type=int, default=8)
    p.add_argument("--network_alpha", type=float, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--sample_steps", type=int, default=20, help="sample mode: denoising steps per image")
    p.add_argument("--images_dir", default=None, help="encode mode: PNG images to read (default: random pixels)")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def steady(times: list[float], warmup: int) -> float:
    """Mean seconds per item after ``warmup`` items; ``times[0]`` is the start, ``times[k]`` when item k
    was done."""
    warmup = min(warmup, len(times) - 2)
    return (times[-1] - times[warmup]) / (len(times) - 1 - warmup)


def train(models, args) -> dict:
    import torch

    import networks.lora
    from library.families.sd import text

    unet, te = models.unet, models.text_encoder
    for module in (unet, te, models.vae):
        module.requires_grad_(False)
    network = networks.lora.create_network(1.0, args.network_dim, args.network_alpha, models.vae, te, unet)
    network.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    unet.train()
    te.train()
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    ids = text.tokenize(models.tokenizer, [CAPTION] * args.batch_size, None)[:, 0]  # [B, 77]
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    abar = torch.cumprod(1 - betas, 0).float()
    size = args.resolution // 8
    latents = torch.randn(args.batch_size, 4, size, size) * 0.18215 * 5  # a VAE sample times the SD1 scale

    marks, fwd_bwd = [time.monotonic()], []
    for _ in range(args.steps):
        start = time.monotonic()
        hidden = te(ids).last_hidden_state
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (args.batch_size,))
        a = abar[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = unet(noisy, t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        fwd_bwd.append(time.monotonic() - start)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.monotonic())
    warm = min(args.warmup, args.steps - 1)
    return {"seconds_per_item": steady(marks, args.warmup),
            "fwd_bwd_s": sum(fwd_bwd[warm:]) / len(fwd_bwd[warm:]), "final_loss": float(loss.detach()),
            "trained_params": sum(p.numel() for p in params)}


def sample(models, args) -> dict:
    import torch
    from diffusers import DDIMScheduler

    from library.families.sd import text

    unet, te, vae = models.unet.eval(), models.text_encoder.eval(), models.vae.eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ids = text.tokenize(models.tokenizer, [CAPTION, ""], None)[:, 0]
    size = args.resolution // 8
    marks = [time.monotonic()]
    with torch.no_grad():
        for _ in range(args.steps):
            context = te(ids).last_hidden_state
            scheduler.set_timesteps(args.sample_steps)
            x = torch.randn(1, 4, size, size)
            for t in scheduler.timesteps:
                cond, uncond = unet(torch.cat([x, x]), t, context).sample.chunk(2)
                x = scheduler.step(uncond + 7.5 * (cond - uncond), t, x).prev_sample
            image = vae.decode(x / 0.18215).sample
            marks.append(time.monotonic())
    return {"seconds_per_item": steady(marks, args.warmup), "image_shape": list(image.shape)}


def encode(models, args) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    vae = models.vae.eval()
    files = sorted(Path(args.images_dir).rglob("*.png")) if args.images_dir else []
    marks = [time.monotonic()]
    with torch.no_grad():
        for k in range(args.steps):
            if files:  # the same PNGs the caching run read, decoded here with PIL + numpy
                pixels = np.asarray(Image.open(files[k % len(files)]).convert("RGB"), dtype=np.float32)
                image = torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1
            else:
                image = torch.rand(1, 3, args.resolution, args.resolution) * 2 - 1
            latents = vae.encode(image).latent_dist.sample()
            marks.append(time.monotonic())
    return {"seconds_per_item": steady(marks, args.warmup), "latent_shape": list(latents.shape)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from library.families.sd.loading import load_sd_models

    torch.manual_seed(args.seed)
    models = load_sd_models(args.model, v2=False, keep_extras=False)
    result = {"train": train, "sample": sample, "encode": encode}[args.mode](models, args)
    result.update(mode=args.mode, items=args.steps, warmup=min(args.warmup, args.steps - 1),
                  threads=torch.get_num_threads(),
                  peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print("BENCH_RAW " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
