"""Command-line flags shared by the training scripts.

Flag names, meanings and defaults follow kohya-ss/sd-scripts so existing command lines, wrapper
scripts and ``--config_file`` TOML files keep working (see ../shared/reference/kohya_surface.md §2).
Each ``add_*_arguments`` function adds one group; entry scripts compose the groups they need.
Combinations that cannot work are rejected by :func:`validate_training_args` before any model is
loaded, with a message naming the flag.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


class ArgumentError(SystemExit):
    """A bad flag or flag combination: exits with status 1 and a one-line ``error: ...`` message on stderr
    (argparse's own parse errors exit with 2)."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def add_minimal_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every ``*_minimal_inference.py`` ends with: LoRAs, merging, interactive prompts, plain logs."""
    parser.add_argument("--lora_weights", type=str, nargs="*", default=[],
                        help="LoRA files as 'path' or 'path;multiplier'")
    parser.add_argument("--merge_lora_weights", action="store_true", help="merge the LoRAs into the weights")
    parser.add_argument("--interactive", action="store_true", help="read prompts from standard input, one per line")
    parser.add_argument("--console_log_simple", action="store_true", help="plain log lines")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--console_log_level", type=str, default=None,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                   help="console log level (default INFO)")
    g.add_argument("--console_log_file", type=str, default=None, help="also write the console log to this file")
    g.add_argument("--console_log_simple", action="store_true", help="plain log lines instead of rich formatting")


def add_sd_models_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--v2", action="store_true", help="the base model is Stable Diffusion 2.x")
    g.add_argument("--v_parameterization", action="store_true", help="the model predicts v (SD2 768-v and other v-pred models)")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="base model: single .safetensors/.ckpt file or Diffusers folder")
    g.add_argument("--tokenizer_cache_dir", type=str, default=None,
                   help="folder holding tokenizers (one sub-folder per hub id, '/' replaced by '_') for offline use")


def add_model_spec_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model spec metadata (modelspec.*)")
    for name, help_text in [
        ("title", "title (default: output_name)"), ("author", "author"), ("description", "description"),
        ("license", "license"), ("tags", "comma separated tags"), ("usage_hint", "usage hint"),
        ("thumbnail", "thumbnail image path or data URL"), ("merged_from", "source models of a merge"),
        ("trigger_phrase", "trigger phrase"), ("preprocessor", "preprocessor"),
        ("is_negative_embedding", "whether the embedding is a negative one"),
    ]:
        g.add_argument(f"--metadata_{name}", type=str, default=None, help=f"modelspec {help_text}")


def add_dataset_arguments(parser: argparse.ArgumentParser, *, support_dreambooth: bool = True,
                          support_caption: bool = True, support_caption_dropout: bool = True) -> None:
    g = parser.add_argument_group("dataset")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="training images: parent of '<repeats>_<class tokens>' folders, or the fine-tuning image folder")
    g.add_argument("--cache_info", action="store_true", help="cache caption and size in metadata_cache.json (DreamBooth)")
    g.add_argument("--shuffle_caption", action="store_true", help="shuffle separator-split tags")
    g.add_argument("--caption_separator", type=str, default=",", help="tag separator")
    g.add_argument("--caption_extension", type=str, default=".caption", help="caption file extension")
    g.add_argument("--caption_extention", type=str, default=None, help=argparse.SUPPRESS)  # legacy misspelling
    g.add_argument("--keep_tokens", type=int, default=0, help="first N tags are never shuffled or dropped")
    g.add_argument("--keep_tokens_separator", type=str, default="", help="marker splitting fixed and shuffled parts")
    g.add_argument("--secondary_separator", type=str, default=None, help="separator of grouped tags, replaced by caption_separator after shuffling")
    g.add_argument("--enable_wildcard", action="store_true", help="'{a|b}' random choice and random caption line")
    g.add_argument("--caption_prefix", type=str, default=None, help="text put before every caption")
    g.add_argument("--caption_suffix", type=str, default=None, help="text put after every caption")
    g.add_argument("--color_aug", action="store_true", help="weak colour augmentation (disables latent caching)")
    g.add_argument("--flip_aug", action="store_true", help="random horizontal flip")
    g.add_argument("--face_crop_aug_range", type=str, default=None, help="'lo,hi' face-centred crop scale range")
    g.add_argument("--random_crop", action="store_true", help="random instead of centre crop (disables latent caching)")
    g.add_argument("--debug_dataset", action="store_true", help="show the dataset batches instead of training")
    g.add_argument("--resolution", type=str, default=None, help="training resolution: 'size' or 'width,height'")
    g.add_argument("--cache_latents", action="store_true", help="encode images with the VAE once, keep latents in memory")
    g.add_argument("--vae_batch_size", type=int, default=1, help="batch size for VAE encoding while caching")
    g.add_argument("--cache_latents_to_disk", action="store_true", help="cache latents as .npz files next to the images")
    g.add_argument("--cache_latents_on_first_use", action="store_true",
                   help="cache latents (implies --cache_latents) as batches first need them, not all before the "
                        "first step; works with --cache_latents_to_disk")
    g.add_argument("--skip_cache_check", action="store_true", help="trust existing cache files without checking their content")
    g.add_argument("--enable_bucket", action="store_true", help="aspect-ratio bucketing")
    g.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side")
    g.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side")
    g.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket side granularity")
    g.add_argument("--bucket_no_upscale", action="store_true", help="buckets from the image size, never upscaling")
    g.add_argument("--resize_interpolation", type=str, default=None,
                   choices=["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"],
                   help="interpolation for resizing (default: area when shrinking, lanczos when enlarging)")
    g.add_argument("--token_warmup_min", type=int, default=1, help="tags used at the start of token warmup")
    g.add_argument("--token_warmup_step", type=float, default=0,
                   help="steps over which the tag count grows to all (a value < 1 is a ratio of max_train_steps)")
    g.add_argument("--alpha_mask", action="store_true", help="use the image alpha channel as loss mask")
    g.add_argument("--dataset_class", type=str, default=None, help="'package.module.Class' of a custom dataset")
    if support_caption_dropout:
        g.add_argument("--caption_dropout_rate", type=float, default=0.0, help="probability of dropping the whole caption")
        g.add_argument("--caption_dropout_every_n_epochs", type=int, default=0, help="drop all captions every N-th epoch")
        g.add_argument("--caption_tag_dropout_rate", type=float, default=0.0, help="probability of dropping each tag")
    if support_dreambooth:
        g.add_argument("--reg_data_dir", type=str, default=None, help="regularization images (DreamBooth folders)")
    if support_caption:
        g.add_argument("--in_json", type=str, default=None, help="fine-tuning metadata json")
        g.add_argument("--dataset_repeats", type=int, default=1, help="repeats of the fine-tuning dataset")
    g.add_argument("--dataset_config", type=str, default=None, help="dataset config .toml/.json")


