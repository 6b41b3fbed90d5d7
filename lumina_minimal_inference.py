"""Generate images with Lumina-Image 2.0 and optional LoRAs (kohya-ss/sd-scripts' flags).

    python lumina_minimal_inference.py --pretrained_model_name_or_path lumina_2_model_bf16.safetensors \
        --gemma2_path gemma_2_2b_fp16.safetensors --ae_path ae.safetensors --tokenizer_cache_dir tokenizers \
        --prompt "a photo of sks dog" --steps 36 --guidance_scale 3.5 --seed 1 --output_dir outputs \
        --lora_weights my_lumina_lora.safetensors;0.9

Images are written as ``<output_dir>/image_<YYYYmmdd_HHMMSS>_<seed>.png`` with the prompt and the
settings in PNG text chunks. See docs/lumina_train_network.md.
"""

from __future__ import annotations

import argparse
import sys

from library.args import add_minimal_inference_arguments

DTYPES = ["float", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16"]


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate images with Lumina-Image 2.0 and LoRAs")
    p.add_argument("--pretrained_model_name_or_path", type=str, required=True, help="Lumina DiT single file")
    p.add_argument("--gemma2_path", type=str, required=True, help="Gemma-2 text encoder (file or transformers folder)")
    p.add_argument("--ae_path", type=str, required=True, help="FLUX.1 autoencoder file (ae.safetensors)")
    p.add_argument("--tokenizer_cache_dir", type=str, default=None,
                   help="folder holding google_gemma-2-2b (the Gemma tokenizer) for offline use")
    p.add_argument("--prompt", type=str, default="A beautiful sunset over the mountains", help="prompt")
    p.add_argument("--negative_prompt", type=str, default="", help="negative prompt (default empty)")
    p.add_argument("--output_dir", type=str, default="outputs", help="where images are written")
    p.add_argument("--seed", type=int, default=None, help="random seed (random if unset)")
    p.add_argument("--steps", type=int, default=36, help="sampling steps")
    p.add_argument("--guidance_scale", type=float, default=3.5, help="classifier-free guidance scale (1.0 = off)")
    p.add_argument("--image_width", type=int, default=1024, help="image width (multiple of 16)")
    p.add_argument("--image_height", type=int, default=1024, help="image height (multiple of 16)")
    p.add_argument("--dtype", type=str, default="bf16", choices=DTYPES, help="dtype of the DiT")
    p.add_argument("--gemma2_dtype", type=str, default="bf16", choices=DTYPES, help="dtype of Gemma-2")
    p.add_argument("--ae_dtype", type=str, default="bf16", choices=DTYPES, help="dtype of the autoencoder")
    p.add_argument("--device", type=str, default=None, help="device (default cuda when available, else cpu)")
    p.add_argument("--offload", action="store_true",
                   help="keep the models on the CPU except while an image is made (less VRAM, slower)")
    p.add_argument("--system_prompt", type=str, default="",
                   help="text put before the prompt as '<system prompt> <Prompt Start> <prompt>'")
    p.add_argument("--add_system_prompt_to_negative_prompt", action="store_true",
                   help="put the system prompt before the negative prompt too")
    p.add_argument("--gemma2_max_token_length", type=int, default=256, help="Gemma-2 tokens per prompt")
    p.add_argument("--discrete_flow_shift", type=float, default=6.0, help="shift of the sampling schedule")
    p.add_argument("--cfg_trunc_ratio", type=float, default=0.25,
                   help="guidance only while the Lumina time (0 = noise) is below this (0.25: the noisiest quarter)")
    p.add_argument("--renorm_cfg", type=float, default=1.0,
                   help="limit the guided output's norm to this times the conditional one's (0 = off)")
    p.add_argument("--use_flash_attn", action="store_true", help="accepted for compatibility: attention runs on SDPA")
    p.add_argument("--use_sage_attn", action="store_true", help="accepted for compatibility: attention runs on SDPA")
    add_minimal_inference_arguments(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    if args.gemma2_max_token_length < 1:
        raise SystemExit(f"error: --gemma2_max_token_length {args.gemma2_max_token_length} must be 1 or more")
    from library.families.lumina.inference import run  # torch loads only once the flags are good
    from library.families.sd.checkpoint.common import CheckpointError

    try:
        run(args)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
