"""Generate images with SD3 / SD3.5 and optional LoRAs (kohya-ss/sd-scripts' flags).

    python sd3_minimal_inference.py --ckpt_path sd3.5_medium.safetensors --t5xxl t5xxl_fp16.safetensors \
        --tokenizer_cache_dir tokenizers --prompt "a photo of sks dog" --steps 40 --cfg_scale 5 --seed 1 \
        --bf16 --output_dir outputs --lora_weights my_sd3_lora.safetensors;0.9

Images are written as ``<output_dir>/sd3_<YYYYmmdd_HHMMSS>_<seed>.png`` with the prompt and the
settings in PNG text chunks. See docs/sd3_train_network.md.
"""

from __future__ import annotations

import argparse
import sys

from library.args import add_minimal_inference_arguments


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate images with SD3 / SD3.5 and LoRAs")
    p.add_argument("--ckpt_path", type=str, required=True, help="SD3/SD3.5 checkpoint (.safetensors, SAI layout)")
    p.add_argument("--clip_l", type=str, default=None, help="CLIP-L file (default: from the checkpoint)")
    p.add_argument("--clip_g", type=str, default=None, help="CLIP-G file (default: from the checkpoint)")
    p.add_argument("--t5xxl", type=str, default=None, help="T5-XXL file (default: from the checkpoint)")
    p.add_argument("--vae", type=str, default=None, help="VAE file (default: from the checkpoint)")
    p.add_argument("--tokenizer_cache_dir", type=str, default=None,
                   help="folder holding google_t5-v1_1-xxl (the T5 tokenizer) for offline use")
    p.add_argument("--t5xxl_token_length", type=int, default=256, help="T5 tokens (default 256)")
    p.add_argument("--apply_lg_attn_mask", action="store_true", help="zero CLIP outputs at padding (as in training)")
    p.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding (as in training)")
    p.add_argument("--prompt", type=str, default="A photo of a cat", help="prompt")
    p.add_argument("--negative_prompt", type=str, default="", help="negative prompt")
    p.add_argument("--cfg_scale", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--width", type=int, default=1024, help="image width (multiple of 16)")
    p.add_argument("--height", type=int, default=1024, help="image height (multiple of 16)")
    p.add_argument("--output_dir", type=str, default=".", help="where images are written")
    p.add_argument("--fp16", action="store_true", help="run the models in float16")
    p.add_argument("--bf16", action="store_true", help="run the models in bfloat16")
    p.add_argument("--device", type=str, default=None, help="device (default cuda when available, else cpu)")
    p.add_argument("--offload", action="store_true", help="keep each model on the CPU except while it runs")
    add_minimal_inference_arguments(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    if args.fp16 and args.bf16:
        raise SystemExit("error: --fp16 and --bf16 exclude each other")
    from library.generation.sd3 import run  # torch loads only once the flags are good

    run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
