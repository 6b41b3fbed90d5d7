"""``tools/cache_latents.py`` / ``tools/cache_text_encoder_outputs.py``: fill the disk caches before training.

The tools take the trainers' own flags (the network parser of the family chosen with ``--sdxl``,
``--flux``, ``--sd3`` or ``--lumina``; SD 1.x/2.x without one) and run the first part of the training recipe:
the same flag checks, seed, model loading and dataset building as
:meth:`library.training.trainer.Trainer.train`, then the trainer's own caching methods
(:meth:`~library.training.trainer.Trainer.cache_latents`,
:meth:`~library.training.trainer.Trainer.cache_text_encoder_outputs`) with the disk options on.
So the files are exactly those a training run with ``--cache_latents_to_disk`` /
``--cache_text_encoder_outputs_to_disk`` and the same flags writes and accepts; it finds them valid
and encodes nothing. Files already valid are kept (``--skip_cache_check``: any existing file is
trusted); the deprecated ``--skip_existing`` is accepted and changes nothing.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import random
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

#: ``--sdxl`` / ``--flux`` / ``--sd3`` / ``--lumina`` -> (the trainer's parser factory, family class)
FAMILIES: dict[str, tuple[str, str]] = {
    "sd": ("library.args:setup_network_parser", "library.families.sd.family:StableDiffusionFamily"),
    "sdxl": ("library.args:setup_sdxl_network_parser", "library.families.sdxl.family:SDXLFamily"),
    "flux": ("library.args:setup_flux_network_parser", "library.families.flux.family:FluxFamily"),
    "sd3": ("library.args:setup_sd3_network_parser", "library.families.sd3.family:SD3Family"),
    "lumina": ("library.families.lumina.args:setup_lumina_network_parser",
               "library.families.lumina.family:LuminaFamily"),
}
FAMILY_FLAGS = {"sdxl": "the model is SDXL", "flux": "the model is FLUX.1 or Chroma", "sd3": "the model is SD3/SD3.5",
                "lumina": "the model is Lumina-Image 2.0"}


def _add_family_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    exclusive = parser.add_mutually_exclusive_group()
    for name, help_text in FAMILY_FLAGS.items():
        exclusive.add_argument(f"--{name}", action="store_true", help=f"{help_text} (default: SD 1.x/2.x)")


def family_of(argv: Sequence[str]) -> str:
    """Which family the command line asks for (``--sdxl``, ``--flux``, ``--sd3``, ``--lumina``; default ``sd``)."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_family_flags(parser)
    known, _ = parser.parse_known_args(list(argv))
    return next((name for name in FAMILY_FLAGS if getattr(known, name)), "sd")


def _has_option(parser: argparse.ArgumentParser, flag: str) -> bool:
    return flag in parser._option_string_actions  # noqa: SLF001 - argparse has no public lookup


def setup_parser(family: str, description: str) -> argparse.ArgumentParser:
    """The trainer's parser of ``family`` plus the tools' flags."""
    parser: argparse.ArgumentParser = _load(FAMILIES[family][0])()
    parser.description = description
    g = parser.add_argument_group("caching tool")
    _add_family_flags(g)
    g.add_argument("--skip_existing", action="store_true",
                   help="deprecated, no effect: valid cache files are always kept")
    if not _has_option(parser, "--t5xxl_dtype"):
        g.add_argument("--t5xxl_dtype", type=str, default=None,
                       help="accepted for compatibility; the text encoders run in --mixed_precision's dtype, as in "
                            "training, so the files match the trainer's")
    return parser


def parse(argv: Sequence[str] | None, description: str) -> tuple[str, argparse.Namespace]:
    import sys

    from library.config_file import parse_args_with_config

    argv = list(sys.argv[1:] if argv is None else argv)
    family = family_of(argv)
    return family, parse_args_with_config(setup_parser(family, description), argv)


def _load(name: str):
    module_name, _, class_name = name.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def run_caching(args: argparse.Namespace, family_name: str, *, text_encoder_outputs: bool) -> int:
    """Cache latents (``text_encoder_outputs=False``) or text-encoder outputs to disk; returns how many
    images have a cache file afterwards."""
    from library.args import ArgumentError

    family = _load(FAMILIES[family_name][1])()
    if text_encoder_outputs and family.text_encoder_cache_suffix is None:
        raise ArgumentError("SD 1.x/2.x have no text encoder output cache: add --sdxl, --flux, --sd3 or --lumina "
                            "for those models")
    if getattr(args, "skip_existing", False):
        logger.warning("--skip_existing is deprecated and has no effect: valid cache files are always kept")
    # What this tool caches is on, to disk; the other cache is off (the other tool makes it).
    args.cache_latents = args.cache_latents_to_disk = not text_encoder_outputs
    if hasattr(args, "cache_text_encoder_outputs"):
        args.cache_text_encoder_outputs = args.cache_text_encoder_outputs_to_disk = text_encoder_outputs
    if text_encoder_outputs:
        args.network_train_unet_only = True  # the flag checks ask for it: nothing is trained here
    if args.output_dir is None:
        args.output_dir = "."  # required by the training checks; nothing is written there

    import torch
    from accelerate.utils import set_seed

    from library.dataset_config import build_dataset_group
    from library.training.accelerator import make_accelerator, weight_dtypes
    from library.training.targets import NetworkTarget
    from library.training.trainer import Trainer
    from library.training.validation import validate_training_args

    validate_training_args(args)
    family.validate_args(args)
    if args.seed is None:
        args.seed = random.randint(0, 2**31 - 1)
        logger.info("no --seed given; using %d", args.seed)
    set_seed(args.seed)  # the latents are a sample of the VAE posterior: same seed, same files as training
    accelerator = make_accelerator(args)
    weight_dtype, _ = weight_dtypes(args)
    models = family.load_models(args, accelerator.device, weight_dtype)
    tokenize = family.make_tokenize_fn(models, args)
    train_group, val_group = build_dataset_group(args, tokenize=None if text_encoder_outputs else tokenize,
                                                 latents_stride=family.latents_stride,
                                                 bucket_reso_steps_multiple=family.bucket_reso_multiple)
    groups = [g for g in (train_group, val_group) if g is not None]
    target = NetworkTarget()
    target.prepare_data(args, family, models, groups)
    trainer = Trainer(family, target)
    cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # as the trainer does around its caching
        if text_encoder_outputs:
            trainer.verify_text_encoder_caching(groups)
            trainer.cache_text_encoder_outputs(args, models, tokenize, groups, accelerator, weight_dtype)
        else:
            for group in groups:
                trainer.cache_latents(args, models, group, accelerator)
    accelerator.wait_for_everyone()
    images = [info for group in groups for info in group.images()]
    attribute = "text_encoder_outputs_npz" if text_encoder_outputs else "latents_npz"
    files = {getattr(info, attribute) for info in images if getattr(info, attribute, None) is not None}
    logger.info("%d cache files for %d images (%s)", len(files), len(images),
                "text encoder outputs" if text_encoder_outputs else "latents")
    return len(files)


def main(argv: Sequence[str] | None, *, text_encoder_outputs: bool, description: str,
         setup_logging: Callable) -> None:
    family, args = parse(argv, description)
    setup_logging(args)
    from library.data.errors import DatasetError
    from library.families.sd.checkpoint.common import CheckpointError

    try:
        run_caching(args, family, text_encoder_outputs=text_encoder_outputs)
    except (CheckpointError, DatasetError) as e:
        logger.debug("input error", exc_info=True)
        raise SystemExit(f"error: {e}") from None
