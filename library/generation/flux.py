"""The FLUX.1 generation run behind ``flux_minimal_inference.py``: load, apply LoRAs, generate, save.

Images come from :class:`library.families.flux.generation.FluxSampler`, the same object training
previews use, so a preview and an inference run with the same prompt, seed and settings agree.
"""

from __future__ import annotations

import datetime
import logging
import random
import sys
from pathlib import Path

import torch

from library.log import setup_logging

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_lora_weight(text: str) -> tuple[str, float]:
    """``"path"`` or ``"path;multiplier"`` -> (path, multiplier)."""
    path, _, mult = text.partition(";")
    try:
        return path, float(mult) if mult.strip() else 1.0
    except ValueError:
        raise SystemExit(f"error: --lora_weights {text!r}: the multiplier after ';' must be a number") from None


def _dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    return default if name is None else _DTYPES[name]


def load_sampler(args, device: torch.device):
    """The FluxSampler of the flags, LoRAs applied or merged."""
    from library.families.flux import text as flux_text
    from library.families.flux.generation import FluxSampler
    from library.families.flux.loading import load_flux_models

    dtype = _DTYPES[args.dtype]
    loaded = load_flux_models(args.ckpt_path, ae_path=args.ae, clip_l_path=args.clip_l, t5_path=args.t5xxl,
                              tokenizer_cache_dir=args.tokenizer_cache_dir, dtype=_dtype(args.flux_dtype, dtype))
    flux = loaded.flux.to(_dtype(args.flux_dtype, dtype))
    clip_l = loaded.clip_l.to(_dtype(args.clip_l_dtype, dtype))
    t5 = loaded.t5.to(_dtype(args.t5xxl_dtype, dtype))
    ae = loaded.ae.to(_dtype(args.ae_dtype, dtype))
    home = torch.device("cpu") if args.offload else device
    for model in (flux, clip_l, t5, ae):
        model.to(home).eval().requires_grad_(False)
    networks = apply_loras(args, flux, clip_l, t5)
    t5_length = args.t5xxl_max_token_length or flux_text.default_t5_max_length(flux.config.guidance_embed)
    sampler = FluxSampler(flux, ae, clip_l, t5, loaded.clip_tokenizer, loaded.t5_tokenizer, t5_max_length=t5_length,
                          apply_t5_attn_mask=args.apply_t5_attn_mask)
    return sampler, networks


def apply_loras(args, flux, clip_l, t5) -> list:
    """Load each ``--lora_weights`` file and merge it, or hook it in; returns the hooked networks."""
    import networks.lora_flux as lora_flux

    hooked = []
    for item in args.lora_weights or []:
        path, multiplier = parse_lora_weight(item)
        if not Path(path).is_file():
            raise SystemExit(f"error: --lora_weights {path}: no such file")
        network, _ = lora_flux.create_network_from_weights(multiplier, path, None, [clip_l, t5], flux,
                                                           for_inference=True)
        if args.merge_lora_weights:
            network.merge_to()
            logger.info("merged %s (x%g)", path, multiplier)
        else:
            network.apply_to([clip_l, t5], flux, apply_text_encoder=True, apply_unet=True)
            # The modules stay in float32 beside models in another dtype: cast them alike.
            network.to(next(flux.parameters()).device, dtype=next(flux.parameters()).dtype)
            hooked.append(network)
            logger.info("applied %s (x%g)", path, multiplier)
    return hooked


class _Offloaded:
    """Runs each model on the device only while it is used (``--offload``)."""

    def __init__(self, sampler, networks: list, device: torch.device, enabled: bool):
        self.sampler, self.device, self.enabled = sampler, device, enabled
        self.models = [sampler.flux, sampler.clip_l, sampler.t5, sampler.ae, *networks]

    def generate(self, prompt, generator, dtype):
        s = self.sampler
        if not self.enabled:
            return s.generate(prompt, generator=generator, device=self.device, dtype=dtype)
        for model in self.models:
            model.to(self.device)
        try:
            return s.generate(prompt, generator=generator, device=self.device, dtype=dtype)
        finally:
            for model in self.models:
                model.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def run(args) -> list[Path]:
    """Generate one image per prompt (``--prompt``, or each line of standard input with ``--interactive``)."""
    setup_logging(args)
    from library.generation.images import png_text_fields, save_image
    from library.sampling.prompts import SamplePrompt

    if args.width % 16 or args.height % 16:
        raise SystemExit(f"error: --width {args.width} / --height {args.height} must be multiples of 16")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sampler, networks = load_sampler(args, device)
    runner = _Offloaded(sampler, networks, device, args.offload)
    steps = args.steps or (50 if sampler.flux.config.guidance_embed else 4)
    dtype = _dtype(args.flux_dtype, _DTYPES[args.dtype])
    prompts = (line.strip() for line in sys.stdin) if args.interactive else iter([args.prompt])
    written = []
    out_dir = Path(args.output_dir)
    for text in prompts:
        if not text:
            continue
        seed = args.seed if args.seed is not None else random.randint(0, 2**31 - 1)
        prompt = SamplePrompt(prompt=text, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
                              seed=seed, steps=steps, scale=args.cfg_scale, guidance_scale=args.guidance)
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            image = runner.generate(prompt, generator, dtype)
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        path = out_dir / f"flux_{stamp}_{seed}.png"
        n = 1
        while path.exists():  # several images within one second
            path = out_dir / f"flux_{stamp}_{seed}_{n}.png"
            n += 1
        fields = png_text_fields(prompt=text, seed=seed, sampler="euler (flow)", steps=steps, scale=args.cfg_scale,
                                 negative_prompt=args.negative_prompt, negative_scale=None, width=args.width,
                                 height=args.height, extra={"guidance": args.guidance})
        written.append(save_image(image, path, fields))
        logger.info("wrote %s", path)
    return written
