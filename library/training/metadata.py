"""The safetensors metadata a trained network carries (``ss_*`` training record and ``modelspec.*``).

Tools users already have (A1111/Forge's LoRA info, sd-webui-additional-networks, civitai's
uploader) read these keys, so names and value formats follow the reference file
../shared/reference/lora_metadata_sd1_example.json: every value is a string, ``None`` written as
``"None"``, dicts as JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import uuid
from typing import Any

from library.io_utils import legacy_model_hash, prefetch_sha256, sha256_file

MODELSPEC_VERSION = "1.0.1"
IMPLEMENTATION_VERSION = "sd-trainer/0.1"

#: ``--no_metadata`` keeps only what loaders need to use the file
MINIMAL_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")

#: args copied verbatim as ``ss_<name>`` (value ``str(args.<name>)``)
_PLAIN_ARGS = (
    "learning_rate", "unet_lr", "text_encoder_lr", "gradient_checkpointing", "gradient_accumulation_steps",
    "max_train_steps", "lr_warmup_steps", "lr_scheduler", "network_module", "network_dim", "network_alpha",
    "network_dropout", "mixed_precision", "full_fp16", "v2", "clip_skip", "max_token_length", "cache_latents",
    "seed", "lowram", "max_grad_norm", "caption_dropout_rate", "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate", "face_crop_aug_range", "prior_loss_weight", "training_comment", "fp8_base",
    "fp8_base_unet", "resize_interpolation", "scale_weight_norms",
)

#: validation flags (train_network.py has them; a script without them writes these defaults)
_VALIDATION_ARGS = {
    "validation_seed": None, "validation_split": 0.0, "max_validation_steps": None, "validate_every_n_epochs": None,
    "validate_every_n_steps": None,
}

#: noise/timestep/loss flags: ``ss_<key>`` = ``str(args.<attr>)``; the default is what a script
#: without the flag writes (the reference default)
_NOISE_AND_LOSS_ARGS = {
    "noise_offset": ("noise_offset", None), "multires_noise_iterations": ("multires_noise_iterations", None),
    "multires_noise_discount": ("multires_noise_discount", 0.3), "adaptive_noise_scale": ("adaptive_noise_scale", None),
    "zero_terminal_snr": ("zero_terminal_snr", False), "min_snr_gamma": ("min_snr_gamma", None),
    "ip_noise_gamma": ("ip_noise_gamma", None), "debiased_estimation": ("debiased_estimation_loss", False),
    "noise_offset_random_strength": ("noise_offset_random_strength", False),
    "ip_noise_gamma_random_strength": ("ip_noise_gamma_random_strength", False), "loss_type": ("loss_type", "l2"),
    "huber_schedule": ("huber_schedule", "snr"), "huber_scale": ("huber_scale", 1.0), "huber_c": ("huber_c", 0.1),
}

#: flags of later features, written with their reference defaults until those features land
_DEFAULTS_OF_LATER_FLAGS: dict[str, Any] = {}


def _s(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def training_metadata(args, *, session_id: int | None = None, started_at: float, num_train_images: int,
                      num_reg_images: int, num_batches_per_epoch: int, num_epochs: int, optimizer_name: str,
                      network_args: dict[str, str], dataset_metadata: dict[str, str],
                      family_metadata: dict[str, str], num_validation_images: int = 0) -> dict[str, str]:
    """All ``ss_*`` keys written at the start of training (``ss_steps``/``ss_epoch`` come per save)."""
    md: dict[str, str] = {
        "ss_session_id": str(session_id if session_id is not None else uuid.uuid4().int % 100_000_000),
        "ss_training_started_at": str(started_at),
        "ss_output_name": str(args.output_name),
        "ss_num_train_images": str(num_train_images),
        "ss_num_validation_images": str(num_validation_images),
        "ss_num_reg_images": str(num_reg_images),
        "ss_num_batches_per_epoch": str(num_batches_per_epoch),
        "ss_num_epochs": str(num_epochs),
        "ss_optimizer": optimizer_name,
        "ss_sd_scripts_commit_hash": IMPLEMENTATION_VERSION,
    }
    if network_args:
        md["ss_network_args"] = json.dumps(network_args)
    for name in _PLAIN_ARGS:
        value = getattr(args, name, None)
        if name == "text_encoder_lr" and isinstance(value, list):
            value = value[0] if len(value) == 1 else (value or None)
        md[f"ss_{name}"] = _s(value)
    for key, (attr, default) in _NOISE_AND_LOSS_ARGS.items():
        md[f"ss_{key}"] = _s(getattr(args, attr, default))
    for name, default in {**_DEFAULTS_OF_LATER_FLAGS, **_VALIDATION_ARGS}.items():
        md.setdefault(f"ss_{name}", _s(getattr(args, name, default)))
    md.update(dataset_metadata)
    md.update(family_metadata)
    if not getattr(args, "no_metadata", False):  # --no_metadata drops them: do not hash gigabytes for nothing
        md.update(model_file_metadata(args.pretrained_model_name_or_path, "sd"))
        md.update(model_file_metadata(getattr(args, "vae", None), "vae"))
    return md


def prefetch_model_hashes(args) -> None:
    """Start hashing the base model and VAE files in the background (see :func:`prefetch_sha256`);
    :func:`model_file_metadata` collects the results."""
    for path in (getattr(args, "pretrained_model_name_or_path", None), getattr(args, "vae", None)):
        if path:
            prefetch_sha256(path)


def model_file_metadata(path: str | None, what: str) -> dict[str, str]:
    """``ss_<what>_model_name``-style name and hashes of the base model (or VAE) file."""
    if not path:
        return {}
    name_key = "ss_sd_model_name" if what == "sd" else "ss_vae_name"
    md = {name_key: os.path.basename(os.path.normpath(path))}
    if os.path.isfile(path):
        prefix = "sd_model" if what == "sd" else "vae"
        md[f"ss_{prefix}_hash"] = legacy_model_hash(path)
        md[f"ss_new_{prefix}_hash"] = sha256_file(path)
    return md


def modelspec_metadata(args, *, architecture: str, implementation: str, resolution: tuple[int, int],
                       prediction_type: str | None, timestamp: float, title_default: str) -> dict[str, str]:
    """``modelspec.*`` keys (ModelSpec 1.0.1) from the ``--metadata_*`` flags and the family."""
    date = datetime.datetime.fromtimestamp(timestamp).replace(microsecond=0).isoformat()
    md = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": args.metadata_title or args.output_name or title_default,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": date,
        "modelspec.implementation_version": IMPLEMENTATION_VERSION,
    }
    if prediction_type:
        md["modelspec.prediction_type"] = prediction_type
    if getattr(args, "clip_skip", None):
        md["modelspec.encoder_layer"] = str(args.clip_skip)
    for name in ("author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from",
                 "trigger_phrase", "preprocessor", "is_negative_embedding"):
        value = getattr(args, f"metadata_{name}", None)
        if value:
            md[f"modelspec.{name}"] = value
    return md


def save_time_metadata(base: dict[str, str], *, epoch: int, step: int, no_metadata: bool) -> dict[str, str]:
    """Metadata of one save: the start-of-training record plus progress, or the minimal set."""
    if no_metadata:
        return {k: v for k, v in base.items() if k in MINIMAL_KEYS or k.startswith("modelspec.")}
    md = dict(base)
    md["ss_training_finished_at"] = str(time.time())
    md["ss_steps"] = str(step)
    md["ss_epoch"] = str(epoch)
    return md
