"""``gen_img.py`` command line: kohya-compatible flag names and defaults (SD 1.x/2.x, SDXL).

Importing this module is cheap (argparse only), so ``--help`` and flag errors are instant.
Flags of the reference that are not implemented yet are deliberately absent (argparse rejects
them); ``docs/gen_img.md`` lists them.
"""

from __future__ import annotations

import argparse

from library.args import add_logging_arguments
from library.generation.clip_vision import DEFAULT_CLIP_VISION_MODEL

# Every reference sampler name (kept in sync with library.sampling.schedulers.SAMPLER_NAMES, which
# imports diffusers and so cannot be imported here; tests check that the two agree).
SAMPLER_CHOICES = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)


SDXL_SIZE_FLAGS = ("original_width", "original_height", "original_width_negative", "original_height_negative",
                   "crop_top", "crop_left")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gen_img.py",
        description="Generate images with Stable Diffusion 1.x/2.x or SDXL (txt2img, img2img, inpaint, hires fix, "
                    "LoRA, textual inversion). See docs/gen_img.md.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--ckpt", type=str, default=None, help="model: .safetensors/.ckpt single file or Diffusers folder")
    m.add_argument("--v1", action="store_true", help="SD 1.x model (the default)")
    m.add_argument("--v2", action="store_true", help="SD 2.x model")
    m.add_argument("--sdxl", action="store_true", help="SDXL base model")
    m.add_argument("--v_parameterization", action="store_true", help="the model predicts v (SD 2.x 768-v models)")
    m.add_argument("--zero_terminal_snr", action="store_true", help="rescale the noise schedule to zero terminal SNR")
    m.add_argument("--vae", type=str, default=None, help="replace the model's VAE (single file or Diffusers folder)")
    m.add_argument("--tokenizer_cache_dir", type=str, default=None, help="folder with cached tokenizers (offline)")
    m.add_argument("--fp16", action="store_true", help="run in float16")
    m.add_argument("--bf16", action="store_true", help="run in bfloat16")
    m.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 with --fp16/--bf16")
    m.add_argument("--xformers", action="store_true", help="xformers attention (needs the xformers package)")
    m.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default anyway)")

    o = p.add_argument_group("prompts and output")
    o.add_argument("--outdir", type=str, default="outputs", help="output folder (default: outputs)")
    o.add_argument("--prompt", type=str, default=None, help="prompt (with in-prompt options ' --n ... --d ...')")
    o.add_argument("--from_file", type=str, default=None, help="read prompts from a file, one per line")
    o.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line, until EOF")
    o.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt (default: 1)")
    o.add_argument("--n_iter", type=int, default=1, help="repeat the whole prompt list this many times (default: 1)")
    o.add_argument("--batch_size", type=int, default=1, help="images denoised together (default: 1)")
    o.add_argument("--W", type=int, default=512, help="image width (default: 512)")
    o.add_argument("--H", type=int, default=512, help="image height (default: 512)")
    o.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    o.add_argument("--sampler", type=str, default="ddim", choices=SAMPLER_CHOICES, help="sampler (default: ddim)")
    o.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    o.add_argument("--negative_scale", type=float, default=None,
                   help="separate guidance scale for the negative prompt (default: negative prompt is the uncond)")
    o.add_argument("--seed", type=int, default=None, help="seed; per-image seeds are derived from it")
    o.add_argument("--iter_same_seed", action="store_true", help="use the same seeds in every --n_iter iteration")
    o.add_argument("--shuffle_prompts", action="store_true", help="shuffle the prompt order in each iteration")
    o.add_argument("--clip_skip", type=int, default=None,
                   help="use the output of the k-th text encoder layer from the end (default: 1; SDXL: always 2)")
    o.add_argument("--max_embeddings_multiples", type=int, default=None,
                   help="longest prompt in 75-token chunks (default: 1, i.e. 75 tokens; the rest is cut)")
    o.add_argument("--emb_normalize_mode", type=str, default="original", choices=("original", "abs", "none"),
                   help="how weighted embeddings are renormalized (default: original)")
    o.add_argument("--sequential_file_name", action="store_true", help="name outputs im_000001.png, im_000002.png, ...")
    o.add_argument("--use_original_file_name", action="store_true", help="img2img: name outputs like their input image")

    x = p.add_argument_group("SDXL size conditioning (in a prompt: --ow --oh --nw --nh --ct --cl)")
    x.add_argument("--original_width", type=int, default=None, help="original width (default: the image width)")
    x.add_argument("--original_height", type=int, default=None, help="original height (default: the image height)")
    x.add_argument("--original_width_negative", type=int, default=None,
                   help="original width for the negative prompt (default: --original_width)")
    x.add_argument("--original_height_negative", type=int, default=None,
                   help="original height for the negative prompt (default: --original_height)")
    x.add_argument("--crop_top", type=int, default=None, help="crop top (default: 0)")
    x.add_argument("--crop_left", type=int, default=None, help="crop left (default: 0)")

    n = p.add_argument_group("networks and embeddings")
    n.add_argument("--network_module", type=str, default=None, nargs="*", help="network module per network (networks.lora)")
    n.add_argument("--network_weights", type=str, default=None, nargs="*", help="weights file per network")
    n.add_argument("--network_mul", type=float, default=None, nargs="*", help="multiplier per network (default: 1.0)")
    n.add_argument("--network_args", type=str, default=None, nargs="*",
                   help="per network: 'key=value;key=value' arguments for create_network_from_weights")
    n.add_argument("--network_merge", action="store_true", help="merge the networks into the model weights")
    n.add_argument("--network_show_meta", action="store_true", help="print each network file's metadata")
    n.add_argument("--textual_inversion_embeddings", type=str, default=None, nargs="*",
                   help="textual inversion embedding files (.pt/.safetensors); the file name is the token")

    i = p.add_argument_group("img2img / inpainting")
    i.add_argument("--image_path", type=str, default=None, help="init image file or folder (img2img)")
    i.add_argument("--mask_path", type=str, default=None, help="inpainting mask file or folder (white = repaint)")
    i.add_argument("--strength", type=float, default=0.8, help="img2img strength 0..1 (default: 0.8)")
    i.add_argument("--clip_vision_strength", type=float, default=None, metavar="S",
                   help="SDXL img2img: the init image's CLIP-Vision embedding times this replaces the prompt's pooled "
                        "text embedding (e.g. 1.0); needs --sdxl and --image_path")
    i.add_argument("--clip_vision_model", type=str, default=None, metavar="PATH_OR_ID",
                   help="CLIP vision model (with projection) for --clip_vision_strength: a local folder with "
                        f"config.json and weights, or a hub id in the local Hugging Face cache (default: "
                        f"{DEFAULT_CLIP_VISION_MODEL}; nothing is downloaded)")

    h = p.add_argument_group("hires fix")
    h.add_argument("--highres_fix_scale", type=float, default=None,
                   help="hires fix: first pass (txt2img, --highres_fix_steps steps) at this fraction of --W/--H "
                        "(e.g. 0.5), then img2img at --W x --H with --steps and --strength")
    h.add_argument("--highres_fix_steps", type=int, default=28, help="hires fix: steps of the first pass (default: 28)")
    h.add_argument("--highres_fix_strength", type=float, default=None,
                   help="hires fix: img2img strength of the first pass when it is img2img (with --image_path, not "
                        "supported yet: ignored); the second pass uses --strength")
    h.add_argument("--highres_fix_save_1st", action="store_true", help="hires fix: also save the first-pass image")
    h.add_argument("--highres_fix_latents_upscaling", action="store_true",
                   help="hires fix: upscale the latents instead of the decoded image")
    h.add_argument("--highres_fix_disable_control_net", action="store_true",
                   help="hires fix: run the second (upscaled) pass without ControlNet / ControlNet-LLLite; the first "
                        "pass keeps them")

    c = p.add_argument_group("ControlNet / ControlNet-LLLite (one value per model, in model order)")
    c.add_argument("--control_net_models", type=str, default=None, nargs="*",
                   help="ControlNet files or Diffusers folders (SD 1.x/2.x ControlNet v1.x, or SDXL with --sdxl)")
    c.add_argument("--control_net_lllite_models", type=str, default=None, nargs="*",
                   help="ControlNet-LLLite files (SDXL); cannot be combined with --control_net_models")
    c.add_argument("--control_net_preps", type=str, default=None, nargs="*",
                   help="preprocessing per model: none (default), canny, canny_<low>_<high> (e.g. canny_63_191)")
    c.add_argument("--control_net_multipliers", type=float, default=None, nargs="*",
                   help="strength per model (default: 1.0; 0 switches it off)")
    c.add_argument("--control_net_ratios", type=float, default=None, nargs="*",
                   help="fraction of the steps, from the first, with control per model (default: 1.0)")
    c.add_argument("--guide_image_path", type=str, default=None, nargs="*",
                   help="control (guide) image files or folders, used in order, one per generated image")

    add_logging_arguments(p)
    return p


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject impossible flag combinations with a message naming the flags (``parser.error`` exits 2)."""
    if args.ckpt is None:
        parser.error("--ckpt is required: a .safetensors/.ckpt SD 1.x/2.x/SDXL model file or a Diffusers folder")
    if args.v1 and args.v2:
        parser.error("--v1 and --v2 exclude each other (SD 1.x is the default; add --v2 for SD 2.x only)")
    if args.sdxl and (args.v1 or args.v2):
        parser.error(f"--sdxl and --{'v1' if args.v1 else 'v2'} exclude each other: give --sdxl alone for an SDXL "
                     "model")
    size_flags = [f for f in SDXL_SIZE_FLAGS if getattr(args, f) is not None]
    if size_flags and not args.sdxl:
        parser.error(f"--{size_flags[0]} is SDXL size conditioning: add --sdxl (SDXL model) or drop it")
    for flag in size_flags:
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} must be at least 0, got {getattr(args, flag)}")
    if args.fp16 and args.bf16:
        parser.error("--fp16 and --bf16 exclude each other: pick one")
    sources = [f for f in ("prompt", "from_file", "interactive") if getattr(args, f)]
    if len(sources) > 1:
        parser.error(f"give prompts one way: {', '.join('--' + s for s in sources)} were all given")
    if not sources and args.image_path is None:
        parser.error("no prompt: add --prompt TEXT, --from_file FILE or --interactive")
    for flag in ("images_per_prompt", "n_iter", "batch_size", "steps", "highres_fix_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("W", "H"):
        if getattr(args, flag) < 8:
            parser.error(f"--{flag} must be at least 8, got {getattr(args, flag)}")
    for flag in ("strength", "highres_fix_strength"):
        value = getattr(args, flag)
        if value is not None and not 0.0 <= value <= 1.0:
            parser.error(f"--{flag} must be between 0 and 1, got {value}")
    if args.mask_path and not args.image_path:
        parser.error("--mask_path needs --image_path (the image to inpaint)")
    if args.use_original_file_name and not args.image_path:
        parser.error("--use_original_file_name names outputs after the --image_path inputs: add --image_path")
    if args.highres_fix_scale is not None:
        if not 0.0 < args.highres_fix_scale <= 1.0:
            parser.error(f"--highres_fix_scale is the first pass's fraction of --W/--H, in (0, 1]; got "
                         f"{args.highres_fix_scale} (e.g. 0.5: 512x512 first, then 1024x1024 with --W 1024 --H 1024)")
        if args.image_path:
            parser.error("--highres_fix_scale with --image_path is not supported yet: use one or the other")
    _validate_clip_vision_args(parser, args)
    modules = args.network_module or []
    weights = args.network_weights or []
    if len(modules) != len(weights):
        parser.error(f"--network_module ({len(modules)} given) and --network_weights ({len(weights)} given) need one "
                     "value per network, e.g. --network_module networks.lora networks.lora --network_weights a.safetensors "
                     "b.safetensors")
    for flag in ("network_mul", "network_args"):
        values = getattr(args, flag)
        if values and len(values) > len(modules):
            parser.error(f"--{flag} has {len(values)} values but only {len(modules)} network(s) are given")
    if args.network_merge and not modules:
        parser.error("--network_merge needs networks (--network_module and --network_weights)")
    _validate_control_args(parser, args)


def _validate_clip_vision_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import math

    strength = args.clip_vision_strength
    if strength is None:
        if args.clip_vision_model is not None:
            parser.error("--clip_vision_model is the model of --clip_vision_strength: add --clip_vision_strength "
                         "(e.g. 1.0) or drop --clip_vision_model")
        return
    # Refused here, before any model loads: the reference silently ignores the flag for SD 1.x/2.x.
    if not args.sdxl:
        parser.error("--clip_vision_strength is SDXL CLIP-Vision conditioning: add --sdxl (SDXL model) or drop it")
    if not args.image_path:
        parser.error("--clip_vision_strength conditions on the init image: add --image_path FILE_OR_FOLDER")
    if not math.isfinite(strength) or strength < 0:
        parser.error(f"--clip_vision_strength must be a number of at least 0 (e.g. 1.0), got {strength}")


def _validate_control_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from pathlib import Path

    controlnets, lllites = args.control_net_models or [], args.control_net_lllite_models or []
    if controlnets and lllites:
        parser.error("--control_net_models and --control_net_lllite_models cannot be used together: pick one")
    if lllites and not args.sdxl:
        parser.error("--control_net_lllite_models: ControlNet-LLLite is for SDXL models; add --sdxl")
    models = controlnets or lllites
    for path in models:
        if not Path(path).exists():
            parser.error(f"control model {path}: no such file or folder")
    if models and not args.guide_image_path:
        parser.error("control models need guide images: add --guide_image_path FILE_OR_FOLDER")
    for path in args.guide_image_path or []:
        if not Path(path).exists():
            parser.error(f"--guide_image_path {path}: no such file or folder")
    for flag in ("control_net_preps", "control_net_multipliers", "control_net_ratios"):
        values = getattr(args, flag) or []
        if models and len(values) > len(models):
            parser.error(f"--{flag} has {len(values)} values but only {len(models)} control model(s) are given")
    for ratio in args.control_net_ratios or []:
        if not 0.0 <= ratio <= 1.0:
            parser.error(f"--control_net_ratios {ratio}: the fraction of the steps with control, between 0 and 1")
