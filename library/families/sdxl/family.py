"""Stable Diffusion XL (base) as a model family of the shared training loop.

Differs from SD 1.x/2.x (which it extends) in: two text encoders and a pooled text vector
(:mod:`library.families.sdxl.text`), the size/crop micro-conditioning from the bucketing
bookkeeping, the latent scale 0.13025, text-encoder output caching, and the saved metadata.
The DDPM objective, noise options and loss are SD's.
"""

from __future__ import annotations

import functools
import logging

import torch

from library.args import ArgumentError
from library.families.base import FamilyModels
from library.families.ddpm import DDPMObjective
from library.families.sd import text as sd_text
from library.families.sd.family import StableDiffusionFamily, parse_resolution
from library.families.sdxl import text
from library.families.sdxl.generation import SDXL_LATENT_SCALE
from library.families.sdxl.text import TextConditioning
from library.training.noise import NoiseConfig

logger = logging.getLogger(__name__)

MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


class SDXLFamily(StableDiffusionFamily):
    latents_stride = 8
    latent_cache_suffix = "_sdxl"
    tracker_name = "network_train"
    latent_scale = SDXL_LATENT_SCALE
    text_encoder_cache_suffix = "_te_outputs.npz"

    def validate_args(self, args) -> None:
        if getattr(args, "v2", False):
            raise ArgumentError("--v2 is for SD 2.x; SDXL models have no such variant: remove --v2")
        if args.max_token_length not in (None, 75, 150, 225):
            raise ArgumentError("--max_token_length must be 75, 150 or 225")
        if args.clip_skip is not None:
            logger.warning("--clip_skip %d is ignored for SDXL: it conditions on the penultimate layer of both text "
                           "encoders, as it was trained", args.clip_skip)

    # --- loading -------------------------------------------------------------------------------
    def load_models(self, args, device, weight_dtype) -> FamilyModels:
        from library.families.sdxl.loading import load_sdxl_models

        sdxl = load_sdxl_models(args.pretrained_model_name_or_path, vae_path=args.vae,
                                tokenizer_cache_dir=args.tokenizer_cache_dir, dtype=torch.float32, device="cpu",
                                mmap=not getattr(args, "disable_mmap_load_safetensors", False))
        if args.xformers:
            sdxl.unet.enable_xformers_memory_efficient_attention()
            sdxl.vae.enable_xformers_memory_efficient_attention()
        objective = DDPMObjective(args.v_parameterization, noise=NoiseConfig.from_args(args))
        return FamilyModels(denoiser=sdxl.unet, vae=sdxl.vae, text_encoders=sdxl.text_encoders,
                            tokenizers=sdxl.tokenizers, extra={"objective": objective, "sdxl": sdxl})

    def make_tokenize_fn(self, models: FamilyModels, args):
        if getattr(args, "weighted_captions", False):
            return None  # encode_text tokenizes with the weights
        return functools.partial(text.tokenize, *models.tokenizers, max_token_length=args.max_token_length)

    # --- per step ------------------------------------------------------------------------------
    def encode_text(self, models: FamilyModels, batch: dict, args) -> TextConditioning:
        te1, te2 = models.text_encoders
        eos = models.tokenizers[1].eos_token_id
        if getattr(args, "weighted_captions", False):
            ids1, weights = sd_text.tokenize_weighted(models.tokenizers[0], batch["captions"], args.max_token_length)
            ids2, _ = sd_text.tokenize_weighted(models.tokenizers[1], batch["captions"], args.max_token_length)
            return text.encode_weighted(te1, te2, ids1, ids2, weights, eos)
        return text.encode(te1, te2, batch["input_ids"], eos)

    def run_denoiser(self, models: FamilyModels, noisy, timesteps, conditioning: TextConditioning, batch):
        dtype = noisy.dtype
        ids = text.size_ids(batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"])
        added = {"text_embeds": conditioning.pooled.to(dtype), "time_ids": ids.to(noisy.device, dtype)}
        return self.call_unet(models, noisy, timesteps, conditioning.context.to(dtype), {"added_cond_kwargs": added},
                              batch)

    # --- text-encoder output cache -------------------------------------------------------------
    def text_encoder_outputs_to_cache(self, conditioning: TextConditioning) -> dict[str, torch.Tensor]:
        # The key names of kohya's ``*_te_outputs.npz``, so caches are shared both ways.
        return {"hidden_state1": conditioning.hidden1, "hidden_state2": conditioning.hidden2,
                "pool2": conditioning.pooled}

    def conditioning_from_cache(self, models, cached, args, device, dtype) -> TextConditioning:
        return TextConditioning(cached["hidden_state1"], cached["hidden_state2"], cached["pool2"]).to(device, dtype)

    # --- full checkpoints ----------------------------------------------------------------------
    def checkpoint_state_dict(self, models) -> dict[str, torch.Tensor]:
        return models.extra["sdxl"].ldm_state_dict()

    def checkpoint_prefixes(self) -> dict[str, tuple[str, ...]]:
        return {"denoiser": ("model.diffusion_model.",), "text_encoders": ("conditioner.",),
                "vae": ("first_stage_model.",)}

    def save_diffusers(self, models, folder, *, dtype, safe_serialization: bool) -> None:
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        sdxl = models.extra["sdxl"]
        scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                           beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
        pipe = StableDiffusionXLPipeline(vae=sdxl.vae, text_encoder=sdxl.text_encoder1, text_encoder_2=sdxl.text_encoder2,
                                         tokenizer=sdxl.tokenizer1, tokenizer_2=sdxl.tokenizer2, unet=sdxl.unet,
                                         scheduler=scheduler)
        if dtype is not None:
            pipe = pipe.to(dtype=dtype)
        pipe.save_pretrained(str(folder), safe_serialization=safe_serialization)

    def text_encoder_learning_rates(self, args) -> list[float]:
        """``--learning_rate_te1`` / ``--learning_rate_te2``, each defaulting to ``--learning_rate``."""
        return [args.learning_rate if getattr(args, name, None) is None else getattr(args, name)
                for name in ("learning_rate_te1", "learning_rate_te2")]

    def denoiser_parameter_blocks(self, models) -> dict[int, list[torch.nn.Parameter]]:
        """U-Net parameters by SDXL block (0..22, the numbering of ``--block_lr`` and LoRA block options),
        through the checkpoint converter's diffusers -> SGM module paths."""
        from library.families.sd.checkpoint.unet import UNetShape, ldm_module_path
        from networks.lora_blocks import sdxl_unet_block_index

        unet = models.extra["sdxl"].unet
        to_sgm = ldm_module_path(UNetShape.from_diffusers_config(unet.config))
        blocks: dict[int, list[torch.nn.Parameter]] = {}
        for name, param in unet.named_parameters():
            module_path = name.rpartition(".")[0]
            sgm = to_sgm(module_path)
            block = sdxl_unet_block_index(sgm) if sgm is not None else None
            if block is None:
                raise ValueError(f"--block_lr: the U-Net parameter {name} belongs to no SDXL block")
            blocks.setdefault(block, []).append(param)
        return blocks

    # --- output --------------------------------------------------------------------------------
    def base_model_version(self, args) -> str:
        return "sdxl_base_v1-0"  # also for v-prediction models, as kohya writes it

    def metadata(self, args) -> dict[str, str]:
        return {"ss_v2": "False", "ss_base_model_version": self.base_model_version(args)}

    def modelspec(self, args, timestamp: float) -> dict[str, str]:
        from library.training.metadata import modelspec_metadata

        return modelspec_metadata(args, architecture="stable-diffusion-xl-v1-base/lora",
                                  implementation=MODELSPEC_IMPLEMENTATION,
                                  resolution=parse_resolution(args.resolution, 1024),
                                  prediction_type="v" if args.v_parameterization else "epsilon",
                                  timestamp=timestamp, title_default=f"LoRA@{int(timestamp)}")

    def sample_defaults(self, args):
        from library.sampling.prompts import PromptDefaults

        # kohya's SDXL previews default to 512 x 512 as SD's do (sample files nearly always set --w/--h).
        return PromptDefaults(width=512, height=512, steps=30, scale=7.5, sampler=args.sample_sampler)

    def sample_image(self, models: FamilyModels, prompt, generator, args, device, dtype):
        from library.families.sdxl.generation import SDXLSampler

        sampler = SDXLSampler.for_models(models, max_token_length=args.max_token_length)
        prompt = self.preview_control(models, sampler, prompt, device, dtype)
        return sampler.generate(prompt, sampler_name=prompt.sampler or args.sample_sampler,
                                v_parameterization=args.v_parameterization, generator=generator,
                                device=device, dtype=models.denoiser.dtype)
