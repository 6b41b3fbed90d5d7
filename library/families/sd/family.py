"""Stable Diffusion 1.x / 2.x as a model family of the shared training loop."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from library.args import ArgumentError
from library.families.base import FamilyModels, ModelFamily, Prediction
from library.families.ddpm import DDPMObjective
from library.families.sd import text
from library.sampling.schedulers import SAMPLER_NAMES
from library.training.noise import NoiseConfig
from library.training.weighted_captions import apply_token_weights

logger = logging.getLogger(__name__)

LATENT_SCALE = 0.18215


class StableDiffusionFamily(ModelFamily):
    latents_stride = 8
    sampler_names = SAMPLER_NAMES  # the diffusers schedulers of library/sampling/schedulers.py (SDXL too)
    latent_cache_suffix = "_sd"
    tracker_name = "network_train"
    #: raw VAE latents are multiplied by this before noising (the model's latent space)
    latent_scale = LATENT_SCALE

    def validate_args(self, args) -> None:
        if args.max_token_length not in (None, 75, 150, 225):
            raise ArgumentError("--max_token_length must be 75, 150 or 225")
        if getattr(args, "no_token_padding", False) and (args.max_token_length or args.weighted_captions):
            raise ArgumentError("--no_token_padding pads one 77-token chunk to the longest caption: it cannot be used "
                                "with --max_token_length or --weighted_captions")
        if args.v_parameterization and not args.v2:
            logger.warning("--v_parameterization without --v2: fine for v-prediction SD1 models, unusual otherwise")
        if args.v2 and args.clip_skip is not None:
            logger.warning("--clip_skip with --v2: SD2's text encoder output already is the penultimate layer; "
                           "clip_skip %d goes further back", args.clip_skip)

    # --- loading -------------------------------------------------------------------------------
    def load_models(self, args, device, weight_dtype) -> FamilyModels:
        from library.families.sd.loading import load_sd_models

        sd = load_sd_models(args.pretrained_model_name_or_path, v2=args.v2, vae_path=args.vae,
                            tokenizer_cache_dir=args.tokenizer_cache_dir, dtype=torch.float32, device="cpu")
        if args.xformers:  # validation already checked that the package is installed
            sd.unet.enable_xformers_memory_efficient_attention()
            sd.vae.enable_xformers_memory_efficient_attention()
        return FamilyModels(denoiser=sd.unet, vae=sd.vae, text_encoders=[sd.text_encoder],
                            tokenizers=[sd.tokenizer],
                            extra={"objective": DDPMObjective(args.v_parameterization,
                                                              noise=NoiseConfig.from_args(args)), "sd": sd})

    def make_tokenize_fn(self, models: FamilyModels, args):
        if getattr(args, "weighted_captions", False):
            return None  # encode_text tokenizes with the weights; worker-side ids would be thrown away
        if getattr(args, "no_token_padding", False):
            return functools.partial(text.tokenize_unpadded, models.tokenizers[0])
        return functools.partial(text.tokenize, models.tokenizers[0], max_token_length=args.max_token_length)

    # --- per step ------------------------------------------------------------------------------
    def encode_images(self, models: FamilyModels, images: torch.Tensor) -> torch.Tensor:
        vae = models.vae
        return vae.encode(images.to(vae.dtype)).latent_dist.sample().float()

    def encode_text(self, models: FamilyModels, batch: dict, args) -> torch.Tensor:
        te = models.text_encoders[0]
        if getattr(args, "weighted_captions", False):
            # Weights come with the tokens, so weighted captions are tokenized here, not in the workers.
            ids, weights = text.tokenize_weighted(models.tokenizers[0], batch["captions"], args.max_token_length)
            hidden = text.encode(te, ids.to(te.device), clip_skip=args.clip_skip, max_token_length=args.max_token_length)
            return apply_token_weights(hidden, weights)
        input_ids = batch["input_ids"].to(te.device)
        return text.encode(te, input_ids, clip_skip=args.clip_skip, max_token_length=args.max_token_length)

    def predict(self, models: FamilyModels, latents, conditioning, batch, args, *, timesteps=None,
                noise=None) -> Prediction:
        objective: DDPMObjective = models.extra["objective"]
        latents = latents * self.latent_scale
        # Given noise (validation) is used as it is: no offset, pyramid or input perturbation.
        perturb = noise is None
        noise = objective.sample_noise(latents) if noise is None else noise.to(latents)
        if timesteps is None:
            timesteps = objective.sample_timesteps(latents.shape[0], latents.device)
        else:
            timesteps = timesteps.to(device=latents.device, dtype=torch.long)
        noisy, target = objective.noisy_latents_and_target(latents, noise, timesteps, perturb=perturb)
        dtype = conditioning.dtype  # the compute dtype (the U-Net may store some weights in fp8)
        pred = self.run_denoiser(models, noisy.to(dtype), timesteps, conditioning, batch)
        return Prediction(pred=pred, target=target, timesteps=timesteps,
                          alphas_cumprod=objective.alphas_cumprod(latents.device))

    def run_denoiser(self, models: FamilyModels, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning,
                     batch: dict) -> torch.Tensor:
        """One U-Net call on noisy model-space latents (the part of :meth:`predict` SDXL changes)."""
        return self.call_unet(models, noisy, timesteps, conditioning, {}, batch)

    @staticmethod
    def call_unet(models: FamilyModels, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                  unet_kwargs: dict, batch: dict) -> torch.Tensor:
        """``unet(noisy, timesteps, context, **unet_kwargs).sample``, the U-Net call of a training or
        validation step. A ``models.extra["unet_control"]`` (a ControlNet target's
        :class:`library.controlnet.control.UNetControl`) adds the inputs of the step:
        ``step_kwargs(noisy, timesteps, context, unet_kwargs, batch)``, e.g. ControlNet residuals."""
        control = models.extra.get("unet_control")
        if control is not None:
            unet_kwargs = {**unet_kwargs, **control.step_kwargs(noisy, timesteps, context, unet_kwargs, batch)}
        return models.denoiser(noisy, timesteps, context, **unet_kwargs).sample

    @staticmethod
    def preview_control(models: FamilyModels, sampler, prompt, device, dtype):
        """The prompt a preview sampler gets, after ``models.extra["unet_control"]`` (if any) replaced the
        sampler's U-Net by a controlled one for this prompt (``--cn`` / ``controlnet_image``)."""
        control = models.extra.get("unet_control")
        if control is None:
            return prompt
        sampler.unet, prompt = control.preview(sampler.unet, prompt, device, dtype)
        return prompt

    # --- full checkpoints ----------------------------------------------------------------------
    def checkpoint_state_dict(self, models) -> dict[str, torch.Tensor]:
        return models.extra["sd"].ldm_state_dict()

    def checkpoint_prefixes(self) -> dict[str, tuple[str, ...]]:
        return {"denoiser": ("model.diffusion_model.",), "text_encoders": ("cond_stage_model.",),
                "vae": ("first_stage_model.",)}

    def save_diffusers(self, models, folder, *, dtype, safe_serialization: bool) -> None:
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        sd = models.extra["sd"]
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False,
                                  prediction_type="v_prediction" if getattr(sd, "v_parameterization", False)
                                  else "epsilon")
        pipe = StableDiffusionPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        if dtype is not None:
            pipe = pipe.to(dtype=dtype)
        pipe.save_pretrained(str(folder), safe_serialization=safe_serialization)

    # --- output --------------------------------------------------------------------------------
    def base_model_version(self, args) -> str:
        return ("sd_v2" if args.v2 else "sd_v1") + ("_v" if args.v_parameterization else "")

    def metadata(self, args) -> dict[str, str]:
        return {"ss_v2": str(bool(args.v2)), "ss_base_model_version": self.base_model_version(args)}

    def modelspec(self, args, timestamp: float) -> dict[str, str]:
        from library.training.metadata import modelspec_metadata

        if args.v2:
            arch = "stable-diffusion-v2-768-v" if args.v_parameterization else "stable-diffusion-v2-512"
        else:
            arch = "stable-diffusion-v1"
        default_side = 768 if args.v2 and args.v_parameterization else 512
        return modelspec_metadata(args, architecture=f"{arch}/lora", implementation="diffusers",
                                  resolution=parse_resolution(args.resolution, default_side),
                                  prediction_type="v" if args.v_parameterization else "epsilon",
                                  timestamp=timestamp, title_default=f"LoRA@{int(timestamp)}")

    def sample_image(self, models: FamilyModels, prompt, generator, args, device, dtype):
        from library.generation.prompt_encoding import encode_prompts as encode_weighted_prompts
        from library.sampling.pipeline import Conditioning, LatentDiffusionSampler

        te, tok = models.text_encoders[0], models.tokenizers[0]

        def encode_prompts(prompts: list[str]) -> Conditioning:
            # The prompt language of gen_img.py ((x:1.2) weights, BREAK, long prompts), so previews
            # look like what users get from generation with the same prompt.
            return Conditioning(hidden_states=encode_weighted_prompts(
                tok, te, prompts, max_embeddings_multiples=text.chunk_count(args.max_token_length),
                clip_skip=args.clip_skip))

        sampler = LatentDiffusionSampler(models.denoiser, models.vae, encode_prompts, latent_scale=LATENT_SCALE)
        prompt = self.preview_control(models, sampler, prompt, device, dtype)
        return sampler.generate(prompt, sampler_name=prompt.sampler or args.sample_sampler,
                                v_parameterization=args.v_parameterization, generator=generator,
                                device=device, dtype=models.denoiser.dtype)


def parse_resolution(value: Any, default_side: int) -> tuple[int, int]:
    """``"512"`` / ``"512,768"`` / ``[512, 768]`` -> (width, height)."""
    if value is None:
        return default_side, default_side
    if isinstance(value, (list, tuple)):
        parts = [int(v) for v in value]
    else:
        parts = [int(v) for v in str(value).replace("x", ",").split(",") if v.strip()]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