def add_training_arguments(parser: argparse.ArgumentParser, *, support_dreambooth: bool = True) -> None:
    g = parser.add_argument_group("output and saving")
    g.add_argument("--output_dir", type=str, default=None, help="where models, states and samples are written")
    g.add_argument("--output_name", type=str, default=None, help="base name of the saved files")
    g.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"],
                   help="dtype of saved weights (default: as trained)")
    g.add_argument("--save_every_n_epochs", type=int, default=None, help="save every N epochs")
    g.add_argument("--save_every_n_steps", type=int, default=None, help="save every N steps")
    g.add_argument("--save_n_epoch_ratio", type=int, default=None, help="save about N times over the run")
    g.add_argument("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch saves")
    g.add_argument("--save_last_n_epochs_state", type=int, default=None, help="keep only the last N epoch states")
    g.add_argument("--save_last_n_steps", type=int, default=None, help="keep only saves of the last N steps")
    g.add_argument("--save_last_n_steps_state", type=int, default=None, help="keep only states of the last N steps")
    g.add_argument("--save_state", action="store_true", help="save the training state with every model save")
    g.add_argument("--save_state_on_train_end", action="store_true", help="save the training state at the end")
    g.add_argument("--save_state_on_interrupt", action="store_true",
                   help="on Ctrl-C/SIGTERM, stop at the next step and save the model and a state to --resume from")
    g.add_argument("--resume", type=str, default=None, help="training state folder to resume from")

    g = parser.add_argument_group("batch and length")
    g.add_argument("--train_batch_size", type=int, default=1, help="batch size")
    g.add_argument("--max_token_length", type=int, default=None, choices=[None, 75, 150, 225],
                   help="text length in tokens: 75 (default), 150 or 225")
    g.add_argument("--max_train_steps", type=int, default=1600, help="training steps")
    g.add_argument("--max_train_epochs", type=int, default=None, help="training epochs (overrides max_train_steps)")
    g.add_argument("--max_data_loader_n_workers", type=int, default=8, help="DataLoader workers (capped by CPU count)")
    g.add_argument("--persistent_data_loader_workers", action="store_true", help="keep DataLoader workers between epochs")
    g.add_argument("--seed", type=int, default=None, help="random seed (random if unset)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for memory")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")

    g = parser.add_argument_group("attention and compile")
    g.add_argument("--mem_eff_attn", action="store_true", help="memory-efficient attention (SDPA is used)")
    g.add_argument("--xformers", action="store_true", help="xformers attention (needs the xformers package)")
    g.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    g.add_argument("--torch_compile", action="store_true", help="compile the denoiser with torch.compile")
    g.add_argument("--dynamo_backend", type=str, default="inductor", help="torch.compile backend")

    g = parser.add_argument_group("precision and memory")
    g.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="mixed precision")
    g.add_argument("--full_fp16", action="store_true", help="train in fp16 entirely (needs --mixed_precision fp16)")
    g.add_argument("--full_bf16", action="store_true", help="train in bf16 entirely (needs --mixed_precision bf16)")
    g.add_argument("--fp8_base", action="store_true", help="store base model weights in float8_e4m3fn")
    g.add_argument("--lowram", action="store_true", help="load models straight to the GPU")
    g.add_argument("--highvram", action="store_true", help="do not free GPU caches between phases")

    g = parser.add_argument_group("distributed")
    g.add_argument("--ddp_timeout", type=int, default=None, help="DDP timeout in minutes")
    g.add_argument("--ddp_gradient_as_bucket_view", action="store_true", help="DDP gradient_as_bucket_view")
    g.add_argument("--ddp_static_graph", action="store_true", help="DDP static_graph")
    add_deepspeed_arguments(parser)

    g = parser.add_argument_group("models and conditioning")
    g.add_argument("--vae", type=str, default=None, help="replacement VAE (file or Diffusers folder)")
    g.add_argument("--clip_skip", type=int, default=None, help="use the output of the N-th last text encoder layer")
    if support_dreambooth:
        g.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularization images")

    g = parser.add_argument_group("logging and tracking")
    g.add_argument("--logging_dir", type=str, default=None, help="enables TensorBoard logs in this folder")
    g.add_argument("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"], help="tracker")
    g.add_argument("--log_prefix", type=str, default=None, help="prefix of the run folder name")
    g.add_argument("--log_tracker_name", type=str, default=None, help="tracker project name")
    g.add_argument("--log_tracker_config", type=str, default=None, help="tracker init kwargs (toml)")
    g.add_argument("--wandb_run_name", type=str, default=None, help="wandb run name")
    g.add_argument("--wandb_api_key", type=str, default=None, help="wandb API key")
    g.add_argument("--log_config", action="store_true", help="log the (sanitized) arguments to the tracker")

    g = parser.add_argument_group("sample images during training")
    g.add_argument("--sample_every_n_steps", type=int, default=None, help="sample every N steps")
    g.add_argument("--sample_every_n_epochs", type=int, default=None, help="sample every N epochs (wins over steps)")
    g.add_argument("--sample_at_first", action="store_true", help="sample before training starts")
    g.add_argument("--sample_prompts", type=str, default=None, help="prompt file (.txt, .toml or .json)")
    g.add_argument("--sample_sampler", type=str, default="ddim",
                   choices=["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
                            "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"],
                   help="sampler of the preview images")

    add_config_arguments(parser)


