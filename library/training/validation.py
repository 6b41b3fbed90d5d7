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


def check_writable_folder(folder: str, flag: str) -> None:
    """Prove that files can be written in ``folder`` (or, if it does not exist yet, that it can be
    created), so that a bad output folder stops the run now instead of at the first save after
    hours of training. Nothing is left behind: a missing folder is not created here (a temporary
    sub-folder of its nearest existing parent is made and removed, which permission bits alone
    cannot tell, e.g. under /proc or on a read-only mount)."""
    path = os.path.abspath(folder)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ArgumentError(f"{flag} {folder} is a file, not a folder: give a folder (it is created if missing)")
    problem = _folder_problem(path)
    if problem is not None:
        blocker, reason = problem
        what = f"cannot be created, {blocker} is a file" if blocker else f"cannot write there ({reason})"
        raise ArgumentError(f"{flag} {folder}: {what}; give a folder you can write to")


def check_writable_file(path: str, flag: str) -> None:
    """:func:`check_writable_folder` for the folder of an output file, which must not be a folder itself."""
    if os.path.isdir(path):
        raise ArgumentError(f"{flag} {path} is a folder: give the path of the file to write")
    problem = _folder_problem(os.path.dirname(os.path.abspath(path)))
    if problem is None and os.path.exists(path) and not os.access(path, os.W_OK):
        problem = None, "the file exists and is read-only"
    if problem is not None:
        blocker, reason = problem
        raise ArgumentError(f"{flag} {path}: cannot write it ({f'{blocker} is a file' if blocker else reason}); "
                            "give a path you can write to")


def _folder_problem(path: str) -> tuple[str | None, str] | None:
    """Why no file can be written in the folder ``path`` (absolute): (the file standing where a
    parent folder would be, or None; the reason), or None when files can be written there."""
    import tempfile

    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return existing, "a parent is a file"
    try:
        if existing == path:
            with tempfile.TemporaryFile(dir=path):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as e:
        return None, str(e.strerror or e)
    return None


#: top-level key prefixes of full model checkpoints (SD/SDXL single files, FLUX/SD3 DiTs): never a network
_MODEL_KEY_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.embedders.", "first_stage_model.",
                       "double_blocks.", "single_blocks.", "joint_blocks.")


def check_network_file(path: str, flag: str) -> None:
    """A LoRA/network file given to ``flag`` exists, is not empty, and (``.safetensors``: its header
    only is read) is readable and not a model checkpoint. Whether it fits the model is checked when
    the network is built."""
    if not os.path.isfile(path):
        raise ArgumentError(f"{flag} {path}: no such file")
    if os.path.getsize(path) == 0:
        raise ArgumentError(f"{flag} {path}: the file is empty (0 bytes); an interrupted download or copy leaves "
                            "such files, fetch or save it again")
    if not path.lower().endswith(".safetensors"):
        return
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error type, or OSError, for a damaged header
        raise ArgumentError(f"{flag} {path}: not a readable safetensors file ({e}); an interrupted download or "
                            "copy leaves such files, fetch or save it again") from None
    if keys and not any(k.startswith(("lora_", "oft_", "lycoris_")) for k in keys) and any(
            k.startswith(_MODEL_KEY_PREFIXES) for k in keys):
        raise ArgumentError(f"{flag} {path} is a model checkpoint, not a LoRA/network file: give it with "
                            f"--pretrained_model_name_or_path; {flag} takes a file written by a network training "
                            "run (or by networks/extract_lora_from_models.py)")


