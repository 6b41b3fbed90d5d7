"""The generation run behind ``lumina_minimal_inference.py``: load, apply LoRAs, generate, save.

Images come from :class:`library.families.lumina.generation.LuminaSampler`, the same object training
previews use, so a preview and an inference run with the same prompt, seed and settings agree. The
loop (``--interactive`` prompts, ``--offload``, seeds, PNG text chunks, file names
``<output_dir>/image_<YYYYmmdd_HHMMSS>_<seed>.png``) is :func:`library.generation.minimal.generate_images`'s.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from library.generation.minimal import DTYPES, apply_loras, default_device, generate_images, place
from library.log import setup_logging

logger = logging.getLogger(__name__)

#: the reference's dtype names (``float`` included) -> torch dtypes
INFERENCE_DTYPES = {**DTYPES, "float": torch.float32}


def load_sampler(args, device: torch.device):
    """The LuminaSampler of the flags with the LoRAs applied or merged, and the hooked networks."""
    import networks.lora_lumina as lora_lumina
    from library.families.lumina.generation import LuminaSampler
    from library.families.lumina.loading import load_lumina_models

    loaded = load_lumina_models(args.pretrained_model_name_or_path, gemma2_path=args.gemma2_path, ae_path=args.ae_path,
                                tokenizer_cache_dir=args.tokenizer_cache_dir, dtype=INFERENCE_DTYPES[args.dtype])
    gemma2 = loaded.gemma2.to(INFERENCE_DTYPES[args.gemma2_dtype])
    ae = loaded.ae.to(INFERENCE_DTYPES[args.ae_dtype])
    place([loaded.dit, gemma2, ae], torch.device("cpu") if args.offload else device)
    networks = apply_loras(args.lora_weights, args.merge_lora_weights, lora_lumina.create_network_from_weights,
                           [gemma2], loaded.dit)
    sampler = LuminaSampler(loaded.dit, ae, gemma2, loaded.tokenizer, max_length=args.gemma2_max_token_length,
                            system_prompt=args.system_prompt,
                            system_prompt_on_negative=args.add_system_prompt_to_negative_prompt,
                            shift=args.discrete_flow_shift)
    return sampler, networks


def run(args) -> list[Path]:
    """Generate one image per prompt (``--prompt``, or each line of standard input with ``--interactive``)."""
    setup_logging(args)
    device = default_device(args.device)
    sampler, networks = load_sampler(args, device)
    # The shared loop reads the generic names (width, height, cfg_scale) of the FLUX/SD3 scripts.
    loop_args = argparse.Namespace(**vars(args), width=args.image_width, height=args.image_height,
                                   cfg_scale=args.guidance_scale)
    return generate_images(loop_args, sampler, models=[sampler.dit, sampler.gemma2, sampler.ae, *networks],
                           device=device, dtype=INFERENCE_DTYPES[args.dtype], steps=args.steps, prefix="image",
                           extra_fields={"cfg_trunc_ratio": args.cfg_trunc_ratio, "renorm_cfg": args.renorm_cfg,
                                         "flow_shift": args.discrete_flow_shift},
                           prompt_fields={"cfg_trunc_ratio": args.cfg_trunc_ratio, "renorm_cfg": args.renorm_cfg,
                                          "flow_shift": args.discrete_flow_shift})