def add_deepspeed_arguments(parser: argparse.ArgumentParser) -> None:
    """DeepSpeed ZeRO through accelerate (the optional ``deepspeed`` package; see docs/distributed.md)."""
    g = parser.add_argument_group("DeepSpeed (optional package)")
    g.add_argument("--deepspeed", action="store_true", help="train with DeepSpeed ZeRO (pip install deepspeed)")
    g.add_argument("--zero_stage", type=int, default=2, choices=[0, 1, 2, 3], help="ZeRO stage")
    g.add_argument("--offload_optimizer_device", type=str, default=None, choices=[None, "cpu", "nvme"],
                   help="offload the optimizer state to cpu or nvme")
    g.add_argument("--offload_optimizer_nvme_path", type=str, default=None, help="nvme path of the optimizer offload")
    g.add_argument("--offload_param_device", type=str, default=None, choices=[None, "cpu", "nvme"],
                   help="offload parameters to cpu or nvme (ZeRO 3)")
    g.add_argument("--offload_param_nvme_path", type=str, default=None, help="nvme path of the parameter offload")
    g.add_argument("--zero3_init_flag", action="store_true", help="ZeRO 3: build models partitioned (zero.Init)")
    g.add_argument("--zero3_save_16bit_model", action="store_true", help="ZeRO 3: gather a 16-bit model to save")
    g.add_argument("--fp16_master_weights_and_gradients", action="store_true",
                   help="keep master weights and gradients in fp16 (ZeRO with cpu offload)")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("config file")
    g.add_argument("--config_file", type=str, default=None,
                   help="TOML file with arguments (tables are flattened; the command line wins)")
    g.add_argument("--output_config", action="store_true",
                   help="write the non-default arguments to --config_file and exit")


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer_type", type=str, default="",
                   help="optimizer (case-insensitive): AdamW (default), AdamW8bit, PagedAdamW, PagedAdamW8bit, "
                   "PagedAdamW32bit, Lion, Lion8bit, PagedLion8bit, SGDNesterov, SGDNesterov8bit, DAdaptation, "
                   "DAdaptAdaGrad, DAdaptAdam, DAdaptAdan, DAdaptAdanIP, DAdaptLion, DAdaptSGD, Prodigy, AdaFactor, "
                   "RAdamScheduleFree, AdamWScheduleFree, SGDScheduleFree, a torch.optim class name, or a dotted "
                   "class path (see docs/optimizers.md)")
    g.add_argument("--optimizer_args", type=str, default=None, nargs="*",
                   help="optimizer keyword arguments as key=value (values are Python literals)")
    g.add_argument("--use_8bit_adam", action="store_true",
                   help="legacy: same as --optimizer_type AdamW8bit (needs bitsandbytes)")
    g.add_argument("--use_lion_optimizer", action="store_true",
                   help="legacy: same as --optimizer_type Lion (needs lion-pytorch)")
    g.add_argument("--learning_rate", type=float, default=2e-6, help="learning rate")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0 disables)")
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, "
                   "inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, adafactor, piecewise_constant")
    g.add_argument("--lr_warmup_steps", type=str, default="0",
                   help="warmup steps: an integer, a ratio of all steps (< 1), or 'N%%'")
    g.add_argument("--lr_decay_steps", type=str, default="0",
                   help="decay steps of warmup_stable_decay: an integer, a ratio of all steps (< 1), or 'N%%'")
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1,
                   help="restarts of cosine_with_restarts; cosine cycles of cosine_with_min_lr / warmup_stable_decay")
    g.add_argument("--lr_scheduler_power", type=float, default=1, help="power of polynomial decay")
    g.add_argument("--lr_scheduler_timescale", type=int, default=None,
                   help="timescale of inverse_sqrt (default: the warmup steps)")
    g.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None,
                   help="lowest learning rate as a ratio of the initial one (cosine_with_min_lr, warmup_stable_decay)")
    g.add_argument("--lr_scheduler_type", type=str, default="",
                   help="custom scheduler class: a dotted path or a torch.optim.lr_scheduler name (overrides "
                   "--lr_scheduler)")
    g.add_argument("--lr_scheduler_args", type=str, default=None, nargs="*",
                   help="scheduler keyword arguments as key=value (values are Python literals)")


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("network")
    g.add_argument("--network_module", type=str, default=None, help="network module to train, e.g. networks.lora")
    g.add_argument("--network_dim", type=int, default=None, help="network rank (module default when unset)")
    g.add_argument("--network_alpha", type=float, default=1, help="LoRA alpha (scale = alpha / rank)")
    g.add_argument("--network_dropout", type=float, default=None, help="dropout on the down projection output")
    g.add_argument("--network_args", type=str, default=None, nargs="*", help="network options as key=value")
    g.add_argument("--network_weights", type=str, default=None, help="start from these network weights")
    g.add_argument("--dim_from_weights", action="store_true", help="take rank and alpha from --network_weights")
    g.add_argument("--network_train_unet_only", action="store_true", help="train only the U-Net part")
    g.add_argument("--network_train_text_encoder_only", action="store_true", help="train only the text encoder part")
    g.add_argument("--unet_lr", type=float, default=None, help="learning rate of the U-Net part")
    g.add_argument("--text_encoder_lr", type=float, default=None, nargs="*", help="learning rate of the text encoder part")
    g.add_argument("--base_weights", type=str, default=None, nargs="*",
                   help="LoRA files merged into the base model before training (see docs/lora_options.md)")
    g.add_argument("--base_weights_multiplier", type=float, default=None, nargs="*",
                   help="multiplier of each --base_weights file (1.0 for files without one)")
    g.add_argument("--scale_weight_norms", type=float, default=None,
                   help="max-norm regularisation: cap each module's ||ΔW|| at this value after every step (e.g. 1.0)")
    g.add_argument("--training_comment", type=str, default=None, help="comment stored in the metadata")
    g.add_argument("--no_metadata", action="store_true", help="store only the minimal metadata")
    g.add_argument("--save_model_as", type=str, default="safetensors", choices=[None, "ckpt", "pt", "safetensors"],
                   help="file format of the network")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 under mixed precision")
    g.add_argument("--fp8_base_unet", action="store_true", help="float8 only for the U-Net")
    g.add_argument("--initial_epoch", type=int, default=None, help="epoch to start counting from")
    g.add_argument("--initial_step", type=int, default=None, help="step to start counting from")
    g.add_argument("--skip_until_initial_step", action="store_true",
                   help="skip the batches before --initial_step so the data continues where it stopped")


