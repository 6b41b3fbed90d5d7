"""SD3 / SD3.5 (Medium, Large, 3.5 Medium) as a model family of the shared training loop.

What differs from the other families, all behind the :class:`~library.families.base.ModelFamily`
methods: one SAI checkpoint holds the MMDiT, the VAE and usually the three text encoders
(``--clip_l``, ``--clip_g``, ``--t5xxl``, ``--vae`` override them); latents are the VAE's 16 channels
shifted and scaled (what kohya's ``_sd3.npz`` caches hold); the text conditioning is CLIP-L + CLIP-G
(penultimate layers, projected pooled outputs) and T5; the objective is rectified flow with SD3's
timestep distribution (``--weighting_scheme`` density shifted by ``--training_shift``, honouring
``--min_timestep``/``--max_timestep``) and the x0-preconditioned output compared with x0
(``library/training/flow_matching.py``); per-encoder conditioning dropout happens at step time, so
it also works on cached text-encoder outputs.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from library.args import ArgumentError
from library.families.base import FamilyModels, Prediction
from library.families.dit_family import DiTFamily
from library.families.sd3 import text as sd3_text

logger = logging.getLogger(__name__)

#: modelspec architecture of each variant (kohya's names)
ARCHITECTURES = {"sd3_medium": "stable-diffusion-3-medium", "sd35_large": "stable-diffusion-3-5-large",
                 "sd35_medium": "stable-diffusion-3-5-medium"}

_NO_EFFECT_FLAGS = ("save_clip", "save_t5xxl", "t5xxl_device", "t5xxl_dtype")


class SD3Family(DiTFamily):
    latent_cache_suffix = "_sd3"
    text_encoder_cache_suffix = "_sd3_te.npz"
    default_network_module = "networks.lora_sd3"
    family_label = "SD3"
    flow_options = "--weighting_scheme and --training_shift"
    modelspec_implementation = "diffusers"
    clip_skip_note = "it conditions on the penultimate CLIP layers"
    honours_timestep_range = True

    def __init__(self) -> None:
        #: set by load_models from the MMDiT's weights; the metadata names the variant
        self.variant: str | None = None

    # --- set-up --------------------------------------------------------------------------------
    def validate_args(self, args) -> None:
        self._check_shared_flags(args)
        for name in ("clip_l", "clip_g", "t5xxl", "vae"):
            value = getattr(args, name, None)
            if value and not os.path.exists(value):
                raise ArgumentError(f"--{name} {value}: no such file")
        for name in _NO_EFFECT_FLAGS:
            if getattr(args, name, None):
                logger.warning("--%s has no effect (as in the reference)", name)
        for name in ("clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate", "pos_emb_random_crop_rate"):
            value = getattr(args, name)
            if not 0.0 <= value <= 1.0:
                raise ArgumentError(f"--{name} {value} must be in [0, 1]")
        if args.training_shift <= 0:
            raise ArgumentError(f"--training_shift {args.training_shift} must be above 0 (1.0 = no shift)")
        self._validate_training_args(args)

    def _flow_config(self, args):
        from library.training.flow_matching import FlowConfig

        # SD3 reads its output as an x0 estimate compared with x0, weighted by --weighting_scheme.
        return FlowConfig(model_prediction_type="sigma_scaled", weighting_scheme=args.weighting_scheme,
                          logit_mean=args.logit_mean, logit_std=args.logit_std, mode_scale=args.mode_scale,
                          ip_noise_gamma=getattr(args, "ip_noise_gamma", None),
                          ip_noise_gamma_random_strength=bool(getattr(args, "ip_noise_gamma_random_strength", False)))

    # --- loading -------------------------------------------------------------------------------
    def load_models(self, args, device, weight_dtype) -> FamilyModels:
        from library.families.sd3.loading import load_sd3_models
        from library.training.flow_matching import FlowMatchingObjective

        loaded = load_sd3_models(args.pretrained_model_name_or_path, clip_l_path=args.clip_l, clip_g_path=args.clip_g,
                                 t5_path=args.t5xxl, vae_path=args.vae, tokenizer_cache_dir=args.tokenizer_cache_dir,
                                 dtype=weight_dtype, mmap=not args.disable_mmap_load_safetensors)
        self.variant = loaded.variant
        if args.enable_scaled_pos_embed:
            loaded.mmdit.enable_scaled_pos_embed(True)
        if args.pos_emb_random_crop_rate:
            loaded.mmdit.set_pos_emb_random_crop_rate(args.pos_emb_random_crop_rate)
        encoders = [e for e in (loaded.clip_l, loaded.clip_g, loaded.t5) if e is not None]
        return FamilyModels(denoiser=loaded.mmdit, vae=loaded.vae, text_encoders=encoders,
                            tokenizers=[loaded.clip_l_tokenizer, loaded.clip_g_tokenizer, loaded.t5_tokenizer],
                            extra={"objective": FlowMatchingObjective(self._flow_config(args)), "sd3": loaded})

    def make_tokenize_fn(self, models: FamilyModels, args):
        return functools.partial(sd3_text.tokenize, *models.tokenizers, t5_max_length=args.t5xxl_max_token_length)

    def _t5_encoder(self, models: FamilyModels):
        return models.extra["sd3"].t5  # None when the run has no T5

    # --- per step ------------------------------------------------------------------------------
    def encode_images(self, models: FamilyModels, images: torch.Tensor) -> torch.Tensor:
        from library.families.sd3.vae import encode_latents

        return encode_latents(models.vae, images)

    def encode_text(self, models: FamilyModels, batch: dict, args) -> sd3_text.SD3TextConditioning:
        sd3 = models.extra["sd3"]
        ids = batch.get("input_ids")
        if ids is None:
            ids = sd3_text.tokenize(*models.tokenizers, batch["captions"], t5_max_length=args.t5xxl_max_token_length)
        ids = {k: v.to(sd3.clip_l.device) for k, v in ids.items()}
        return sd3_text.encode(sd3.clip_l, sd3.clip_g, sd3.t5, ids, apply_lg_attn_mask=args.apply_lg_attn_mask,
                               apply_t5_attn_mask=args.apply_t5_attn_mask, t5_width=sd3.context_width)

    def predict(self, models: FamilyModels, latents, conditioning: sd3_text.SD3TextConditioning, batch, args, *,
                timesteps=None, noise=None) -> Prediction:
        from library.training.flow_matching import sd3_sigmas

        objective = models.extra["objective"]
        device = latents.device
        training = timesteps is None and noise is None
        noise = objective.sample_noise(latents) if noise is None else noise.to(latents)
        if timesteps is None:
            sigmas, timesteps = sd3_sigmas(latents.shape[0], device, weighting_scheme=args.weighting_scheme,
                                           logit_mean=args.logit_mean, logit_std=args.logit_std,
                                           mode_scale=args.mode_scale, training_shift=args.training_shift,
                                           min_timestep=args.min_timestep, max_timestep=args.max_timestep)
        else:
            sigmas = objective.sigmas_from_timesteps(timesteps.to(device))
            timesteps = sigmas * 1000
        noisy, _ = objective.noisy_and_target(latents, noise, sigmas, perturb=training)
        if training and (args.clip_l_dropout_rate or args.clip_g_dropout_rate or args.t5_dropout_rate):
            # At step time (not while encoding), so cached outputs are dropped too; never in validation.
            conditioning = sd3_text.apply_dropout(conditioning, clip_l_rate=args.clip_l_dropout_rate,
                                                  clip_g_rate=args.clip_g_dropout_rate, t5_rate=args.t5_dropout_rate)
        dtype = conditioning.t5_out.dtype  # the compute dtype (the MMDiT may store its weights in fp8)
        # timesteps stay float32: in bf16, t near 1000 would round to steps of 4 before the embedding
        out = models.denoiser(noisy.to(dtype), timesteps.float(), conditioning.context().to(dtype),
                              conditioning.pooled.to(dtype)).float()
        flow = objective.precondition(out, noisy, sigmas, latents, noise)
        return Prediction(pred=flow.pred, target=flow.target, timesteps=timesteps,
                          abar_t=objective.abar_equivalent(sigmas), weighting=flow.weighting)

    # --- text-encoder output cache -------------------------------------------------------------
    def text_encoder_outputs_to_cache(self, conditioning) -> dict[str, torch.Tensor]:
        return sd3_text.to_cache(conditioning)  # kohya's ``_sd3_te.npz`` keys

    def conditioning_from_cache(self, models, cached, args, device, dtype):
        return sd3_text.from_cache(cached, clip_l_width=models.extra["sd3"].clip_l_width).to(device, dtype)

    def text_encoder_cache_settings(self, args) -> dict[str, bool | float]:
        return {"apply_lg_attn_mask": bool(args.apply_lg_attn_mask), "apply_t5_attn_mask": bool(args.apply_t5_attn_mask)}

    # --- output --------------------------------------------------------------------------------
    def metadata(self, args) -> dict[str, str]:
        md = {"ss_v2": "False", "ss_base_model_version": self.variant or "sd3_medium"}
        for name in ("apply_lg_attn_mask", "apply_t5_attn_mask", "weighting_scheme", "logit_mean", "logit_std",
                     "mode_scale", "training_shift", "t5xxl_max_token_length"):
            md[f"ss_{name}"] = str(getattr(args, name))
        return md

    def _modelspec_architecture(self) -> str:
        return ARCHITECTURES.get(self.variant or "sd3_medium", "stable-diffusion-3-medium")

    def sample_defaults(self, args):
        from library.families.sd3.generation import sd3_prompt_defaults

        return sd3_prompt_defaults(args.sample_sampler)

    def sample_image(self, models: FamilyModels, prompt, generator, args, device, dtype):
        from library.families.sd3.generation import SD3Sampler

        sd3 = models.extra["sd3"]
        sampler = SD3Sampler(models.denoiser, models.vae, sd3.clip_l, sd3.clip_g, sd3.t5, tuple(models.tokenizers),
                             t5_max_length=args.t5xxl_max_token_length, apply_lg_attn_mask=args.apply_lg_attn_mask,
                             apply_t5_attn_mask=args.apply_t5_attn_mask)
        compute_dtype = sd3.clip_l.dtype
        with torch.autocast(device_type=torch.device(device).type, dtype=compute_dtype,
                            enabled=compute_dtype != torch.float32):
            return sampler.generate(prompt, generator=generator, device=device, dtype=compute_dtype)

    def network_text_encoders(self, models: FamilyModels):
        sd3 = models.extra["sd3"]
        return [sd3.clip_l, sd3.clip_g, sd3.t5]  # lora_te1_, lora_te2_, (train_t5xxl) lora_te3_
