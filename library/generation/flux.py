"""The FLUX.1 / Chroma generation run behind ``flux_minimal_inference.py``: load, apply LoRAs, generate, save.

Images come from :class:`library.families.flux.generation.FluxSampler`, the same object training
previews use, so a preview and an inference run with the same prompt, seed and settings agree.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from library.generation.minimal import DTYPES, apply_loras, default_device, generate_images, place
from library.log import setup_logging

logger = logging.getLogger(__name__)


def _dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    return default if name is None else DTYPES[name]


def load_sampler(args, device: torch.device):
    """The FluxSampler of the flags with the LoRAs applied or merged, and the hooked networks."""
    import networks.lora_flux as lora_flux
    from library.families.flux import text as flux_text
    from library.families.flux.generation import FluxSampler
    from library.families.flux.loading import load_flux_models

    dtype = DTYPES[args.dtype]
    chroma = args.model_type == "chroma"
    extra = {}
    if chroma:  # T5 only, always masked (as Chroma is trained)
        from library.families.flux.chroma_loading import load_chroma_dit

        extra = {"load_dit": load_chroma_dit}
        args.apply_t5_attn_mask = True
    loaded = load_flux_models(args.ckpt_path, ae_path=args.ae, clip_l_path=None if chroma else args.clip_l,
                              t5_path=args.t5xxl, tokenizer_cache_dir=args.tokenizer_cache_dir,
                              dtype=_dtype(args.flux_dtype, dtype), **extra)
    clip_l = loaded.clip_l.to(_dtype(args.clip_l_dtype, dtype)) if loaded.clip_l is not None else None
    t5 = loaded.t5.to(_dtype(args.t5xxl_dtype, dtype))
    ae = loaded.ae.to(_dtype(args.ae_dtype, dtype))
    place([loaded.flux, clip_l, t5, ae], torch.device("cpu") if args.offload else device)
    networks = apply_loras(args.lora_weights, args.merge_lora_weights, lora_flux.create_network_from_weights,
                           [clip_l, t5], loaded.flux)
    t5_length = args.t5xxl_max_token_length or flux_text.default_t5_max_length(loaded.flux.config.guidance_embed)
    sampler = FluxSampler(loaded.flux, ae, clip_l, t5, loaded.clip_tokenizer, loaded.t5_tokenizer,
                          t5_max_length=t5_length, apply_t5_attn_mask=args.apply_t5_attn_mask)
    return sampler, networks


def run(args) -> list[Path]:
    """Generate one image per prompt (``--prompt``, or each line of standard input with ``--interactive``)."""
    setup_logging(args)
    device = default_device(args.device)
    sampler, networks = load_sampler(args, device)
    if args.guidance is None:  # Chroma is trained with guidance 0, FLUX.1 dev is distilled at 3.5
        args.guidance = 0.0 if args.model_type == "chroma" else 3.5
    steps = args.steps or (50 if sampler.flux.config.guidance_embed else 4)
    return generate_images(args, sampler, models=[sampler.flux, sampler.clip_l, sampler.t5, sampler.ae, *networks],
                           device=device, dtype=_dtype(args.flux_dtype, DTYPES[args.dtype]), steps=steps,
                           prefix="flux", extra_fields={"guidance": args.guidance},
                           prompt_fields={"guidance_scale": args.guidance})
