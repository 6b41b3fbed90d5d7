"""Generate images with FLUX.1 dev/schnell or Chroma and optional LoRAs (kohya-ss/sd-scripts' flags).

    python flux_minimal_inference.py --ckpt_path flux1-dev.safetensors --clip_l clip_l.safetensors \
        --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors --tokenizer_cache_dir tokenizers \
        --prompt "a photo of sks dog" --steps 28 --guidance 3.5 --seed 1 --output_dir outputs \
        --lora_weights my_flux_lora.safetensors;0.9

Images are written as ``<output_dir>/flux_<YYYYmmdd_HHMMSS>_<seed>.png`` with the prompt and the
settings in PNG text chunks. Chroma: ``--model_type chroma`` without ``--clip_l``, with real CFG
(``--cfg_scale 4 --negative_prompt "..."``); ``--guidance`` defaults to 0 for it. See
docs/flux_train_network.md.
"""

from __future__ import annotations

import argparse
import sys

from library.args import add_minimal_inference_arguments

DTYPES = ["float32", "float16", "bfloat16", "fp32", "fp16", "bf16"]


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate images with FLUX.1 (dev/schnell) or Chroma and LoRAs")
    p.add_argument("--ckpt_path", type=str, required=True, help="FLUX or Chroma DiT file (.safetensors)")
    p.add_argument("--model_type", type=str, default="flux", choices=["flux", "chroma"],
                   help="flux: FLUX.1 dev/schnell (needs --clip_l); chroma: Chroma (T5 only)")
    p.add_argument("--clip_l", type=str, default=None, help="CLIP-L text encoder file (FLUX.1 only)")
    p.add_argument("--t5xxl", type=str, required=True, help="T5-XXL text encoder file")
    p.add_argument("--ae", type=str, required=True, help="FLUX autoencoder file (ae.safetensors)")
    p.add_argument("--tokenizer_cache_dir", type=str, default=None,
                   help="folder holding google_t5-v1_1-xxl (the T5 tokenizer) for offline use")
    p.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding tokens (as in training)")
    p.add_argument("--t5xxl_max_token_length", type=int, default=None,
                   help="T5 tokens (default 512 for dev and Chroma, 256 for schnell)")
    p.add_argument("--prompt", type=str, default="A photo of a cat", help="prompt")
    p.add_argument("--negative_prompt", type=str, default="", help="negative prompt (used when --cfg_scale != 1)")
    p.add_argument("--cfg_scale", type=float, default=1.0, help="classifier-free guidance scale (1.0 = off)")
    p.add_argument("--guidance", type=float, default=None,
                   help="embedded guidance of FLUX.1 dev (default 3.5) or Chroma's (default 0)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 4 for schnell, 50 for dev)")
    p.add_argument("--seed", type=int, default=None, help="random seed (random if unset)")
    p.add_argument("--width", type=int, default=1024, help="image width (multiple of 16)")
    p.add_argument("--height", type=int, default=1024, help="image height (multiple of 16)")
    p.add_argument("--output_dir", type=str, default=".", help="where images are written")
    p.add_argument("--dtype", type=str, default="bfloat16", choices=DTYPES, help="dtype of every model")
    for name in ("clip_l", "t5xxl", "ae", "flux"):
        p.add_argument(f"--{name}_dtype", type=str, default=None, choices=DTYPES,
                       help=f"dtype of the {name} model (default --dtype)")
    p.add_argument("--device", type=str, default=None, help="device (default cuda when available, else cpu)")
    p.add_argument("--offload", action="store_true",
                   help="keep each model on the CPU except while it runs (less VRAM, slower)")
    add_minimal_inference_arguments(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    if args.model_type == "flux" and not args.clip_l:
        raise SystemExit("error: --clip_l is required for FLUX.1 (only --model_type chroma has no CLIP-L)")
    from library.families.sd.checkpoint.common import CheckpointError
    from library.generation.flux import run  # torch loads only once the flags are good

    try:
        run(args)
    except CheckpointError as e:  # a file of another model (e.g. Chroma without --model_type chroma)
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