def add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    """Validation loss on a held-out part of the DreamBooth images (see docs/validation_and_logging.md)."""
    g = parser.add_argument_group("validation")
    g.add_argument("--validation_seed", type=int, default=None,
                   help="seed of the train/validation split and of the validation noise (default: --seed)")
    g.add_argument("--validation_split", type=float, default=0.0,
                   help="fraction of each DreamBooth dataset's images held out for validation, in [0, 1)")
    g.add_argument("--validate_every_n_steps", type=int, default=None,
                   help="also compute the validation loss every N steps")
    g.add_argument("--validate_every_n_epochs", type=int, default=None,
                   help="compute the validation loss every N epochs (default: every epoch)")
    g.add_argument("--max_validation_steps", type=int, default=None,
                   help="validation batches per validation pass (default: all)")


def add_noise_and_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """Noise, timestep and loss-type flags of the DDPM objective (see docs/noise_and_loss.md)."""
    g = parser.add_argument_group("noise, timesteps and loss type")
    g.add_argument("--noise_offset", type=float, default=None,
                   help="add a per-channel constant offset of this strength to the noise (about 0.1)")
    g.add_argument("--noise_offset_random_strength", action="store_true",
                   help="scale the noise offset by a random U(0,1) factor per sample")
    g.add_argument("--adaptive_noise_scale", type=float, default=None,
                   help="add |mean of each latent channel| x this to the noise offset (needs --noise_offset)")
    g.add_argument("--multires_noise_iterations", type=int, default=None,
                   help="multi-resolution (pyramid) noise levels (6-10 typical)")
    g.add_argument("--multires_noise_discount", type=float, default=0.3,
                   help="weight decay per pyramid noise level")
    g.add_argument("--ip_noise_gamma", type=float, default=None,
                   help="input perturbation noise strength (about 0.1); the target keeps the plain noise")
    g.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                   help="scale --ip_noise_gamma by a random U(0,1) factor per sample")
    g.add_argument("--zero_terminal_snr", action="store_true",
                   help="rescale the noise schedule so the last timestep is pure noise (use with v-prediction)")
    g.add_argument("--min_timestep", type=int, default=None, help="smallest sampled timestep (default 0)")
    g.add_argument("--max_timestep", type=int, default=None, help="timesteps are sampled below this (default 1000)")
    g.add_argument("--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"],
                   help="element-wise loss (default l2)")
    g.add_argument("--huber_schedule", type=str, default="snr", choices=["constant", "exponential", "snr"],
                   help="how the Huber parameter c varies with the timestep (default snr)")
    g.add_argument("--huber_c", type=float, default=0.1, help="Huber parameter c (default 0.1)")
    g.add_argument("--huber_scale", type=float, default=1.0, help="multiplier of the scheduled Huber c (default 1.0)")


