"""Lumina-Image 2.0 as a model family of the shared training loop.

What differs from the other flow families, all behind the :class:`~library.families.base.ModelFamily`
methods: the models come from three files (NextDiT, ``--gemma2``, ``--ae`` = FLUX.1's AE, whose
scaled and shifted 16-channel latents are what kohya's ``_lumina.npz`` caches hold); the text
conditioning is Gemma-2's penultimate hidden states with their mask, optionally behind a
``--system_prompt``; the DiT runs at Lumina time ``t = 1 - sigma`` and predicts ``x0 - noise``, so
the family hands the loss its negative, the velocity ``eps - x0`` that
:mod:`library.training.flow_matching` compares with (the squared error is the reference's).

Noise levels: ``--timestep_sampling`` (default ``shift``) and the other flow flags act on sigma,
the noise level, exactly as for FLUX.1 (kohya_surface.md §7.3), plus ``nextdit_shift``. Deliberate
difference: kohya's Lumina trainer applies ``shift`` (and the ``sigma`` table) to the image fraction
``1 - sigma`` instead, i.e. it concentrates training on *low* noise levels when the flag means, for
every other model, high ones; here ``--discrete_flow_shift 6`` shifts towards noise, as the
Lumina sampler's shift 6 does.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from library.args import ArgumentError
from library.families.base import FamilyModels, Prediction
from library.families.dit_family import DiTFamily
from library.families.lumina import text as lumina_text

logger = logging.getLogger(__name__)

MODELSPEC_IMPLEMENTATION = "https://github.com/Alpha-VLLM/Lumina-Image-2.0"
MODELSPEC_ARCHITECTURE = "lumina-2"
BASE_MODEL_VERSION = "lumina2"


class LuminaFamily(DiTFamily):
    latent_cache_suffix = "_lumina"
    text_encoder_cache_suffix = "_lumina_te.npz"
    default_network_module = "networks.lora_lumina"
    family_label = "Lumina-Image 2.0"
    flow_options = "--timestep_sampling, --discrete_flow_shift and --weighting_scheme"
    modelspec_implementation = MODELSPEC_IMPLEMENTATION
    token_length_encoder = "Gemma-2"
    token_length_flag = "gemma2_max_token_length"
    clip_skip_note = "it conditions on Gemma-2's penultimate layer"

    # --- set-up --------------------------------------------------------------------------------
    def validate_args(self, args) -> None:
        for name, what in (("gemma2", "the Gemma-2 text encoder (.safetensors file or transformers folder)"),
                           ("ae", "the FLUX.1 autoencoder .safetensors file")):
            value = getattr(args, name)
            if not value:
                raise ArgumentError(f"--{name} is required for Lumina-Image 2.0: the path of {what}")
            if not os.path.exists(value):
                raise ArgumentError(f"--{name} {value}: no such file")
        self._check_shared_flags(args)
        for name in ("use_flash_attn", "use_sage_attn", "sample_batch_size"):
            if getattr(args, name, None):
                logger.info("--%s is accepted for compatibility and has no effect here (attention runs through "
                            "PyTorch SDPA; previews are made one at a time)", name)
        self._validate_training_args(args)

    def _flow_config(self, args):
        from library.training.flow_matching import FlowConfig

        return FlowConfig.from_args(args)

    def _t5_encoder(self, models: FamilyModels):
        return None  # Lumina has no T5

    def fp8_text_encoders(self, models: FamilyModels, args):
        return [(models.text_encoders[0], None)]  # Gemma-2's Linears; its embedding stays in the compute dtype

    # --- loading -------------------------------------------------------------------------------
    def load_models(self, args, device, weight_dtype) -> FamilyModels:
        from library.families.lumina.loading import load_lumina_models
        from library.training.flow_matching import FlowMatchingObjective

        loaded = load_lumina_models(args.pretrained_model_name_or_path, gemma2_path=args.gemma2, ae_path=args.ae,
                                    tokenizer_cache_dir=args.tokenizer_cache_dir, dtype=weight_dtype,
                                    mmap=not args.disable_mmap_load_safetensors)
        if args.gemma2_max_token_length is None:
            args.gemma2_max_token_length = lumina_text.DEFAULT_MAX_TOKEN_LENGTH
        return FamilyModels(denoiser=loaded.dit, vae=loaded.ae, text_encoders=[loaded.gemma2],
                            tokenizers=[loaded.tokenizer],
                            extra={"objective": FlowMatchingObjective(self._flow_config(args))})

    def make_tokenize_fn(self, models: FamilyModels, args):
        return functools.partial(lumina_text.tokenize, models.tokenizers[0], max_length=args.gemma2_max_token_length,
                                 system_prompt=args.system_prompt)

    # --- per step ------------------------------------------------------------------------------
    def encode_images(self, models: FamilyModels, images: torch.Tensor) -> torch.Tensor:
        from library.families.flux.autoencoder import encode_latents

        return encode_latents(models.vae, images)

    def encode_text(self, models: FamilyModels, batch: dict, args) -> lumina_text.LuminaTextConditioning:
        gemma2 = models.text_encoders[0]
        ids = batch.get("input_ids")
        if ids is None:  # e.g. text-encoder caching without a worker-side tokenizer
            ids = self.make_tokenize_fn(models, args)(batch["captions"])
        ids = {k: v.to(gemma2.device) for k, v in ids.items()}
        return lumina_text.encode(gemma2, ids)

    def predict(self, models: FamilyModels, latents, conditioning: lumina_text.LuminaTextConditioning, batch, args, *,
                timesteps=None, noise=None) -> Prediction:
        objective = models.extra["objective"]
        batch_size, _, height, width = latents.shape
        device = latents.device
        perturb = noise is None  # given noise (validation) is used as it is
        noise = objective.sample_noise(latents) if noise is None else noise.to(latents)
        if timesteps is None:
            sigmas, timesteps = objective.sample_sigmas(batch_size, device, image_seq_len=(height // 2) * (width // 2))
        else:
            sigmas = objective.sigmas_from_timesteps(timesteps.to(device))
            timesteps = sigmas * 1000
        noisy, _ = objective.noisy_and_target(latents, noise, sigmas, perturb=perturb)
        dtype = conditioning.hidden.dtype  # the compute dtype (the DiT may store its weights in fp8)
        # Lumina time runs the other way (0 = noise); float32, so t near 1 is not rounded in bf16.
        out = models.denoiser(noisy.to(dtype), 1.0 - sigmas.float(), conditioning.hidden, conditioning.mask)
        flow = objective.precondition(-out.float(), noisy, sigmas, latents, noise)
        return Prediction(pred=flow.pred, target=flow.target, timesteps=timesteps,
                          abar_t=objective.abar_equivalent(sigmas), weighting=flow.weighting)

    # --- text-encoder output cache -------------------------------------------------------------
    def text_encoder_outputs_to_cache(self, conditioning) -> dict[str, torch.Tensor]:
        return lumina_text.to_cache(conditioning)  # kohya's ``_lumina_te.npz`` keys

    def conditioning_from_cache(self, models, cached, args, device, dtype) -> lumina_text.LuminaTextConditioning:
        return lumina_text.from_cache(cached).to(device, dtype)

    def text_encoder_cache_settings(self, args) -> dict[str, bool | float]:
        # The cached outputs depend on the system prompt, which the caption hash does not cover.
        return {"system_prompt_hash": float(lumina_text.system_prompt_fingerprint(args.system_prompt))}

    # --- output --------------------------------------------------------------------------------
    def metadata(self, args) -> dict[str, str]:
        md = {"ss_v2": "False", "ss_base_model_version": BASE_MODEL_VERSION}
        for name in ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "timestep_sampling", "sigmoid_scale",
                     "model_prediction_type", "discrete_flow_shift", "gemma2_max_token_length", "system_prompt"):
            md[f"ss_{name}"] = str(getattr(args, name))
        return md

    def _modelspec_architecture(self) -> str:
        return MODELSPEC_ARCHITECTURE

    def sample_defaults(self, args):
        from library.families.lumina.generation import lumina_prompt_defaults

        return lumina_prompt_defaults(args.sample_sampler)

    def sample_image(self, models: FamilyModels, prompt, generator, args, device, dtype):
        from library.families.lumina.generation import LuminaSampler

        gemma2 = models.text_encoders[0]
        sampler = LuminaSampler(models.denoiser, models.vae, gemma2, models.tokenizers[0],
                                max_length=args.gemma2_max_token_length, system_prompt=args.system_prompt)
        compute_dtype = gemma2.dtype if gemma2.dtype != torch.float8_e4m3fn else torch.bfloat16
        with torch.autocast(device_type=torch.device(device).type, dtype=compute_dtype,
                            enabled=compute_dtype != torch.float32):
            return sampler.generate(prompt, generator=generator, device=device, dtype=compute_dtype)

    def network_text_encoders(self, models: FamilyModels):
        return models.text_encoders[0]  # one encoder: lora_te_
