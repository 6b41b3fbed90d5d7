"""Train the demo model's VAE (step 1 of ``tools/build_demo_model.py``).

    python tools/train_demo_vae.py --output_dir work/vae [--steps 1500] [--seed 0]

An SD1-structured ``AutoencoderKL`` (see ``library/demo/demo_model.py``) learns to reconstruct
synthetic pictures (``library/demo/scenes.py: random_picture``: polygons, ellipses, stars and
stripes in any colour) with an L1 + MSE loss and a small KL term, on random crops (a quarter of
the pixels per picture for the same weights, since every layer is a convolution or, at the
latent size, attention). Afterwards its latent space is
rescaled exactly so that latents times SD1's factor 0.18215 have unit standard deviation, the
scale every SD1 trainer and sampler assumes. The result is a Diffusers VAE folder.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("train_demo_vae")
SD1_LATENT_SCALE = 0.18215


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True, help="Diffusers VAE folder to write")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--crop", type=int, default=32, help="train on random crops of this side (the VAE is convolutional)")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--kl_weight", type=float, default=1e-6)
    parser.add_argument("--pool", type=int, default=6000, help="synthetic pictures drawn once and reused")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--console_log_level", default=None)
    parser.add_argument("--console_log_file", default=None)
    parser.add_argument("--console_log_simple", action="store_true")
    return parser


def picture_pool(count: int, seed: int, size: int):
    import numpy as np
    import torch

    from library.demo.scenes import random_picture

    rng = random.Random(seed)
    pictures = np.stack([np.asarray(random_picture(rng, size)) for _ in range(count)])
    return torch.from_numpy(pictures).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW


def to_model_range(batch):
    return batch.float() / 127.5 - 1.0


def rescale_latents_(vae, scale: float) -> None:
    """Multiply the latent space by ``scale`` without changing what the VAE reconstructs: the
    encoder's mean rows and log-variance bias change, the decoder's first conv undoes it."""
    import torch

    with torch.no_grad():
        latent = vae.config.latent_channels
        vae.quant_conv.weight[:latent] *= scale
        vae.quant_conv.bias[:latent] *= scale
        vae.quant_conv.bias[latent:] += 2 * math.log(scale)
        vae.post_quant_conv.weight /= scale


def train(opts: argparse.Namespace) -> Path:
    import torch
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    from library.demo.demo_model import DEMO_RESOLUTION, demo_vae_config

    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    vae = AutoencoderKL(**demo_vae_config())
    with torch.no_grad():  # start with a narrow posterior: unit noise would drown the small initial means
        vae.quant_conv.bias[vae.config.latent_channels:] = -8.0
    pool = picture_pool(opts.pool, opts.seed, DEMO_RESOLUTION)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=opts.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=opts.learning_rate, total_steps=opts.steps,
                                                   pct_start=0.05)
    generator = torch.Generator().manual_seed(opts.seed)
    vae.train()
    running = None
    with tqdm(total=opts.steps, desc="vae steps", unit="step") as bar:
        for step in range(opts.steps):
            index = torch.randint(0, len(pool), (opts.batch_size,), generator=generator)
            top, left = (int(v) for v in torch.randint(0, DEMO_RESOLUTION - opts.crop + 1, (2,), generator=generator))
            images = to_model_range(pool[index, :, top:top + opts.crop, left:left + opts.crop])
            flip = torch.rand(opts.batch_size, generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            posterior = vae.encode(images).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            recon = vae.decode(latents).sample
            loss = (recon - images).abs().mean() + (recon - images).pow(2).mean()
            loss = loss + opts.kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 25 == 0 or step == opts.steps - 1:
                value = loss.item()  # a host sync every 25 steps only
                running = value if running is None else 0.8 * running + 0.2 * value
                bar.set_postfix(loss=f"{running:.4f}")
            bar.update(1)

    vae.eval()
    with torch.no_grad():
        check = to_model_range(picture_pool(256, opts.seed + 1, DEMO_RESOLUTION))
        means = torch.cat([vae.encode(part).latent_dist.mean for part in check.split(64)])
        scale = 1.0 / (SD1_LATENT_SCALE * means.std().item())
        rescale_latents_(vae, scale)
        recon = torch.cat([vae.decode(vae.encode(part).latent_dist.mean).sample for part in check.split(64)])
        error = (recon.clamp(-1, 1) - check).abs().mean().item() * 127.5
        scaled_std = (torch.cat([vae.encode(part).latent_dist.mean for part in check.split(64)])
                      * SD1_LATENT_SCALE).std().item()
    logger.info("held-out reconstruction error %.2f / 255 per channel; latent std x 0.18215 = %.3f",
                error, scaled_std)
    out = Path(opts.output_dir)
    vae.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    opts = setup_parser().parse_args(argv)
    from library.log import setup_logging

    setup_logging(opts)
    out = train(opts)
    logger.info("wrote %s", out)


if __name__ == "__main__":
    main()
