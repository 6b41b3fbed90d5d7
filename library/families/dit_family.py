"""What the rectified-flow DiT families (FLUX.1, SD3, Lumina-Image 2.0) share as model families of the training loop.

:class:`DiTFamily` holds the parts that are the same to the letter: the flag checks (another family's
network module, DDPM-only flags, weighted captions, ignored SD text flags, the token length),
the checks of the memory options (``--blocks_to_swap``, ``--cpu_offload_checkpointing``,
``--fp8_base_unet``) and of ``train_t5xxl`` against text-encoder output caching, placing a denoiser
with swapped blocks, keeping T5's ``wo`` out of fp8, gradient checkpointing with CPU offload, and the
LoRA modelspec. A subclass fills in the hooks (names in messages, the flow configuration, where T5
is, the modelspec architecture); the loop never asks which family it runs.
"""

from __future__ import annotations

import argparse
import logging

import torch

from library.args import ArgumentError
from library.families.base import FamilyModels, ModelFamily
from library.families.sd.family import parse_resolution

logger = logging.getLogger(__name__)

#: DDPM-only flags: flow matching has no alphas_cumprod table to weight or perturb with
DDPM_ONLY_FLAGS = ("min_snr_gamma", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss",
                   "debiased_estimation_loss", "noise_offset", "multires_noise_iterations", "zero_terminal_snr",
                   "v_parameterization", "v2")

#: every family's LoRA module: giving one to another family's trainer is refused with the right name
NETWORK_MODULES = ("networks.lora", "networks.dylora", "networks.oft", "networks.lora_flux", "networks.lora_sd3",
                   "networks.lora_lumina")


def network_arg_true(args: argparse.Namespace, key: str) -> bool:
    """Whether ``--network_args`` sets ``key`` to true (``true``, ``1`` or ``yes``, any case)."""
    for item in getattr(args, "network_args", None) or []:
        name, _, value = item.partition("=")
        if name.strip() == key and value.strip().lower() in ("true", "1", "yes"):
            return True
    return False


def _is_t5_wo(path: str) -> bool:
    # T5's feed-forward casts its hidden states to wo's weight dtype: keep wo out of fp8.
    return path.endswith(".wo")


