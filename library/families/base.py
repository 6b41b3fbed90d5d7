"""What a model family must provide to the shared training loop.

The loop (:class:`library.training.trainer.NetworkTrainer`) never asks which family it runs: it
calls the methods below. A new family (SDXL, FLUX.1, SD3) is a subclass that implements them; a
family that differs only in a detail (SD2 vs SD1) overrides only that detail.
"""

from __future__ import annotations

import abc
import argparse
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class FamilyModels:
    """The models of one family as the loop sees them.

    ``denoiser`` is what the network is applied to as "unet" (a U-Net or a DiT);
    ``text_encoders``/``tokenizers`` are lists even for one encoder so networks and caching code
    can treat every family alike. ``extra`` holds family-private state (e.g. a noise schedule).
    """

    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prediction:
    """One training step's model output and what it is compared with."""

    pred: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    #: DDPM families: the whole cumulative-alpha table [T] on the device (the loss indexes it by
    #: ``timesteps`` for SNR weightings and the Huber schedule); None for other objectives.
    alphas_cumprod: torch.Tensor | None = None
    #: other objectives (flow matching): the per-sample cumulative alpha of the same signal-to-noise
    #: ratio [B], so the Huber ``snr`` schedule works for them too; None when not known.
    abar_t: torch.Tensor | None = None
    #: per-sample loss weights of the objective [B] (flow matching's ``--weighting_scheme``); None = 1
    weighting: torch.Tensor | None = None