def add_custom_train_arguments(parser: argparse.ArgumentParser, support_weighted_captions: bool = True) -> None:
    """SNR-based loss weightings and weighted captions (see docs/noise_and_loss.md)."""
    g = parser.add_argument_group("loss weighting")
    g.add_argument("--min_snr_gamma", type=float, default=None,
                   help="min-SNR weighting gamma (5 recommended)")
    g.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true",
                   help="scale the v-prediction loss like the noise-prediction loss (needs --v_parameterization)")
    g.add_argument("--v_pred_like_loss", type=float, default=None,
                   help="add a v-prediction-like loss with this weight (not with --v_parameterization)")
    g.add_argument("--debiased_estimation_loss", action="store_true", help="debiased estimation loss weighting")
    if support_weighted_captions:
        g.add_argument("--weighted_captions", action="store_true",
                       help="A1111-style caption weights: (tag:1.3), (tag) x1.1, [tag] /1.1")


def add_masked_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """Loss masks (see docs/noise_and_loss.md)."""
    g = parser.add_argument_group("masked loss")
    g.add_argument("--conditioning_data_dir", type=str, default=None,
                   help="folder of mask images: same file stem as each training image, red channel = mask "
                        "(white trains, black is ignored); needs --masked_loss")
    g.add_argument("--masked_loss", action="store_true",
                   help="weight the loss by a mask (from --conditioning_data_dir images or, with --alpha_mask, "
                        "the images' alpha channel)")


def add_text_encoder_caching_arguments(g) -> None:
    """``--cache_text_encoder_outputs`` and friends, shared by the SDXL and DiT scripts."""
    g.add_argument("--cache_text_encoder_outputs", action="store_true",
                   help="encode every caption once with the text encoders and free them (needs "
                        "--network_train_unet_only; no shuffle/dropout/warmup/wildcards of captions)")
    g.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                   help="cache text encoder outputs as .npz files next to the images (implies "
                        "--cache_text_encoder_outputs)")
    g.add_argument("--text_encoder_batch_size", type=int, default=None,
                   help="captions per text-encoder call while caching (default: --train_batch_size)")
    g.add_argument("--disable_mmap_load_safetensors", action="store_true",
                   help="read .safetensors files into memory in one go instead of memory-mapping them "
                        "(faster on WSL and network drives)")


