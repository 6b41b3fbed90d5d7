"""The denoising loop shared by training previews and ``gen_img.py``, and an SD-style wrapper.

Contract
--------
:func:`sample_latents` runs any diffusers scheduler over a denoiser given as a plain function
``model_fn(latent_model_input, t, cond_batch) -> model output`` (whatever the scheduler's
``prediction_type`` says: eps or v). It knows nothing about model families: the conditioning is an
opaque tree (a tensor, a :class:`Conditioning`, or dicts/tuples of tensors) that it only
concatenates along the batch dimension for classifier-free guidance.

Reproducibility: the initial noise is drawn from ``generator`` on the generator's own device (use a
CPU generator) and then moved, so a seed gives the same image on any device. Latents are kept in
float32 between steps (schedulers accumulate across steps and some upcast internally anyway); only
the model input is cast to ``dtype``.

:class:`LatentDiffusionSampler` turns a :class:`~library.sampling.prompts.SamplePrompt` into a PIL
image for a U-Net + VAE model (SD 1.x/2.x; SDXL by returning extra U-Net kwargs from
``encode_prompts`` and, for size conditioning, overriding :meth:`LatentDiffusionSampler.encode`).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .prompts import SamplePrompt
from .schedulers import make_scheduler

logger = logging.getLogger(__name__)

__all__ = ["Conditioning", "LatentDiffusionSampler", "ModelFn", "concat_batch", "latents_to_images", "sample_latents"]

#: ``model_fn(latent_model_input, t, cond_batch) -> prediction`` (same shape as the latents).
ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass
class Conditioning:
    """What a U-Net is conditioned on: ``encoder_hidden_states`` plus any other U-Net kwargs.

    SD 1.x/2.x need only ``hidden_states`` [B, tokens, dim]. SDXL adds
    ``unet_kwargs={"added_cond_kwargs": {"text_embeds": pooled, "time_ids": size_ids}}``. Tensors
    anywhere inside ``unet_kwargs`` (nested dicts/tuples too) have the batch as dimension 0.
    """

    hidden_states: torch.Tensor
    unet_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.hidden_states.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        """Move every tensor to ``device``; floating-point tensors also to ``dtype`` when given."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

        return _map_tensors(move, self)

    def select(self, index: int) -> Conditioning:
        """The batch row ``index`` (kept as a batch of one)."""
        return _map_tensors(lambda t: t[index : index + 1], self)

    @classmethod
    def coerce(cls, value: torch.Tensor | Conditioning | tuple) -> Conditioning:
        """Accept what an ``encode_prompts`` function may return: a hidden-states tensor, a
        ``(hidden_states, unet_kwargs)`` tuple, or a ``Conditioning``."""
        if isinstance(value, Conditioning):
            return value
        if isinstance(value, torch.Tensor):
            return cls(value)
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Mapping):
            return cls(value[0], dict(value[1]))
        raise TypeError(
            "encode_prompts must return a Tensor (encoder_hidden_states), a (hidden_states, unet_kwargs) "
            f"tuple or a Conditioning, got {type(value).__name__}"
        )