class ModelFamily(abc.ABC):
    """A model family: loading, text and image encoding, the training objective, previews."""

    #: spatial stride between pixels and latents; bucket sides must be multiples of it
    latents_stride: int = 8
    #: file-name suffix of the disk latent cache (``<stem>_<W>x<H><suffix>.npz``)
    latent_cache_suffix: str = "_sd"
    #: default tracker name when ``--log_tracker_name`` is unset
    tracker_name: str = "network_train"
    #: file-name suffix of the disk text-encoder output cache (``<stem><suffix>``); None: the family
    #: cannot cache text-encoder outputs (``--cache_text_encoder_outputs`` is refused)
    text_encoder_cache_suffix: str | None = None
    #: ``--network_module`` when none is given
    default_network_module: str = "networks.lora"
    #: latent cache files name their keys with the latent size (``latents_<h>x<w>``; FLUX, SD3)
    latent_cache_suffixed_keys: bool = False
    #: bucket sides must be multiples of this (None: of the latent stride); FLUX packs 2x2 latents: 16
    bucket_reso_multiple: int | None = None
    #: the sampler names a preview prompt may ask for (``--ss``), checked when the prompt file is read;
    #: None: any name (a family with one fixed sampler ignores it)
    sampler_names: tuple[str, ...] | None = None

    # --- set-up --------------------------------------------------------------------------------
    def validate_args(self, args: argparse.Namespace) -> None:
        """Reject flag combinations this family cannot honour (raise ``ArgumentError``)."""

    @abc.abstractmethod
    def load_models(self, args: argparse.Namespace, device: torch.device, weight_dtype: torch.dtype) -> FamilyModels:
        """Load the frozen base models (on CPU or ``device``) in ``weight_dtype``."""

    @abc.abstractmethod
    def make_tokenize_fn(self, models: FamilyModels,
                         args: argparse.Namespace) -> Callable[[list[str]], torch.Tensor] | None:
        """A picklable function turning captions into token ids; it runs in DataLoader workers.
        None when :meth:`encode_text` tokenizes the captions itself (e.g. weighted captions)."""

    # --- per step ------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_images(self, models: FamilyModels, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> raw latents (what the latent cache stores)."""

    @abc.abstractmethod
    def encode_text(self, models: FamilyModels, batch: dict, args: argparse.Namespace) -> Any:
        """Token ids of a batch -> the denoiser's text conditioning."""

    @abc.abstractmethod
    def predict(self, models: FamilyModels, latents: torch.Tensor, conditioning: Any, batch: dict,
                args: argparse.Namespace, *, timesteps: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> Prediction:
        """Noise the (raw) latents, run the denoiser and return prediction and target.

        Training passes neither ``timesteps`` nor ``noise``: both are drawn from the global RNG
        (noise first, then timesteps). Validation passes both (Long [B] timesteps, noise shaped like
        the model-space latents) so the loss at fixed points is reproducible; given values are used
        as they are, with no RNG drawn for them.
        """

    # --- text-encoder output caching (families with ``text_encoder_cache_suffix``) --------------
    def text_encoder_outputs_to_cache(self, conditioning: Any) -> dict[str, torch.Tensor]:
        """Split a batch's :meth:`encode_text` result into named per-sample tensors ``[B, ...]``.

        The names are the keys of the disk cache file; values are stored as float32.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot cache text encoder outputs")

    def conditioning_from_cache(self, models: FamilyModels, cached: dict[str, torch.Tensor], args: argparse.Namespace,
                                device: torch.device, dtype: torch.dtype) -> Any:
        """The inverse of :meth:`text_encoder_outputs_to_cache`: batched cached tensors -> what
        :meth:`predict` takes as ``conditioning``, on ``device`` in ``dtype``."""
        raise NotImplementedError(f"{type(self).__name__} cannot cache text encoder outputs")

    def text_encoder_cache_settings(self, args: argparse.Namespace) -> dict[str, bool | float]:
        """Flags the cached text-encoder outputs depend on, stored in every cache file; a file made with
        other values is re-encoded (FLUX: ``apply_t5_attn_mask``). Default: none."""
        return {}

    # --- placing the models --------------------------------------------------------------------
    def place_denoiser(self, models: FamilyModels, args: argparse.Namespace, device: torch.device) -> None:
        """Move the (already cast) denoiser to ``device`` for training. Families with block swap
        (``--blocks_to_swap``) keep the swapped blocks on the CPU here."""
        models.denoiser.to(device)

    def fp8_text_encoders(self, models: FamilyModels,
                          args: argparse.Namespace) -> list[tuple[torch.nn.Module, Callable[[str], bool] | None]]:
        """Text encoders whose weights ``--fp8_base`` (not ``--fp8_base_unet``) also stores in float8,
        each with the ``skip(module_path)`` of ``store_in_fp8`` (default: none)."""
        return []

    def enable_gradient_checkpointing(self, models: FamilyModels, args: argparse.Namespace, train_te: bool) -> None:
        """``--gradient_checkpointing``: the denoiser's blocks (and the text encoders' when trained)."""
        models.denoiser.enable_gradient_checkpointing()
        if train_te:
            for te in models.text_encoders:
                te.gradient_checkpointing_enable()

    # --- full checkpoints (fine-tuning; families that support it) ------------------------------
    def checkpoint_state_dict(self, models) -> dict[str, torch.Tensor]:
        """The models' current weights as one single file in the family's original layout."""
        raise NotImplementedError(f"{type(self).__name__} cannot save a full checkpoint yet")

    def checkpoint_prefixes(self) -> dict[str, tuple[str, ...]]:
        """Key prefixes of the parts of a single file: ``{"denoiser": ..., "text_encoders": ..., "vae": ...}``."""
        raise NotImplementedError(f"{type(self).__name__} cannot save a full checkpoint yet")

    def save_diffusers(self, models, folder, *, dtype: torch.dtype | None, safe_serialization: bool) -> None:
        """Write the models as a Diffusers pipeline folder."""
        raise NotImplementedError(f"{type(self).__name__} cannot save a Diffusers folder yet")

    def text_encoder_learning_rates(self, args: argparse.Namespace) -> list[float]:
        """One learning rate per text encoder for fine-tuning (``--learning_rate_te``, default ``--learning_rate``)."""
        lr = getattr(args, "learning_rate_te", None)
        return [args.learning_rate if lr is None else lr]

    def denoiser_parameter_blocks(self, models) -> dict[int, list[torch.nn.Parameter]]:
        """The denoiser's parameters by block, for ``--block_lr``."""
        raise NotImplementedError(f"{type(self).__name__} has no --block_lr blocks")

    # --- output --------------------------------------------------------------------------------
    @abc.abstractmethod
    def metadata(self, args: argparse.Namespace) -> dict[str, str]:
        """Family part of the ``ss_*``/``modelspec.*`` metadata of a saved network."""

    @abc.abstractmethod
    def modelspec(self, args: argparse.Namespace, timestamp: float) -> dict[str, str]:
        """``modelspec.*`` metadata of a saved network (architecture, resolution, ...)."""

    def sample_defaults(self, args: argparse.Namespace):
        """Defaults of a preview prompt that gives none (size, steps, scale, sampler)."""
        from library.sampling.prompts import PromptDefaults

        return PromptDefaults(width=512, height=512, steps=30, scale=7.5, sampler=args.sample_sampler)

    def sample_image(self, models: FamilyModels, prompt, generator: torch.Generator, args: argparse.Namespace,
                     device: torch.device, dtype: torch.dtype):
        """Generate one preview image for a :class:`~library.sampling.prompts.SamplePrompt`."""
        raise NotImplementedError(f"{type(self).__name__} cannot generate sample images yet")

    # --- which parts the network sees ----------------------------------------------------------
    def network_text_encoders(self, models: FamilyModels):
        """What ``create_network(..., text_encoder=...)`` receives (a model or a list)."""
        return models.text_encoders[0] if len(models.text_encoders) == 1 else models.text_encoders