def add_sdxl_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the SDXL scripts (kohya's ``add_sdxl_training_arguments``)."""
    add_text_encoder_caching_arguments(parser.add_argument_group("SDXL"))


WEIGHTING_SCHEMES = ["sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"]


def add_dit_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the DiT scripts (FLUX.1, SD3): caching, flow-matching weighting, block swap."""
    g = parser.add_argument_group("DiT training")
    add_text_encoder_caching_arguments(g)
    g.add_argument("--weighting_scheme", type=str, default="uniform", choices=WEIGHTING_SCHEMES,
                   help="timestep density (logit_normal, mode) and loss weighting (sigma_sqrt, cosmap) of flow "
                        "matching (default uniform)")
    g.add_argument("--logit_mean", type=float, default=0.0, help="mean of the logit_normal weighting scheme")
    g.add_argument("--logit_std", type=float, default=1.0, help="std of the logit_normal weighting scheme")
    g.add_argument("--mode_scale", type=float, default=1.29, help="scale of the mode weighting scheme")
    g.add_argument("--blocks_to_swap", type=int, default=None,
                   help="keep this many transformer blocks in CPU memory and stream them to the GPU when they "
                        "run (saves VRAM, costs speed; not with --cpu_offload_checkpointing)")
    g.add_argument("--cpu_offload_checkpointing", action="store_true",
                   help="with --gradient_checkpointing, keep the checkpointed activations in CPU memory")


def add_flux_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of flux_train_network.py (kohya's ``add_flux_train_arguments`` and the script's own)."""
    g = parser.add_argument_group("FLUX.1")
    g.add_argument("--clip_l", type=str, default=None,
                   help="CLIP-L text encoder file (.safetensors; not used by Chroma)")
    g.add_argument("--t5xxl", type=str, default=None, help="T5-XXL text encoder file (.safetensors)")
    g.add_argument("--ae", type=str, default=None, help="FLUX autoencoder file (ae.safetensors)")
    g.add_argument("--controlnet_model_name_or_path", type=str, default=None,
                   help="FLUX ControlNet file to start from (flux_train_control_net.py)")
    g.add_argument("--t5xxl_max_token_length", type=int, default=None,
                   help="T5 tokens per caption (default 512 for dev and Chroma, 256 for schnell)")
    g.add_argument("--apply_t5_attn_mask", action="store_true",
                   help="mask T5 padding tokens in T5 and in the DiT's attention")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help="embedded guidance value given to FLUX.1 dev during training (default 3.5; 1.0 is often "
                        "recommended) or to Chroma's approximator (default 0.0, what Chroma is trained with)")
    g.add_argument("--timestep_sampling", type=str, default="sigma",
                   choices=["sigma", "uniform", "sigmoid", "shift", "flux_shift"],
                   help="how training timesteps are drawn (default sigma; see docs/flux_train_network.md)")
    g.add_argument("--sigmoid_scale", type=float, default=1.0,
                   help="scale of the normal draw for sigmoid/shift/flux_shift sampling")
    g.add_argument("--model_prediction_type", type=str, default="sigma_scaled",
                   choices=["raw", "additive", "sigma_scaled"],
                   help="how the model output is read: raw (velocity, recommended), additive, sigma_scaled")
    g.add_argument("--discrete_flow_shift", type=float, default=3.0,
                   help="shift of the flow-matching schedule (sigma and shift sampling)")
    g.add_argument("--model_type", type=str, default="flux", choices=["flux", "chroma"],
                   help="flux: FLUX.1 dev/schnell (CLIP-L + T5); chroma: Chroma (T5 only, no --clip_l)")
    g.add_argument("--split_mode", action="store_true", help="deprecated: same as --blocks_to_swap 18")


