"""Chroma as a model family of the shared training loop (``flux_train_network.py --model_type chroma``).

Chroma is FLUX.1 in everything the loop sees (16-channel AE latents in 2x2 patches, T5-XXL text,
rectified flow, the same flags, latent and text-encoder cache files) except:

* the DiT (:class:`~library.families.flux.chroma.Chroma`) and its file check; no CLIP-L (``--clip_l``
  is not needed; the cached ``l_pooled`` is zeros, as the reference's stand-in CLIP-L gives);
* the T5 attention mask is always applied (the reference requires ``--apply_t5_attn_mask``; here a
  missing flag is switched on, with a log line);
* ``--guidance_scale`` defaults to 0.0 (Chroma is not guidance-distilled), previews to ``--g 0``;
* metadata: ``ss_base_model_version`` / ``modelspec.architecture`` ``chroma``, implementation
  ``https://huggingface.co/lodestones/Chroma``.

LoRA modules are FLUX's (``networks.lora_flux``: every Linear of the double and single blocks); the
approximator is not a target, as in the reference; T5 modules with ``train_t5xxl=True``.
"""

from __future__ import annotations

import functools
import logging

from library.args import ArgumentError
from library.families.base import FamilyModels
from library.families.dit_family import network_arg_true
from library.families.flux import text as flux_text
from library.families.flux.family import FluxFamily

logger = logging.getLogger(__name__)

MODELSPEC_IMPLEMENTATION = "https://huggingface.co/lodestones/Chroma"
#: the T5 length Chroma trains with (the reference's default for every model but schnell)
CHROMA_T5_MAX_LENGTH = 512


class ChromaFamily(FluxFamily):
    family_label = "Chroma"
    modelspec_implementation = MODELSPEC_IMPLEMENTATION
    model_type = "chroma"
    required_files = ("ae", "t5xxl")
    default_guidance_scale = 0.0
    clip_skip_note = "it conditions on T5 alone (no CLIP-L)"

    # --- set-up --------------------------------------------------------------------------------
    def validate_args(self, args) -> None:
        if args.clip_l:
            logger.warning("--clip_l is ignored for Chroma: it has no CLIP-L text encoder")
        if not args.apply_t5_attn_mask:
            logger.info("--model_type chroma: applying the T5 attention mask (Chroma needs --apply_t5_attn_mask)")
            args.apply_t5_attn_mask = True
        super().validate_args(args)
        if args.guidance_scale != 0.0:
            logger.warning("--guidance_scale %s: Chroma is trained with guidance 0.0 (the reference docs require "
                           "0.0)", args.guidance_scale)
        if getattr(args, "network_train_text_encoder_only", False) and not network_arg_true(args, "train_t5xxl"):
            raise ArgumentError("--network_train_text_encoder_only: Chroma has no CLIP-L, so only T5 can be trained; "
                                "add --network_args train_t5xxl=True")

    # --- loading -------------------------------------------------------------------------------
    def load_models(self, args, device, weight_dtype) -> FamilyModels:
        from library.families.flux.chroma_loading import load_chroma_dit
        from library.families.flux.loading import load_flux_models
        from library.training.flow_matching import FlowMatchingObjective

        loaded = load_flux_models(args.pretrained_model_name_or_path, ae_path=args.ae, clip_l_path=None,
                                  t5_path=args.t5xxl, tokenizer_cache_dir=args.tokenizer_cache_dir, dtype=weight_dtype,
                                  mmap=not args.disable_mmap_load_safetensors, load_dit=load_chroma_dit)
        self.guidance_embed = loaded.config.guidance_embed
        if args.t5xxl_max_token_length is None:
            args.t5xxl_max_token_length = CHROMA_T5_MAX_LENGTH
        objective = FlowMatchingObjective(self._flow_config(args))
        return FamilyModels(denoiser=loaded.flux, vae=loaded.ae, text_encoders=[loaded.t5],
                            tokenizers=[loaded.t5_tokenizer], extra={"objective": objective, "flux": loaded})

    def make_tokenize_fn(self, models: FamilyModels, args):
        return functools.partial(flux_text.tokenize, None, models.tokenizers[0],
                                 t5_max_length=args.t5xxl_max_token_length)

    def _t5_encoder(self, models: FamilyModels):
        return models.text_encoders[0]

    def _encoders(self, models: FamilyModels):
        return None, models.text_encoders[0]

    def _tokenizers(self, models: FamilyModels):
        return None, models.tokenizers[0]

    # --- output --------------------------------------------------------------------------------
    def metadata(self, args) -> dict[str, str]:
        return {**super().metadata(args), "ss_base_model_version": "chroma"}

    def _modelspec_architecture(self) -> str:
        return "chroma"

    def sample_defaults(self, args):
        from library.families.flux.generation import chroma_prompt_defaults

        return chroma_prompt_defaults(args.sample_sampler)

    def network_text_encoders(self, models: FamilyModels):
        return [None, models.text_encoders[0]]  # the file format's slots: no CLIP-L (lora_te1_), T5 (lora_te3_)
