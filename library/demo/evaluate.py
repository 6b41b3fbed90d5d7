"""How well a model (+ LoRA) denoises given images: the measurable effect of training.

Used by the quick start to show that a LoRA learned its images, and by the tests to assert it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def load_images(paths: list[Path], size: int = 64) -> torch.Tensor:
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size)), dtype=np.float32) / 127.5 - 1 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@torch.no_grad()
def denoising_loss(model_path: Path, lora_path: Path | None, images: torch.Tensor, captions: list[str], *,
                   v2: bool = False, v_parameterization: bool = False, multiplier: float = 1.0,
                   timesteps=(100, 300, 500, 700, 900), seed: int = 0) -> float:
    """Mean denoising MSE of the base model (+ LoRA) on fixed images, noise and timesteps."""
    from library.families.ddpm import DDPMObjective
    from library.families.sd import text
    from library.families.sd.family import LATENT_SCALE
    from library.families.sd.loading import load_sd_models
    import networks.lora as lora

    sd = load_sd_models(str(model_path), v2=v2)
    if lora_path is not None:
        network, _ = lora.create_network_from_weights(multiplier, str(lora_path), sd.vae, sd.text_encoder, sd.unet)
        network.apply_to(sd.text_encoder, sd.unet, True, True)
        network.load_weights(str(lora_path))
        network.set_multiplier(multiplier)
    objective = DDPMObjective(v_parameterization)
    latents = sd.vae.encode(images).latent_dist.mean * LATENT_SCALE
    cond = text.encode(sd.text_encoder, text.tokenize(sd.tokenizer, captions, max_token_length=None),
                       clip_skip=None, max_token_length=None)
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator)
        ts = torch.full((latents.shape[0],), t, dtype=torch.long)
        noisy, target = objective.noisy_latents_and_target(latents, noise, ts)
        pred = sd.unet(noisy, ts, cond).sample
        total += torch.nn.functional.mse_loss(pred, target).item()
    return total / len(timesteps)


@torch.no_grad()
def family_denoising_loss(family, models, args, latents: torch.Tensor, conditioning, *, batch: dict | None = None,
                          timesteps=(100, 300, 500, 700, 900), seed: int = 0) -> float:
    """Mean squared error of ``family.predict`` against its target on fixed latents, noise and timesteps.

    Any family (FLUX, SD3, ...): the same call the validation loss makes, with noise drawn from a
    generator seeded by ``seed``, so runs before and after training compare exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator)
        steps = torch.full((latents.shape[0],), t, dtype=torch.long)
        prediction = family.predict(models, latents, conditioning, batch or {}, args, timesteps=steps, noise=noise)
        total += torch.nn.functional.mse_loss(prediction.pred.float(), prediction.target.float()).item()
    return total / len(timesteps)


def pixel_array(image: "Image.Image | Path", size: int = 64) -> np.ndarray:
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    return np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32)


def nearest_distance(image: "Image.Image | Path", references: list[np.ndarray]) -> float:
    """Mean absolute pixel difference (0-255) from ``image`` to the closest of ``references``."""
    a = pixel_array(image, references[0].shape[0])
    return min(float(np.abs(a - r).mean()) for r in references)


def image_change(before: "Image.Image | Path", after: "Image.Image | Path") -> float:
    """Mean absolute pixel difference (0-255) between two images of the same prompt and seed."""
    return float(np.abs(pixel_array(before) - pixel_array(after)).mean())