def add_sd3_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of sd3_train_network.py (kohya's ``add_sd3_training_arguments``)."""
    g = parser.add_argument_group("SD3 / SD3.5")
    g.add_argument("--clip_l", type=str, default=None, help="CLIP-L text encoder file (default: from the checkpoint)")
    g.add_argument("--clip_g", type=str, default=None, help="CLIP-G text encoder file (default: from the checkpoint)")
    g.add_argument("--t5xxl", type=str, default=None, help="T5-XXL text encoder file (default: from the checkpoint)")
    g.add_argument("--save_clip", action="store_true", help="no effect (as in the reference); kept for old scripts")
    g.add_argument("--save_t5xxl", action="store_true", help="no effect (as in the reference); kept for old scripts")
    g.add_argument("--t5xxl_device", type=str, default=None, help="no effect (as in the reference)")
    g.add_argument("--t5xxl_dtype", type=str, default=None, help="no effect (as in the reference)")
    g.add_argument("--t5xxl_max_token_length", type=int, default=256, help="T5 tokens per caption (default 256)")
    g.add_argument("--apply_lg_attn_mask", action="store_true",
                   help="zero the CLIP-L/CLIP-G outputs at padding tokens")
    g.add_argument("--apply_t5_attn_mask", action="store_true",
                   help="run T5 with its attention mask and zero its outputs at padding tokens")
    for name in ("clip_l", "clip_g", "t5"):
        g.add_argument(f"--{name}_dropout_rate", type=float, default=0.0,
                       help=f"probability of dropping the {name.upper().replace('_', '-')} conditioning of a sample "
                            "(also with cached outputs)")
    g.add_argument("--pos_emb_random_crop_rate", type=float, default=0.0,
                   help="probability of a random instead of centred crop of the position embedding")
    g.add_argument("--enable_scaled_pos_embed", action="store_true",
                   help="scale the position embedding to the image size (SD3.5 Medium multi-resolution training)")
    g.add_argument("--training_shift", type=float, default=1.0,
                   help="shift of the training timestep distribution: t' = s t / (1 + (s - 1) t)")


def add_fine_tune_arguments(parser: argparse.ArgumentParser, *, sdxl: bool = False, dreambooth: bool = False) -> None:
    """Flags of the full fine-tuning scripts (kohya's ``add_sd_saving_arguments`` and the scripts' own)."""
    g = parser.add_argument_group("fine-tuning")
    g.add_argument("--save_model_as", type=str, default=None, choices=[None, "ckpt", "safetensors", "diffusers",
                                                                      "diffusers_safetensors"],
                   help="format of the saved model (default: the input model's)")
    g.add_argument("--use_safetensors", action="store_true", help="save .safetensors when --save_model_as is unset")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 under mixed precision")
    g.add_argument("--diffusers_xformers", action="store_true", help="xformers attention (same as --xformers)")
    if dreambooth:
        g.add_argument("--stop_text_encoder_training", type=int, default=None,
                       help="stop training the text encoder after this many steps (-1: never train it)")
        g.add_argument("--no_token_padding", action="store_true",
                       help="pad captions only to the longest one in the batch, not to 77 tokens")
    else:
        g.add_argument("--train_text_encoder", action="store_true", help="also train the text encoder(s)")
    if sdxl:
        g.add_argument("--learning_rate_te1", type=float, default=None,
                       help="learning rate of text encoder 1 (default --learning_rate)")
        g.add_argument("--learning_rate_te2", type=float, default=None,
                       help="learning rate of text encoder 2 (default --learning_rate)")
        g.add_argument("--block_lr", type=str, default=None,
                       help="23 comma-separated learning rates, one per U-Net block (0 freezes a block)")
        g.add_argument("--fused_backward_pass", action="store_true",
                       help="update each weight during the backward pass and free its gradient (AdaFactor only)")
        g.add_argument("--fused_optimizer_groups", type=int, default=None,
                       help="split the weights into N optimizer groups stepped during the backward pass")
    else:
        g.add_argument("--learning_rate_te", type=float, default=None,
                       help="learning rate of the text encoder (default --learning_rate)")


def training_parser(description: str, *, dreambooth: bool = False, captions: bool = True) -> argparse.ArgumentParser:
    """A parser with the groups every trainer shares: logging, model, model spec, dataset, training,
    optimizer, validation, noise/loss and custom-training flags. Each script adds its own groups."""
    parser = argparse.ArgumentParser(description=description)
    add_logging_arguments(parser)
    add_sd_models_arguments(parser)
    add_model_spec_arguments(parser)
    add_dataset_arguments(parser, support_dreambooth=dreambooth, support_caption=captions)
    add_training_arguments(parser, support_dreambooth=dreambooth)
    add_optimizer_arguments(parser)
    add_validation_arguments(parser)
    add_noise_and_loss_arguments(parser)
    add_custom_train_arguments(parser)
    return parser


def _fine_tune_base(description: str, *, dreambooth: bool, fine_tuning: bool) -> argparse.ArgumentParser:
    parser = training_parser(description, dreambooth=dreambooth, captions=fine_tuning)
    add_masked_loss_arguments(parser)
    return parser


def setup_fine_tune_parser() -> argparse.ArgumentParser:
    """The parser of fine_tune.py (SD 1.x/2.x, fine-tuning metadata datasets)."""
    parser = _fine_tune_base("Fine-tune a Stable Diffusion 1.x/2.x model (U-Net, optionally the text encoder)",
                             dreambooth=False, fine_tuning=True)
    add_fine_tune_arguments(parser)
    return parser


def setup_db_parser() -> argparse.ArgumentParser:
    """The parser of train_db.py (SD 1.x/2.x DreamBooth)."""
    parser = _fine_tune_base("DreamBooth training of a Stable Diffusion 1.x/2.x model", dreambooth=True,
                             fine_tuning=False)
    add_fine_tune_arguments(parser, dreambooth=True)
    return parser


def setup_sdxl_train_parser() -> argparse.ArgumentParser:
    """The parser of sdxl_train.py (SDXL fine-tuning and DreamBooth)."""
    parser = _fine_tune_base("Fine-tune an SDXL model (U-Net, optionally both text encoders)", dreambooth=True,
                             fine_tuning=True)
    add_fine_tune_arguments(parser, sdxl=True)
    add_sdxl_training_arguments(parser)
    return parser


def setup_network_parser() -> argparse.ArgumentParser:
    """The parser of train_network.py (SD 1.x/2.x LoRA)."""
    parser = argparse.ArgumentParser(description="Train a LoRA (or another network module) for Stable Diffusion 1.x/2.x")
    add_logging_arguments(parser)
    add_sd_models_arguments(parser)
    add_model_spec_arguments(parser)
    add_dataset_arguments(parser)
    add_training_arguments(parser)
    add_optimizer_arguments(parser)
    add_network_arguments(parser)
    add_validation_arguments(parser)
    add_noise_and_loss_arguments(parser)
    add_custom_train_arguments(parser)
    add_masked_loss_arguments(parser)
    return parser


def setup_sdxl_network_parser() -> argparse.ArgumentParser:
    """The parser of sdxl_train_network.py: train_network.py's flags plus the SDXL ones."""
    parser = setup_network_parser()
    parser.description = "Train a LoRA (or another network module) for Stable Diffusion XL"
    add_sdxl_training_arguments(parser)
    return parser


def setup_flux_network_parser() -> argparse.ArgumentParser:
    """The parser of flux_train_network.py: train_network.py's flags plus the DiT and FLUX ones."""
    parser = setup_network_parser()
    parser.description = "Train a LoRA (or another network module) for FLUX.1 dev/schnell"
    add_dit_training_arguments(parser)
    add_flux_training_arguments(parser)
    return parser


def setup_sd3_network_parser() -> argparse.ArgumentParser:
    """The parser of sd3_train_network.py: train_network.py's flags plus the DiT and SD3 ones."""
    parser = setup_network_parser()
    parser.description = "Train a LoRA (or another network module) for SD3 / SD3.5"
    add_dit_training_arguments(parser)
    add_sd3_training_arguments(parser)
    return parser


def add_textual_inversion_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the textual inversion scripts (kohya's train_textual_inversion.py; docs/train_textual_inversion.md)."""
    g = parser.add_argument_group("textual inversion")
    g.add_argument("--save_model_as", type=str, default="pt", choices=[None, "ckpt", "pt", "safetensors"],
                   help="format of the saved embedding (default pt)")
    g.add_argument("--weights", type=str, default=None, help="embedding file to continue training from")
    g.add_argument("--num_vectors_per_token", type=int, default=1, help="vectors (tokens) the embedding has")
    g.add_argument("--token_string", type=str, default=None,
                   help="the new word (required); it must be new to the tokenizer and appear in the captions "
                        "(unless a template is used)")
    g.add_argument("--init_word", type=str, default=None,
                   help="word whose token embedding(s) start the vectors (default: random vectors)")
    g.add_argument("--use_object_template", action="store_true",
                   help="replace every caption by an object template ('a photo of a <token>', ...)")
    g.add_argument("--use_style_template", action="store_true",
                   help="replace every caption by a style template ('a painting in the style of <token>', ...)")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 under mixed precision")


def setup_textual_inversion_parser() -> argparse.ArgumentParser:
    """The parser of train_textual_inversion.py (SD 1.x/2.x): no caption dropout, no weighted captions."""
    parser = argparse.ArgumentParser(description="Train a textual inversion embedding for Stable Diffusion 1.x/2.x")
    add_logging_arguments(parser)
    add_sd_models_arguments(parser)
    add_model_spec_arguments(parser)
    add_dataset_arguments(parser, support_dreambooth=True, support_caption=True, support_caption_dropout=False)
    add_training_arguments(parser)
    add_optimizer_arguments(parser)
    add_validation_arguments(parser)
    add_noise_and_loss_arguments(parser)
    add_custom_train_arguments(parser, support_weighted_captions=False)
    add_masked_loss_arguments(parser)
    add_textual_inversion_arguments(parser)
    return parser


def setup_sdxl_textual_inversion_parser() -> argparse.ArgumentParser:
    """The parser of sdxl_train_textual_inversion.py: the SD one plus the SDXL flags (whose text
    encoder output caching the script refuses, as the reference does)."""
    parser = setup_textual_inversion_parser()
    parser.description = "Train a textual inversion embedding (clip_l + clip_g) for Stable Diffusion XL"
    add_sdxl_training_arguments(parser)
    return parser