class DiTFamily(ModelFamily):
    """A rectified-flow DiT family (16-channel latents in 2x2 patches, T5 among the text encoders).

    Subclass hooks: ``family_label`` and ``flow_options`` (words of the error messages),
    :meth:`_flow_config`, :meth:`_t5_encoder` and :meth:`_modelspec_architecture` /
    ``modelspec_implementation``. ``validate_args`` stays the subclass's; it ends with
    :meth:`_validate_training_args`.
    """

    latents_stride = 8
    latent_cache_suffixed_keys = True
    bucket_reso_multiple = 16  # 8x VAE, then 2x2 patches
    tracker_name = "network_train"

    #: the family's name in messages ("FLUX.1", "SD3")
    family_label: str = "DiT"
    #: the flow-matching flags named when a DDPM-only flag is refused
    flow_options: str = "--weighting_scheme"
    #: ``modelspec.implementation`` of saved LoRAs
    modelspec_implementation: str = ""

    # --- hooks ---------------------------------------------------------------------------------
    def _flow_config(self, args: argparse.Namespace):
        """The :class:`~library.training.flow_matching.FlowConfig` of the run (``ValueError`` when
        the flags do not make one)."""
        raise NotImplementedError

    def _t5_encoder(self, models: FamilyModels) -> torch.nn.Module | None:
        """The loaded T5 encoder, None when the run has none."""
        raise NotImplementedError

    def _modelspec_architecture(self) -> str:
        """``modelspec.architecture`` of the base model (``/lora`` is appended)."""
        raise NotImplementedError

    # --- set-up --------------------------------------------------------------------------------
    #: the text encoder whose token length ``token_length_flag`` sets, and that flag
    token_length_encoder: str = "T5"
    token_length_flag: str = "t5xxl_max_token_length"
    #: what the family conditions on instead of a ``--clip_skip`` layer (said when the flag is ignored)
    clip_skip_note: str = ""
    #: False where the noise levels come only from ``--timestep_sampling`` (``--min/max_timestep`` warn)
    honours_timestep_range: bool = False

    def _check_shared_flags(self, args: argparse.Namespace) -> None:
        """The flag checks every DiT family makes alike: another family's ``--network_module``, the
        DDPM-only flags, ``--weighted_captions``, the SD text flags it ignores, its token length."""
        module = getattr(args, "network_module", None)  # absent from the ControlNet scripts
        if module in NETWORK_MODULES and module != self.default_network_module:
            raise ArgumentError(f"--network_module {module} is for another model family; {self.family_label} LoRAs "
                                f"use --network_module {self.default_network_module}")
        self._refuse_ddpm_flags(args)
        if getattr(args, "weighted_captions", False):
            raise ArgumentError(f"--weighted_captions is not supported for {self.family_label} "
                                f"({self.token_length_encoder} has no prompt weights here): remove it")
        if not self.honours_timestep_range:
            for name in ("min_timestep", "max_timestep"):
                if getattr(args, name, None) is not None:
                    logger.warning("--%s is ignored for %s (as in the reference); shape the noise levels with "
                                   "--timestep_sampling", name, self.family_label)
        if getattr(args, "clip_skip", None) is not None:
            logger.warning("--clip_skip is ignored for %s: %s", self.family_label, self.clip_skip_note)
        if getattr(args, "max_token_length", None) is not None:
            logger.warning("--max_token_length is ignored for %s: set the %s length with --%s", self.family_label,
                           self.token_length_encoder, self.token_length_flag)
        length = getattr(args, self.token_length_flag, None)
        if length is not None and length < 1:
            raise ArgumentError(f"--{self.token_length_flag} {length} must be 1 or more")

    def _refuse_ddpm_flags(self, args: argparse.Namespace) -> None:
        for name in DDPM_ONLY_FLAGS:
            if getattr(args, name, None):
                raise ArgumentError(f"--{name} does not apply to {self.family_label} (rectified flow, not DDPM): "
                                    f"remove it; the flow-matching options are {self.flow_options}")

    def _validate_training_args(self, args: argparse.Namespace) -> None:
        """The checks every DiT family ends ``validate_args`` with: memory options, ``train_t5xxl``
        against text-encoder output caching, then the flow configuration."""
        if args.blocks_to_swap is not None and args.blocks_to_swap < 0:
            raise ArgumentError(f"--blocks_to_swap {args.blocks_to_swap} must be 0 or more")
        if args.blocks_to_swap and args.cpu_offload_checkpointing:
            raise ArgumentError("--blocks_to_swap and --cpu_offload_checkpointing exclude each other: keep one")
        if args.cpu_offload_checkpointing and not args.gradient_checkpointing:
            raise ArgumentError("--cpu_offload_checkpointing needs --gradient_checkpointing")
        if getattr(args, "fp8_base_unet", False):  # a network flag (absent from the ControlNet scripts)
            args.fp8_base = True  # the reference: fp8 for the DiT implies --fp8_base
        caching = (getattr(args, "cache_text_encoder_outputs", False)
                   or getattr(args, "cache_text_encoder_outputs_to_disk", False))
        if network_arg_true(args, "train_t5xxl") and caching:
            raise ArgumentError("--network_args train_t5xxl=True trains T5, so its outputs cannot be cached: drop "
                                "--cache_text_encoder_outputs(_to_disk)")
        try:
            self._flow_config(args)
        except ValueError as e:
            raise ArgumentError(str(e)) from None

    # --- placing the models --------------------------------------------------------------------
    def place_denoiser(self, models: FamilyModels, args: argparse.Namespace, device) -> None:
        """With ``--blocks_to_swap`` the swapped blocks stay in CPU memory; else the whole DiT moves."""
        denoiser = models.denoiser
        if args.blocks_to_swap:
            denoiser.enable_block_swap(args.blocks_to_swap, torch.device(device))
            denoiser.move_to_device_except_swap_blocks(torch.device(device))
        else:
            denoiser.to(device)

    def fp8_text_encoders(self, models: FamilyModels, args: argparse.Namespace):
        t5 = self._t5_encoder(models)
        return [] if t5 is None else [(t5, _is_t5_wo)]

    def enable_gradient_checkpointing(self, models: FamilyModels, args: argparse.Namespace, train_te: bool) -> None:
        models.denoiser.enable_gradient_checkpointing(cpu_offload=bool(args.cpu_offload_checkpointing))
        if train_te:
            for te in models.text_encoders:
                te.gradient_checkpointing_enable()

    # --- output --------------------------------------------------------------------------------
    def modelspec(self, args: argparse.Namespace, timestamp: float) -> dict[str, str]:
        from library.training.metadata import modelspec_metadata

        return modelspec_metadata(args, architecture=f"{self._modelspec_architecture()}/lora",
                                  implementation=self.modelspec_implementation,
                                  resolution=parse_resolution(args.resolution, 1024), prediction_type=None,
                                  timestamp=timestamp, title_default=f"LoRA@{int(timestamp)}")