def _map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], tree: Any) -> Any:
    """Apply ``fn`` to every tensor in a tree of Conditioning / dict / list / tuple."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, Conditioning):
        return Conditioning(fn(tree.hidden_states), _map_tensors(fn, tree.unet_kwargs))
    if isinstance(tree, Mapping):
        return {k: _map_tensors(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tensors(fn, v) for v in tree)
    return tree


def concat_batch(first: Any, second: Any) -> Any:
    """Concatenate two conditioning trees of the same structure along dimension 0.

    Non-tensor leaves must be equal (they are passed through once).
    """
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second.to(first.device)], dim=0)
    if isinstance(first, Conditioning):
        return Conditioning(concat_batch(first.hidden_states, second.hidden_states),
                            concat_batch(first.unet_kwargs, second.unet_kwargs))
    if isinstance(first, Mapping):
        if set(first) != set(second):
            raise ValueError(f"cannot batch conditionings with different keys: {sorted(first)} vs {sorted(second)}")
        return {k: concat_batch(first[k], second[k]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(concat_batch(a, b) for a, b in zip(first, second, strict=True))
    if first != second:
        raise ValueError(f"cannot batch conditionings with different non-tensor values: {first!r} vs {second!r}")
    return first


def _img2img_timesteps(scheduler: Any, steps: int, strength: float) -> torch.Tensor:
    """The tail of ``scheduler.timesteps`` an img2img run of ``strength`` goes through.

    Same convention as diffusers' img2img pipelines: skip the first ``steps - int(steps * strength)``
    steps (times the scheduler's order, because second-order schedulers list each timestep twice)
    and tell index-based schedulers where they start.
    """
    kept = min(int(steps * strength), steps)
    begin = (steps - kept) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]


def sample_latents(
    model_fn: ModelFn,
    scheduler: Any,
    *,
    shape: Sequence[int],
    steps: int,
    cond: Any,
    uncond: Any | None,
    guidance_scale: float,
    generator: torch.Generator,
    device: torch.device | str,
    dtype: torch.dtype,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Denoise from noise (or from ``init_latents``) and return float32 latents on ``device``.

    Classifier-free guidance: when ``guidance_scale != 1`` the model is called once per step on the
    batch ``[uncond, cond]`` and the prediction is ``uncond + scale * (cond - uncond)``; when it is 1
    only ``cond`` is run (``uncond`` may be ``None``). ``cond``/``uncond`` have batch size
    ``shape[0]``.

    img2img: with ``init_latents`` (model-space latents of ``shape``), noise is added at the first
    timestep kept for ``strength`` (1.0 = start from (almost) pure noise, 0 = return the input
    unchanged) and only the remaining steps run.

    ``on_step(index, total)`` is called before each model call (``total`` = the calls of this run;
    second-order schedulers list each timestep twice): what gen_img's ControlNet ratios follow.
    """
    device = torch.device(device)
    do_cfg = guidance_scale != 1.0
    if do_cfg and uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs an unconditional input (uncond), got None")
    cond_batch = concat_batch(uncond, cond) if do_cfg else cond

    scheduler.set_timesteps(steps, device=device)
    # Drawn on the generator's device (CPU for portability) before anything else consumes it.
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32).to(device)
    if init_latents is None:
        timesteps = scheduler.timesteps
        latents = noise * scheduler.init_noise_sigma
    else:
        if tuple(init_latents.shape) != tuple(shape):
            raise ValueError(f"init_latents has shape {tuple(init_latents.shape)}, expected {tuple(shape)}")
        timesteps = _img2img_timesteps(scheduler, steps, strength)
        latents = init_latents.to(device=device, dtype=torch.float32)
        if len(timesteps) == 0:
            return latents
        latents = scheduler.add_noise(latents, noise, timesteps[:1].repeat(shape[0]))

    step_params = inspect.signature(scheduler.step).parameters
    # Ancestral samplers draw fresh noise every step: from our generator, so runs are reproducible.
    step_kwargs = {"generator": generator} if "generator" in step_params else {}

    for index, t in enumerate(tqdm(timesteps, desc="sampling", leave=False, disable=not progress)):
        if on_step is not None:
            on_step(index, len(timesteps))
        model_input = torch.cat([latents, latents]) if do_cfg else latents
        model_input = scheduler.scale_model_input(model_input, t).to(dtype)
        prediction = model_fn(model_input, t, cond_batch).float()
        if do_cfg:
            pred_uncond, pred_cond = prediction.chunk(2)
            prediction = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        latents = scheduler.step(prediction, t, latents, **step_kwargs, return_dict=False)[0]
    return latents


