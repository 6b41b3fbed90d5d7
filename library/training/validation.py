"""Checks of flag combinations, run before any model or image is loaded.

Each problem is reported as one line naming the flag and the fix, so a user finds out in a second
rather than after the model has loaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os

from library.args import ArgumentError

logger = logging.getLogger(__name__)


def validate_training_args(args) -> None:
    """Raise :class:`ArgumentError` for the first impossible combination; warn on odd ones."""
    if args.caption_extention is not None:
        args.caption_extension = args.caption_extention  # legacy spelling of the flag
    if not args.pretrained_model_name_or_path:
        raise ArgumentError("--pretrained_model_name_or_path is required (a .safetensors/.ckpt file or a Diffusers folder)")
    if not os.path.exists(args.pretrained_model_name_or_path):
        raise ArgumentError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: no such file or folder")
    if args.output_dir is None:
        raise ArgumentError("--output_dir is required: the folder where the trained files are written")
    if not (args.dataset_config or args.train_data_dir or args.in_json or args.dataset_class):
        raise ArgumentError("no training data: give --dataset_config, --train_data_dir or --in_json")

    if args.full_fp16 and args.mixed_precision != "fp16":
        raise ArgumentError("--full_fp16 needs --mixed_precision fp16")
    if args.full_bf16 and args.mixed_precision != "bf16":
        raise ArgumentError("--full_bf16 needs --mixed_precision bf16")
    if args.full_fp16 and args.full_bf16:
        raise ArgumentError("--full_fp16 and --full_bf16 exclude each other")
    if (args.fp8_base or getattr(args, "fp8_base_unet", False)) and args.mixed_precision == "no":
        raise ArgumentError("--fp8_base needs --mixed_precision fp16 or bf16 (fp8 weights are computed in that dtype)")

    if getattr(args, "network_train_unet_only", False) and getattr(args, "network_train_text_encoder_only", False):
        raise ArgumentError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    if getattr(args, "dim_from_weights", False) and not getattr(args, "network_weights", None):
        raise ArgumentError("--dim_from_weights needs --network_weights")
    if getattr(args, "network_weights", None) and not os.path.isfile(args.network_weights):
        raise ArgumentError(f"--network_weights {args.network_weights}: no such file")

    if args.cache_latents_to_disk:
        args.cache_latents = True  # to-disk caching implies caching
    if args.cache_latents and (args.color_aug or args.random_crop):
        raise ArgumentError("--cache_latents cannot be used with --color_aug or --random_crop "
                            "(latents are encoded once); drop one of them")

    if args.gradient_accumulation_steps < 1:
        raise ArgumentError("--gradient_accumulation_steps must be at least 1")
    if args.train_batch_size < 1:
        raise ArgumentError("--train_batch_size must be at least 1")
    if args.max_train_steps is not None and args.max_train_steps < 1 and not args.max_train_epochs:
        raise ArgumentError("--max_train_steps must be at least 1")

    if args.xformers and importlib.util.find_spec("xformers") is None:
        raise ArgumentError("--xformers: the xformers package is not installed (pip install xformers), "
                            "or drop the flag to use PyTorch SDPA attention")
    if args.resume and not os.path.isdir(args.resume):
        raise ArgumentError(f"--resume {args.resume}: no such state folder (written by --save_state as '<name>-state')")
    if (args.sample_every_n_steps or args.sample_every_n_epochs or args.sample_at_first) and not args.sample_prompts:
        raise ArgumentError("sampling was requested (--sample_every_n_*/--sample_at_first) but --sample_prompts is missing")
    if args.sample_prompts and not os.path.isfile(args.sample_prompts):
        raise ArgumentError(f"--sample_prompts {args.sample_prompts}: no such file")
    if args.log_with in ("tensorboard", "all") and not args.logging_dir:
        raise ArgumentError("--log_with tensorboard needs --logging_dir")
    if args.log_with in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise ArgumentError("--log_with wandb: the wandb package is not installed (pip install wandb)")

    if args.v_parameterization and not args.v2:
        logger.warning("--v_parameterization without --v2: fine for v-prediction SD1 models, unusual otherwise")
    if args.clip_skip is not None and args.clip_skip < 1:
        raise ArgumentError("--clip_skip must be 1 or more")
    if args.bucket_reso_steps % 8:
        raise ArgumentError(f"--bucket_reso_steps {args.bucket_reso_steps} must be a multiple of 8 (the latent stride)")
