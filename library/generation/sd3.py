"""The SD3 generation run behind ``sd3_minimal_inference.py``: load, apply LoRAs, generate, save.

Images come from :class:`library.families.sd3.generation.SD3Sampler`, the same object training
previews use.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from library.generation.minimal import apply_loras, default_device, generate_images, place
from library.log import setup_logging

logger = logging.getLogger(__name__)


def load_sampler(args, device: torch.device, dtype: torch.dtype):
    """The SD3Sampler of the flags with the LoRAs applied or merged, and the hooked networks."""
    import networks.lora_sd3 as lora_sd3
    from library.families.sd3.generation import SD3Sampler
    from library.families.sd3.loading import load_sd3_models

    loaded = load_sd3_models(args.ckpt_path, clip_l_path=args.clip_l, clip_g_path=args.clip_g, t5_path=args.t5xxl,
                             vae_path=args.vae, tokenizer_cache_dir=args.tokenizer_cache_dir, dtype=dtype)
    place([loaded.mmdit, loaded.clip_l, loaded.clip_g, loaded.t5, loaded.vae],
          torch.device("cpu") if args.offload else device)
    networks = apply_loras(args.lora_weights, args.merge_lora_weights, lora_sd3.create_network_from_weights,
                           [loaded.clip_l, loaded.clip_g, loaded.t5], loaded.mmdit)
    sampler = SD3Sampler(loaded.mmdit, loaded.vae, loaded.clip_l, loaded.clip_g, loaded.t5,
                         (loaded.clip_l_tokenizer, loaded.clip_g_tokenizer, loaded.t5_tokenizer),
                         t5_max_length=args.t5xxl_token_length, apply_lg_attn_mask=args.apply_lg_attn_mask,
                         apply_t5_attn_mask=args.apply_t5_attn_mask)
    return sampler, networks


def run(args) -> list[Path]:
    setup_logging(args)
    device = default_device(args.device)
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    sampler, networks = load_sampler(args, device, dtype)
    models = [sampler.mmdit, sampler.clip_l, sampler.clip_g, sampler.t5, sampler.vae, *networks]
    return generate_images(args, sampler, models=models, device=device, dtype=dtype, steps=args.steps, prefix="sd3")
