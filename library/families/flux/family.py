"""FLUX.1 (dev/schnell) as a model family of the shared training loop.

What differs from the U-Net families, all behind the :class:`~library.families.base.ModelFamily`
methods: the models come from four files (DiT, ``--ae``, ``--clip_l``, ``--t5xxl``); latents are
the AE's 16-channel latents already scaled and shifted (what kohya's ``_flux.npz`` caches hold) and
packed 2x2 into tokens for the DiT; the text conditioning is CLIP-L's pooled vector plus T5's
hidden states; the objective is rectified flow (:mod:`library.training.flow_matching`); dev models
get the embedded guidance ``--guidance_scale``.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from library.args import ArgumentError
from library.families.base import FamilyModels, Prediction
from library.families.dit_family import DiTFamily
from library.families.flux import text as flux_text
from library.families.flux.text import FluxTextConditioning

logger = logging.getLogger(__name__)

MODELSPEC_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"


class FluxFamily(DiTFamily):
    latent_cache_suffix = "_flux"
    text_encoder_cache_suffix = "_flux_te.npz"
    default_network_module = "networks.lora_flux"
    family_label = "FLUX.1"
    flow_options = "--timestep_sampling and --weighting_scheme"
    modelspec_implementation = MODELSPEC_IMPLEMENTATION
    #: the ``--model_type`` this family trains (the entry script picks the family by it)
    model_type = "flux"
    #: the model files besides the DiT that must be given
    required_files = ("ae", "clip_l", "t5xxl")
    #: ``--guidance_scale`` when it is not given (the reference's default)
    default_guidance_scale = 3.5
    clip_skip_note = "it uses CLIP-L's pooled output"

    def __init__(self) -> None:
        #: set by load_models from the DiT's weights; the metadata names the variant
        self.guidance_embed: bool | None = None

    # --- set-up --------------------------------------------------------------------------------
    def validate_args(self, args) -> None:
        model_type = getattr(args, "model_type", None) or "flux"
        if model_type != self.model_type:
            raise ArgumentError(f"--model_type {model_type}: this script trains --model_type {self.model_type} only")
        for name in self.required_files:
            value = getattr(args, name)
            if not value:
                raise ArgumentError(f"--{name} is required for {self.family_label}: the path of the {name} "
                                    ".safetensors file")
            if not os.path.isfile(value):
                raise ArgumentError(f"--{name} {value}: no such file")
        if getattr(args, "guidance_scale", None) is None:
            args.guidance_scale = self.default_guidance_scale
        self._check_controlnet_flag(args)
        self._check_shared_flags(args)
        if args.split_mode:
            logger.warning("--split_mode is deprecated: using --blocks_to_swap 18 instead")
            args.blocks_to_swap = args.blocks_to_swap or 18
        self._validate_training_args(args)

    def _check_controlnet_flag(self, args) -> None:
        """A LoRA run with a frozen ControlNet (the reference's advanced option) is not supported here.
        Only the network scripts have ``--network_module``; flux_train_control_net.py trains that file."""
        if getattr(args, "controlnet_model_name_or_path", None) and hasattr(args, "network_module"):
            raise ArgumentError("--controlnet_model_name_or_path: training a network together with a frozen FLUX "
                                "ControlNet is not supported; to train the ControlNet use flux_train_control_net.py")

    def _flow_config(self, args):
        from library.training.flow_matching import FlowConfig

        return FlowConfig.from_args(args)

    # --- loading -------------------------------------------------------------------------------
    def load_models(self, args, device, weight_dtype) -> FamilyModels:
        from library.families.flux.loading import load_flux_models
        from library.training.flow_matching import FlowMatchingObjective

        loaded = load_flux_models(args.pretrained_model_name_or_path, ae_path=args.ae, clip_l_path=args.clip_l,
                                  t5_path=args.t5xxl, tokenizer_cache_dir=args.tokenizer_cache_dir,
                                  dtype=weight_dtype, mmap=not args.disable_mmap_load_safetensors)
        self.guidance_embed = loaded.config.guidance_embed
        if args.t5xxl_max_token_length is None:
            args.t5xxl_max_token_length = flux_text.default_t5_max_length(self.guidance_embed)
        objective = FlowMatchingObjective(self._flow_config(args))
        return FamilyModels(denoiser=loaded.flux, vae=loaded.ae, text_encoders=[loaded.clip_l, loaded.t5],
                            tokenizers=[loaded.clip_tokenizer, loaded.t5_tokenizer],
                            extra={"objective": objective, "flux": loaded})

    def make_tokenize_fn(self, models: FamilyModels, args):
        clip_tokenizer, t5_tokenizer = self._tokenizers(models)
        return functools.partial(flux_text.tokenize, clip_tokenizer, t5_tokenizer,
                                 t5_max_length=args.t5xxl_max_token_length)

    def _t5_encoder(self, models: FamilyModels):
        return models.text_encoders[1]  # [CLIP-L, T5]: FLUX always has T5

    def _encoders(self, models: FamilyModels):
        """(CLIP-L or None, T5) of the loaded models."""
        clip_l, t5 = models.text_encoders
        return clip_l, t5

    def _tokenizers(self, models: FamilyModels):
        """(CLIP tokenizer or None, T5 tokenizer)."""
        clip_tokenizer, t5_tokenizer = models.tokenizers
        return clip_tokenizer, t5_tokenizer

    # --- per step ------------------------------------------------------------------------------
    def encode_images(self, models: FamilyModels, images: torch.Tensor) -> torch.Tensor:
        from library.families.flux.autoencoder import encode_latents

        return encode_latents(models.vae, images)

    def encode_text(self, models: FamilyModels, batch: dict, args) -> FluxTextConditioning:
        clip_l, t5 = self._encoders(models)
        ids = batch.get("input_ids")
        if ids is None:  # e.g. text-encoder caching without a worker-side tokenizer
            clip_tokenizer, t5_tokenizer = self._tokenizers(models)
            ids = flux_text.tokenize(clip_tokenizer, t5_tokenizer, batch["captions"], args.t5xxl_max_token_length)
        ids = {k: v.to(t5.device) for k, v in ids.items()}
        return flux_text.encode(clip_l, t5, ids, apply_t5_attn_mask=args.apply_t5_attn_mask)

    def predict(self, models: FamilyModels, latents, conditioning: FluxTextConditioning, batch, args, *,
                timesteps=None, noise=None) -> Prediction:
        from library.families.flux.model import image_ids, pack_latents, text_ids, unpack_latents

        objective = models.extra["objective"]
        flux = models.denoiser
        batch_size, _, height, width = latents.shape
        device = latents.device
        # Given noise (validation) is used as it is: no input perturbation.
        perturb = noise is None
        noise = objective.sample_noise(latents) if noise is None else noise.to(latents)
        if timesteps is None:
            sigmas, timesteps = objective.sample_sigmas(batch_size, device, image_seq_len=(height // 2) * (width // 2))
        else:
            sigmas = objective.sigmas_from_timesteps(timesteps.to(device))
            timesteps = sigmas * 1000
        noisy, _ = objective.noisy_and_target(latents, noise, sigmas, perturb=perturb)

        dtype = conditioning.t5_out.dtype  # the compute dtype (the DiT may store its weights in fp8)
        guidance = None
        if flux.config.guidance_embed:
            guidance = torch.full((batch_size,), float(args.guidance_scale), device=device, dtype=dtype)
        mask = conditioning.t5_attn_mask if args.apply_t5_attn_mask else None
        inputs = (pack_latents(noisy).to(dtype), image_ids(batch_size, height, width, device=device, dtype=dtype),
                  conditioning.t5_out, text_ids(batch_size, conditioning.t5_out.shape[1], device=device, dtype=dtype),
                  sigmas.to(dtype), conditioning.l_pooled.to(dtype), guidance)
        control = models.extra.get("flux_control")  # a ControlNet run's (library/families/flux/controlnet_target.py)
        residuals = control.step_kwargs(*inputs, mask, batch) if control is not None else {}
        out = flux(*inputs, txt_attention_mask=mask, **residuals)
        # Unpacked again, so masks and the loss see [B, C, h, w] like every other family.
        out = unpack_latents(out.float(), height, width)
        flow = objective.precondition(out, noisy, sigmas, latents, noise)
        return Prediction(pred=flow.pred, target=flow.target, timesteps=timesteps,
                          abar_t=objective.abar_equivalent(sigmas), weighting=flow.weighting)

    # --- text-encoder output cache -------------------------------------------------------------
    def text_encoder_outputs_to_cache(self, conditioning: FluxTextConditioning) -> dict[str, torch.Tensor]:
        # kohya's ``_flux_te.npz`` keys (txt_ids are always zeros; kept so the files are kohya's).
        t5_out = conditioning.t5_out
        return {"l_pooled": conditioning.l_pooled, "t5_out": t5_out,
                "txt_ids": torch.zeros(t5_out.shape[0], t5_out.shape[1], 3, dtype=torch.float32),
                "t5_attn_mask": conditioning.t5_attn_mask.bool()}

    def conditioning_from_cache(self, models, cached, args, device, dtype) -> FluxTextConditioning:
        return FluxTextConditioning(cached["l_pooled"], cached["t5_out"], cached["t5_attn_mask"].bool()).to(device, dtype)

    def text_encoder_cache_settings(self, args) -> dict[str, bool | float]:
        return {"apply_t5_attn_mask": bool(args.apply_t5_attn_mask)}

    # --- output --------------------------------------------------------------------------------
    def _variant(self) -> str:
        return "schnell" if self.guidance_embed is False else "dev"

    def metadata(self, args) -> dict[str, str]:
        md = {"ss_v2": "False", "ss_base_model_version": "flux1", "ss_model_type": str(args.model_type)}
        for name in ("apply_t5_attn_mask", "weighting_scheme", "logit_mean", "logit_std", "mode_scale",
                     "guidance_scale", "timestep_sampling", "sigmoid_scale", "model_prediction_type",
                     "discrete_flow_shift"):
            md[f"ss_{name}"] = str(getattr(args, name))
        return md

    def _modelspec_architecture(self) -> str:
        return f"flux-1-{self._variant()}"

    def sample_defaults(self, args):
        from library.families.flux.generation import flux_prompt_defaults

        return flux_prompt_defaults(args.sample_sampler)

    def sample_image(self, models: FamilyModels, prompt, generator, args, device, dtype):
        from library.families.flux.generation import FluxSampler

        clip_l, t5 = self._encoders(models)
        control = models.extra.get("flux_control")
        control_image = None
        if control is not None:
            control_image, prompt = control.preview(prompt)
        sampler = FluxSampler(models.denoiser, models.vae, clip_l, t5, *self._tokenizers(models),
                              t5_max_length=args.t5xxl_max_token_length, apply_t5_attn_mask=args.apply_t5_attn_mask,
                              controlnet=control.model if control_image is not None else None,
                              control_image=control_image)
        compute_dtype = t5.dtype if t5.dtype != torch.float8_e4m3fn else torch.bfloat16
        with torch.autocast(device_type=torch.device(device).type, dtype=compute_dtype,
                            enabled=compute_dtype != torch.float32):
            return sampler.generate(prompt, generator=generator, device=device, dtype=compute_dtype)

    def network_text_encoders(self, models: FamilyModels):
        return list(models.text_encoders)  # [CLIP-L, T5]: lora_te1_ and (train_t5xxl) lora_te3_