def latents_to_images(vae: torch.nn.Module, latents: torch.Tensor, *, latent_scale: float,
                      latent_shift: float = 0.0) -> list[Image.Image]:
    """Decode model-space latents (``z * scale`` after ``- shift``) with ``vae`` into RGB images."""
    param = next(vae.parameters())
    z = latents.to(device=param.device, dtype=param.dtype) / latent_scale + latent_shift
    pixels = vae.decode(z).sample.float()
    pixels = (pixels / 2 + 0.5).clamp(0, 1)
    array = (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a[..., :3])) for a in array]


class LatentDiffusionSampler:
    """Prompt -> image for a U-Net denoiser in a VAE latent space (SD 1.x/2.x, SDXL).

    ``encode_prompts(texts) -> Tensor | (Tensor, unet_kwargs) | Conditioning`` encodes a list of
    prompts into the U-Net's conditioning (batch = len(texts)); extra U-Net kwargs are passed to
    ``unet(...)`` as they are. Families needing per-image conditioning beyond the text (SDXL size
    and crop ids) override :meth:`encode`. ``vae_scale_factor`` defaults to
    ``2 ** (len(vae.config.block_out_channels) - 1)`` (8 for SD).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        encode_prompts: Callable[[list[str]], torch.Tensor | tuple | Conditioning],
        *,
        latent_scale: float = 0.18215,
        latent_shift: float = 0.0,
        latent_channels: int = 4,
        vae_scale_factor: int | None = None,
    ) -> None:
        self.unet = unet
        self.vae = vae
        self.encode_prompts = encode_prompts
        self.latent_scale = latent_scale
        self.latent_shift = latent_shift
        self.latent_channels = latent_channels
        if vae_scale_factor is None:
            vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.vae_scale_factor = vae_scale_factor

    def encode(self, prompt: SamplePrompt, *, with_uncond: bool, device: torch.device,
               dtype: torch.dtype) -> tuple[Conditioning, Conditioning | None]:
        """(cond, uncond) for ``prompt``; uncond (the negative prompt) only when ``with_uncond``.

        Both texts go through the encoder in one batch. Override to add per-image conditioning.
        """
        texts = [prompt.negative_prompt, prompt.prompt] if with_uncond else [prompt.prompt]
        both = Conditioning.coerce(self.encode_prompts(texts)).to(device, dtype)
        if with_uncond:
            return both.select(1), both.select(0)
        return both, None

    def model_fn(self, latent_model_input: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One U-Net call (diffusers ``UNet2DConditionModel`` calling convention)."""
        return self.unet(latent_model_input, t, encoder_hidden_states=cond.hidden_states, **cond.unet_kwargs,
                         return_dict=False)[0]

    @torch.no_grad()
    def generate(
        self,
        prompt: SamplePrompt,
        *,
        sampler_name: str,
        v_parameterization: bool,
        generator: torch.Generator,
        device: torch.device | str,
        dtype: torch.dtype,
        zero_terminal_snr: bool = False,
        progress: bool = True,
    ) -> Image.Image:
        """Generate one image; ``prompt.sampler`` (if set) wins over ``sampler_name``.

        ``prompt.seed`` is NOT applied here: the caller seeds ``generator`` (so it decides what an
        absent seed means). The models' train/eval mode is left to the caller.
        """
        device = torch.device(device)
        if prompt.controlnet_image:
            logger.warning("%s: controlnet_image is not supported for this model; ignored", prompt.source or "prompt")
        scheduler = make_scheduler(prompt.sampler or sampler_name, v_parameterization=v_parameterization,
                                   zero_terminal_snr=zero_terminal_snr)
        with_uncond = prompt.scale != 1.0
        cond, uncond = self.encode(prompt, with_uncond=with_uncond, device=device, dtype=dtype)
        shape = (1, self.latent_channels, prompt.height // self.vae_scale_factor, prompt.width // self.vae_scale_factor)
        latents = sample_latents(
            self.model_fn, scheduler, shape=shape, steps=prompt.steps, cond=cond, uncond=uncond,
            guidance_scale=prompt.scale, generator=generator, device=device, dtype=dtype, progress=progress,
        )
        return latents_to_images(self.vae, latents, latent_scale=self.latent_scale, latent_shift=self.latent_shift)[0]