def check_resume_folder(args) -> None:
    """``--resume``: a state folder as ``--save_state`` writes it (``train_state.json`` readable), and no
    ``--initial_step/--initial_epoch`` beside it (the state's own step would silently win)."""
    import json

    from library.training.saving import TRAIN_STATE_FILE

    folder = args.resume
    if not os.path.isdir(folder):
        raise ArgumentError(f"--resume {folder}: no such state folder (written by --save_state as '<name>-state')")
    state_file = os.path.join(folder, TRAIN_STATE_FILE)
    if not os.path.isfile(state_file):
        raise ArgumentError(f"--resume {folder}: not a training state folder (no {TRAIN_STATE_FILE}); give a "
                            "'<output_name>-state' folder written with --save_state (to continue from a LoRA file "
                            "alone, use --network_weights)")
    try:
        with open(state_file, encoding="utf-8") as f:
            step = int(json.load(f)["current_step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArgumentError(f"--resume {folder}: {TRAIN_STATE_FILE} is damaged ({e}); resume from another state "
                            "folder") from None
    for flag in ("initial_step", "initial_epoch"):
        if getattr(args, flag, None):
            raise ArgumentError(f"--{flag} {getattr(args, flag)} cannot be used with --resume: the resumed run "
                                f"continues at the state's step {step}. Drop --{flag} (or drop --resume to start "
                                "new weights at that step)")


def check_resume_state_fits(state_dir: str, modules: list) -> None:
    """Before accelerate loads ``--resume`` into the trained ``modules``: the state's weight files
    (``model.safetensors``, ``model_1.safetensors``, ...) hold the same names and shapes, so a state of
    another base model or network is a one-line error instead of a wall of missing keys."""
    from safetensors import safe_open

    for index, module in enumerate(modules):
        name = "model.safetensors" if index == 0 else f"model_{index}.safetensors"
        path = os.path.join(state_dir, name)
        if not os.path.isfile(path):
            continue  # accelerate's other layouts (pytorch_model.bin, sharded): it checks those itself
        own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        try:
            with safe_open(path, framework="pt") as f:
                saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # a damaged weights file: safetensors' own error type or OSError
            raise ArgumentError(f"--resume {state_dir}: {name} is not readable ({e}); resume from another state "
                                "folder") from None
        unexpected = [k for k in saved if k not in own]
        reshaped = [k for k in saved if k in own and saved[k] != own[k]]
        if unexpected or reshaped or (saved and not set(saved) & set(own)):
            example = (f"{reshaped[0]} is {list(saved[reshaped[0]])} in the state but {list(own[reshaped[0]])} here"
                       if reshaped else f"e.g. {unexpected[0]}" if unexpected else "no name in common")
            raise ArgumentError(f"--resume {state_dir}: the state was saved for another model or network "
                                f"({len(unexpected) + len(reshaped)} of {len(saved)} weights in {name} do not fit: "
                                f"{example}); resume with the base model and --network_* flags of the run that "
                                "saved it")


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
    check_writable_folder(args.output_dir, "--output_dir")
    if getattr(args, "logging_dir", None):
        check_writable_folder(args.logging_dir, "--logging_dir")
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
    if getattr(args, "network_weights", None):
        check_network_file(args.network_weights, "--network_weights")
    for path in getattr(args, "base_weights", None) or []:
        check_network_file(path, "--base_weights")
    if getattr(args, "vae", None) and not os.path.exists(args.vae):
        raise ArgumentError(f"--vae {args.vae}: no such file or folder (a VAE .safetensors/.ckpt file, a full "
                            "checkpoint or a Diffusers VAE folder)")

    if args.cache_latents_to_disk or getattr(args, "cache_latents_on_first_use", False):
        args.cache_latents = True  # to-disk and first-use caching imply caching
    if args.cache_latents and (args.color_aug or args.random_crop):
        raise ArgumentError("--cache_latents cannot be used with --color_aug or --random_crop "
                            "(latents are encoded once); drop one of them")

    _check_text_encoder_caching_flags(args)

    if args.gradient_accumulation_steps < 1:
        raise ArgumentError("--gradient_accumulation_steps must be at least 1")
    if args.train_batch_size < 1:
        raise ArgumentError("--train_batch_size must be at least 1")
    if args.max_train_steps is not None and args.max_train_steps < 1 and not args.max_train_epochs:
        raise ArgumentError("--max_train_steps must be at least 1")

    if args.xformers and importlib.util.find_spec("xformers") is None:
        raise ArgumentError("--xformers: the xformers package is not installed (pip install xformers), "
                            "or drop the flag to use PyTorch SDPA attention")
    if args.resume:
        check_resume_folder(args)
    if (args.sample_every_n_steps or args.sample_every_n_epochs or args.sample_at_first) and not args.sample_prompts:
        raise ArgumentError("sampling was requested (--sample_every_n_*/--sample_at_first) but --sample_prompts is missing")
    if args.sample_prompts and not os.path.isfile(args.sample_prompts):
        raise ArgumentError(f"--sample_prompts {args.sample_prompts}: no such file")
    if args.log_with in ("tensorboard", "all") and not args.logging_dir:
        raise ArgumentError("--log_with tensorboard needs --logging_dir")
    if args.log_with in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise ArgumentError("--log_with wandb: the wandb package is not installed (pip install wandb)")
    if getattr(args, "wandb_api_key", None) and args.log_with not in ("wandb", "all"):
        logger.warning("--wandb_api_key is ignored without --log_with wandb (or all)")
    if getattr(args, "log_tracker_config", None) and not os.path.isfile(args.log_tracker_config):
        raise ArgumentError(f"--log_tracker_config {args.log_tracker_config}: no such file (a .toml of tracker "
                            "init kwargs, e.g. [wandb] entity = \"me\")")
    _check_validation_flags(args)

    if args.clip_skip is not None and args.clip_skip < 1:
        raise ArgumentError("--clip_skip must be 1 or more")
    if args.bucket_reso_steps % 8:
        raise ArgumentError(f"--bucket_reso_steps {args.bucket_reso_steps} must be a multiple of 8 (the latent stride)")
    _check_noise_and_loss_flags(args)


#: CLI caption flags that vary a caption between epochs: the text encoders must see every variant
_VARYING_CAPTION_FLAGS = ("shuffle_caption", "caption_tag_dropout_rate", "token_warmup_step", "caption_dropout_rate",
                          "caption_dropout_every_n_epochs", "enable_wildcard")


def _check_text_encoder_caching_flags(args) -> None:
    """``--cache_text_encoder_outputs(_to_disk)``: frozen text encoders and captions that never change.

    Subsets of a dataset TOML are checked when the dataset is built
    (``DatasetGroup.verify_text_encoder_outputs_cacheable``).
    """
    if getattr(args, "cache_text_encoder_outputs_to_disk", False):
        args.cache_text_encoder_outputs = True  # to-disk caching implies caching
    if not getattr(args, "cache_text_encoder_outputs", False):
        return
    if not getattr(args, "network_train_unet_only", False):
        raise ArgumentError("--cache_text_encoder_outputs needs --network_train_unet_only: the text encoders are run "
                            "once before training, so their LoRA modules cannot be trained")
    for flag in _VARYING_CAPTION_FLAGS:
        value = getattr(args, flag, None)
        if value:
            raise ArgumentError(f"--cache_text_encoder_outputs cannot be used with --{flag} (each caption is encoded "
                                f"once, so it must not change between epochs): drop --{flag} or the caching")
    text_encoder_batch_size = getattr(args, "text_encoder_batch_size", None)
    if text_encoder_batch_size is not None and text_encoder_batch_size < 1:
        raise ArgumentError(f"--text_encoder_batch_size {text_encoder_batch_size} must be 1 or more (leave it out to "
                            "use --train_batch_size)")


def _check_validation_flags(args) -> None:
    """``--validation_split`` in [0, 1); the ``--validate_every_n_*`` / ``--max_validation_steps`` counts >= 1."""
    split = getattr(args, "validation_split", None)
    if split is not None and not 0 <= split < 1:
        raise ArgumentError(f"--validation_split {split} must be in [0, 1): the fraction of images held out, e.g. 0.1")
    for flag in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ArgumentError(f"--{flag} {value} must be 1 or more (leave it out for the default)")


def _check_noise_and_loss_flags(args) -> None:
    """Noise, timestep, loss and mask flags (docs/noise_and_loss.md); absent flags count as unset."""
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    v_pred = bool(get("v_parameterization", False))
    if get("adaptive_noise_scale") is not None and not get("noise_offset"):
        raise ArgumentError("--adaptive_noise_scale needs --noise_offset (it is added to the offset); "
                            "add e.g. --noise_offset 0.05")
    if get("noise_offset") is not None and get("noise_offset") < 0:
        raise ArgumentError(f"--noise_offset {get('noise_offset')} must be 0 or more (about 0.1 is typical)")
    if get("noise_offset_random_strength") and not get("noise_offset"):
        logger.warning("--noise_offset_random_strength has no effect without --noise_offset")
    if get("ip_noise_gamma") is not None and get("ip_noise_gamma") < 0:
        raise ArgumentError(f"--ip_noise_gamma {get('ip_noise_gamma')} must be 0 or more (about 0.1 is typical)")
    if get("ip_noise_gamma_random_strength") and not get("ip_noise_gamma"):
        logger.warning("--ip_noise_gamma_random_strength has no effect without --ip_noise_gamma")
    iterations = get("multires_noise_iterations")
    if iterations is not None and iterations < 1:
        raise ArgumentError(f"--multires_noise_iterations {iterations} must be 1 or more (6-10 typical), or leave it out")
    discount = get("multires_noise_discount")
    if iterations and discount is not None and not 0 < discount <= 1:
        raise ArgumentError(f"--multires_noise_discount {discount} must be in (0, 1] (default 0.3)")
    if get("zero_terminal_snr") and not v_pred:
        logger.warning("--zero_terminal_snr without --v_parameterization: the last timestep is pure noise, "
                       "which an epsilon-prediction model cannot learn well; v-prediction is recommended")

    low, high = get("min_timestep"), get("max_timestep")
    if low is not None and not 0 <= low <= 999:
        raise ArgumentError(f"--min_timestep {low} must be in [0, 999]")
    if high is not None and not 1 <= high <= 1000:
        raise ArgumentError(f"--max_timestep {high} must be in [1, 1000]")
    if (0 if low is None else low) > (1000 if high is None else high):
        raise ArgumentError(f"--min_timestep {low} is above --max_timestep {high}: swap them "
                            "(equal values train a single timestep)")
    if low is not None and high is not None and low == high == 1000:
        raise ArgumentError("--min_timestep/--max_timestep 1000 is past the last timestep (999)")

    loss_type = get("loss_type", "l2")
    if loss_type in ("huber", "smooth_l1"):
        c = get("huber_c", 0.1)
        if not 0 < c <= 1:
            raise ArgumentError(f"--huber_c {c} must be in (0, 1] with --loss_type {loss_type} (default 0.1)")
        if get("huber_scale", 1.0) <= 0:
            raise ArgumentError(f"--huber_scale {get('huber_scale')} must be above 0 (default 1.0)")
    gamma = get("min_snr_gamma")
    if gamma is not None and gamma <= 0:
        raise ArgumentError(f"--min_snr_gamma {gamma} must be above 0 (5 is the usual value)")
    if get("scale_v_pred_loss_like_noise_pred") and not v_pred:
        raise ArgumentError("--scale_v_pred_loss_like_noise_pred needs --v_parameterization")
    if get("v_pred_like_loss") and v_pred:
        raise ArgumentError("--v_pred_like_loss cannot be used with --v_parameterization (the loss already is v-pred)")
    if get("v_pred_like_loss") is not None and get("v_pred_like_loss") < 0:
        raise ArgumentError(f"--v_pred_like_loss {get('v_pred_like_loss')} must be 0 or more")

    # Only scripts with --masked_loss read --conditioning_data_dir as masks; the ControlNet scripts (no
    # --masked_loss) read it as conditioning images and check it themselves.
    masks_dir = get("conditioning_data_dir") if hasattr(args, "masked_loss") else None
    if masks_dir and not get("masked_loss"):
        raise ArgumentError(f"--conditioning_data_dir {masks_dir}: mask images are only used with --masked_loss: "
                            "add --masked_loss, or drop --conditioning_data_dir")
    if masks_dir and get("dataset_config"):
        logger.warning("--conditioning_data_dir is ignored with --dataset_config: set conditioning_data_dir on "
                       "the subsets in the config instead")
    elif masks_dir and not os.path.isdir(masks_dir):
        raise ArgumentError(f"--conditioning_data_dir {masks_dir}: no such folder (it holds one mask image per "
                            "training image, same file stem, red channel = mask)")
    if get("masked_loss") and not get("alpha_mask") and not masks_dir and not get("dataset_config"):
        raise ArgumentError("--masked_loss needs masks: add --conditioning_data_dir DIR (mask images with the same "
                            "file stem as the training images; white = train) or --alpha_mask (the images' alpha "
                            "channel)")
    if get("weighted_captions") and get("shuffle_caption"):
        logger.warning("--weighted_captions with --shuffle_caption: a weighted span that contains the caption "
                       "separator is split by the shuffle and its brackets no longer match")
