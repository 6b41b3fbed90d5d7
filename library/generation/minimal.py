"""The shared loop of the minimal inference scripts (``flux_minimal_inference.py``,
``sd3_minimal_inference.py``): prompts -> seeded images through a family sampler -> PNG files.

A family provides a sampler object with ``generate(prompt, *, generator, device, dtype)`` (the same
object its training previews use) and the models to move when ``--offload`` is on; this module does
the rest: ``--interactive`` prompts, seeds, ``--offload``, file names, PNG text chunks, LoRA flags.
"""

from __future__ import annotations

import datetime
import logging
import random
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_lora_weight(text: str) -> tuple[str, float]:
    """``"path"`` or ``"path;multiplier"`` -> (path, multiplier)."""
    path, _, mult = text.partition(";")
    try:
        return path, float(mult) if mult.strip() else 1.0
    except ValueError:
        raise SystemExit(f"error: --lora_weights {text!r}: the multiplier after ';' must be a number") from None


def apply_loras(lora_weights: Sequence[str] | None, merge: bool, create_from_weights: Callable, text_encoders: list,
                denoiser: torch.nn.Module) -> list:
    """Load each ``--lora_weights`` file and merge it (``--merge_lora_weights``) or hook it in.

    ``create_from_weights`` is the family network module's ``create_network_from_weights``. Returns
    the hooked networks (they must travel with the models under ``--offload``).
    """
    hooked = []
    for item in lora_weights or []:
        path, multiplier = parse_lora_weight(item)
        if not Path(path).is_file():
            raise SystemExit(f"error: --lora_weights {path}: no such file")
        network, _ = create_from_weights(multiplier, path, None, text_encoders, denoiser, for_inference=True)
        if merge:
            network.merge_to()
            logger.info("merged %s (x%g)", path, multiplier)
        else:
            network.apply_to(text_encoders, denoiser, apply_text_encoder=True, apply_unet=True)
            # The modules are float32 beside models in another dtype: cast them alike.
            param = next(denoiser.parameters())
            network.to(param.device, dtype=param.dtype)
            hooked.append(network)
            logger.info("applied %s (x%g)", path, multiplier)
    return hooked


def place(models: Sequence[torch.nn.Module | None], device: torch.device) -> None:
    for model in models:
        if model is not None:
            model.to(device).eval().requires_grad_(False)


def generate_images(args, sampler, *, models: Sequence[torch.nn.Module | None], device: torch.device,
                    dtype: torch.dtype, steps: int, prefix: str, extra_fields: dict[str, Any] | None = None,
                    prompt_fields: dict[str, Any] | None = None) -> list[Path]:
    """Generate one image per prompt (``--prompt``, or each line of standard input with ``--interactive``).

    ``models`` are moved to ``device`` only around each image with ``--offload``. Files are
    ``<output_dir>/<prefix>_<YYYYmmdd_HHMMSS>_<seed>.png`` (``_<n>`` added within one second).
    """
    from library.generation.images import png_text_fields, save_image
    from library.sampling.prompts import SamplePrompt

    if args.width % 16 or args.height % 16:
        raise SystemExit(f"error: --width {args.width} / --height {args.height} must be multiples of 16")
    prompts = (line.strip() for line in sys.stdin) if args.interactive else iter([args.prompt])
    out_dir = Path(args.output_dir)
    written = []
    for text in prompts:
        if not text:
            continue
        seed = args.seed if args.seed is not None else random.randint(0, 2**31 - 1)
        prompt = SamplePrompt(prompt=text, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
                              seed=seed, steps=steps, scale=args.cfg_scale, **(prompt_fields or {}))
        generator = torch.Generator("cpu").manual_seed(seed)
        if args.offload:
            place(models, device)
        try:
            with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
                image = sampler.generate(prompt, generator=generator, device=device, dtype=dtype)
        finally:
            if args.offload:
                place(models, torch.device("cpu"))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        path = out_dir / f"{prefix}_{stamp}_{seed}.png"
        n = 1
        while path.exists():
            path = out_dir / f"{prefix}_{stamp}_{seed}_{n}.png"
            n += 1
        fields = png_text_fields(prompt=text, seed=seed, sampler="euler (flow)", steps=steps, scale=args.cfg_scale,
                                 negative_prompt=args.negative_prompt, negative_scale=None, width=args.width,
                                 height=args.height, extra=extra_fields)
        written.append(save_image(image, path, fields))
        logger.info("wrote %s", path)
    return written


def default_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
