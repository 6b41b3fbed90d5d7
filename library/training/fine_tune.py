"""Full fine-tuning and DreamBooth: the model itself is the training target, saved as a checkpoint.

:class:`ModelTarget` plugs into the shared loop (:class:`library.training.trainer.Trainer`) the way
a network does (:class:`library.training.targets.NetworkTarget`). What it trains: the denoiser,
and the text encoders with ``--train_text_encoder`` (``train_db.py``: unless
``--stop_text_encoder_training -1``; they stop after N steps with a positive N). Trained weights
are kept in float32 (``--full_fp16``/``--full_bf16``: in that dtype), frozen ones in the
``--mixed_precision`` dtype.

Learning rates: the denoiser gets ``--learning_rate`` (SDXL ``--block_lr``: one value per U-Net
block, 23 values as for ``networks.lora``'s block options), the text encoders
``--learning_rate_te`` (SDXL ``--learning_rate_te1``/``--learning_rate_te2``), each defaulting to
``--learning_rate``. Groups are named ``unet`` (``unet_block<i>``), ``textencoder``
(``textencoder1``/``textencoder2``) in the ``lr/<name>`` logs.

Saving (``--save_model_as``): ``safetensors``/``ckpt`` write one file in the original layout of the
family (:meth:`library.families.base.ModelFamily.checkpoint_state_dict`); parts that were not
trained are copied from the input file when it is a single file, so they are bit-identical to it
unless ``--save_precision`` asks for another dtype. ``diffusers``/``diffusers_safetensors`` write a
Diffusers folder. Unset: the input's own format (``--use_safetensors`` picks safetensors). Every
write is atomic (a temporary file or folder renamed into place).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from library.args import ArgumentError
from library.families.base import FamilyModels, ModelFamily
from library.io_utils import save_safetensors, save_torch
from library.training.targets import TrainingTarget

logger = logging.getLogger(__name__)

CHECKPOINT_FORMATS = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")
STABILITY_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def resolve_save_format(args) -> str:
    """``--save_model_as``, or the input model's own format when unset (``--use_safetensors``: safetensors)."""
    if args.save_model_as:
        return args.save_model_as
    source = Path(args.pretrained_model_name_or_path)
    if source.is_dir():
        return "diffusers_safetensors" if args.use_safetensors else "diffusers"
    if args.use_safetensors or source.suffix.lower() == ".safetensors":
        return "safetensors"
    return "ckpt"


def parse_block_lr(text: str | None, num_blocks: int) -> list[float] | None:
    """``--block_lr 1e-5,1e-5,...`` -> one lr per U-Net block (``num_blocks`` values) or None."""
    if not text:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ArgumentError(f"--block_lr {text!r}: give {num_blocks} comma-separated learning rates") from None
    if len(values) != num_blocks:
        raise ArgumentError(f"--block_lr has {len(values)} values; SDXL's U-Net has {num_blocks} blocks (0: time/size "
                            "embeddings, 1-9: input blocks, 10-12: middle block, 13-21: output blocks, 22: out)")
    return values


class ModelTarget(TrainingTarget):
    """The denoiser (and optionally the text encoders) of the base model, saved as a checkpoint."""

    tool_kind = "fine_tune"
    trains_base_weights = True

    def __init__(self, *, default_train_text_encoder: bool = False) -> None:
        #: train_db.py trains the text encoder unless told otherwise; fine_tune.py / sdxl_train.py only when asked
        self.default_train_text_encoder = default_train_text_encoder
        self.family: ModelFamily | None = None
        self.models: FamilyModels | None = None
        self.stop_text_encoder_step: int | None = None
        self.prepared: list[nn.Module] = []
        self.save_format = "safetensors"

    # --- set-up --------------------------------------------------------------------------------
    def validate_args(self, args) -> None:
        if args.fp8_base or getattr(args, "fp8_base_unet", False):
            raise ArgumentError("--fp8_base stores frozen weights in fp8; a fine-tune trains the weights: drop it")
        stop = getattr(args, "stop_text_encoder_training", None)
        train_te = bool(getattr(args, "train_text_encoder", False)) or self.default_train_text_encoder
        if stop is not None and stop == -1:
            train_te = False  # train_db.py: -1 means the text encoder is never trained
        elif stop is not None and stop < -1:
            raise ArgumentError(f"--stop_text_encoder_training {stop}: give a step count, or -1 to never train "
                                "the text encoder")
        self.stop_text_encoder_step = stop if stop is not None and stop > 0 else None
        self.train_text_encoder = train_te
        self.text_encoders_trained = train_te  # stays True after --stop_text_encoder_training: they are saved
        if train_te and (getattr(args, "cache_text_encoder_outputs", False)
                         or getattr(args, "cache_text_encoder_outputs_to_disk", False)):
            raise ArgumentError("--cache_text_encoder_outputs runs the text encoders once, so they cannot be trained: "
                                "drop --train_text_encoder or the caching")
        # network-script flags the shared validation reads
        args.network_train_unet_only = not train_te
        self.save_format = args.save_model_as = resolve_save_format(args)  # the save policy names files by it
        self.block_lr = parse_block_lr(getattr(args, "block_lr", None), 23)
        if getattr(args, "diffusers_xformers", False):
            args.xformers = True  # the same attention switch for our (diffusers) models
        from library.training.fused_backward import check_fused_args

        check_fused_args(args)  # before loading; the trainer checks again with the process count

    def create(self, args, family: ModelFamily, models: FamilyModels) -> None:
        self.family, self.models = family, models
        self._source = Path(args.pretrained_model_name_or_path)

    def trained_dtype(self, weight_dtype: torch.dtype, args) -> torch.dtype:
        return weight_dtype if (args.full_fp16 or args.full_bf16) else torch.float32

    def trained_modules(self) -> list[nn.Module]:
        models = self.models
        return [models.denoiser, *(models.text_encoders if self.train_text_encoder else [])]

    def prepare_for_training(self, args, family: ModelFamily, models: FamilyModels) -> None:
        for module in self.trained_modules():
            module.requires_grad_(True)
            module.train()  # also makes gradient checkpointing active
        self.prepared = self.trained_modules()

    # --- optimizer -----------------------------------------------------------------------------
    def optimizer_params(self, args):
        groups: list[dict] = []
        names: list[str] = []
        denoiser = self.models.denoiser
        if self.block_lr is not None:
            by_block = self.family.denoiser_parameter_blocks(self.models)
            for block in sorted(by_block):
                lr = self.block_lr[block]
                if lr == 0:
                    for p in by_block[block]:
                        p.requires_grad_(False)
                    logger.info("--block_lr: block %d has lr 0 and is frozen", block)
                    continue
                groups.append({"params": by_block[block], "lr": lr})
                names.append(f"unet_block{block}")
        else:
            groups.append({"params": [p for p in denoiser.parameters() if p.requires_grad], "lr": args.learning_rate})
            names.append("unet")
        if self.train_text_encoder:
            lrs = self.family.text_encoder_learning_rates(args)
            encoders = self.models.text_encoders
            if len(set(lrs)) == 1 or len(encoders) == 1:
                groups.append({"params": [p for te in encoders for p in te.parameters()], "lr": lrs[0]})
                names.append("textencoder")
            else:
                for index, (te, lr) in enumerate(zip(encoders, lrs)):
                    groups.append({"params": list(te.parameters()), "lr": lr})
                    names.append(f"textencoder{index + 1}")
        return groups, names

    # --- accelerate ----------------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        return list(self.prepared)

    def set_prepared(self, prepared: list[nn.Module], accelerator) -> None:
        self.prepared = list(prepared)
        # The family calls models.denoiser / the text encoders: give it the prepared (wrapped) ones.
        self.models.denoiser = prepared[0]
        if self.train_text_encoder:
            for i, te in enumerate(prepared[1:]):
                self.models.text_encoders[i] = te
        self._accelerator = accelerator

    def cast_for_full_precision(self, dtype: torch.dtype) -> None:
        for module in self.trained_modules():
            module.to(dtype)

    def trainable_parameters(self):
        return [p for m in self.prepared for p in m.parameters() if p.requires_grad]

    def after_optimizer_step(self, args, step: int, device):
        if self.train_text_encoder and self.stop_text_encoder_step is not None and step >= self.stop_text_encoder_step:
            # Frozen from now on: no gradients, so the optimizer leaves their weights alone.
            for te in self.models.text_encoders:
                te.requires_grad_(False)
                te.eval()
            self.train_text_encoder = False
            logger.info("--stop_text_encoder_training: text encoder training stopped at step %d", step)
        return None

    # --- saving --------------------------------------------------------------------------------
    def save(self, path: Path, dtype, metadata, *, epoch: int, step: int) -> None:
        unwrap = self._accelerator.unwrap_model
        models = self.models
        saved = FamilyModelsView(models, unwrap)
        trained_parts = {"denoiser"} | ({"text_encoders"} if self.text_encoders_trained else set())
        if self.save_format in ("diffusers", "diffusers_safetensors"):
            save_diffusers_atomically(self.family, saved, path, dtype=dtype,
                                      safe_serialization=self.save_format == "diffusers_safetensors")
            return
        state = self.family.checkpoint_state_dict(saved)
        state = keep_untrained_parts(state, self.family.checkpoint_prefixes(), trained_parts,
                                     self._source, dtype)
        spec = checkpoint_modelspec(metadata)
        if self.save_format == "safetensors":
            save_safetensors(state, path, spec or None)
        else:
            save_torch({"state_dict": state, "epoch": epoch, "global_step": step}, path)


class FamilyModelsView:
    """``FamilyModels`` with accelerate's wrappers taken off (what is saved)."""

    def __init__(self, models: FamilyModels, unwrap) -> None:
        self.denoiser = unwrap(models.denoiser)
        self.vae = models.vae
        self.text_encoders = [unwrap(te) for te in models.text_encoders]
        self.tokenizers = models.tokenizers
        self.extra = models.extra


def checkpoint_modelspec(metadata: dict[str, str]) -> dict[str, str]:
    """The ``modelspec.*`` keys of a full checkpoint from those of the run (the ``ss_*`` training record
    is a network file's metadata): the architecture without ``/lora`` and Stability's implementation URL,
    as the reference writes for full SD/SDXL checkpoints."""
    spec = {k: v for k, v in metadata.items() if k.startswith("modelspec.")}
    if "modelspec.architecture" in spec:
        spec["modelspec.architecture"] = spec["modelspec.architecture"].removesuffix("/lora")
        spec["modelspec.implementation"] = STABILITY_IMPLEMENTATION
    if spec.get("modelspec.title", "").startswith("LoRA@"):
        spec["modelspec.title"] = "Checkpoint@" + spec["modelspec.title"][len("LoRA@"):]
    return spec


def keep_untrained_parts(state: dict[str, torch.Tensor], prefixes: dict[str, tuple[str, ...]], trained: set[str],
                         source: Path | None, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``state`` with the tensors of untrained parts taken from the ``source`` single file (when it is
    one and holds them), so they are written back exactly as they were read; then everything cast to
    ``dtype`` (``--save_precision``) when given. ``prefixes`` maps part names to their key prefixes."""
    if source is not None and source.is_file() and source.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        untrained = tuple(p for part, ps in prefixes.items() if part not in trained for p in ps)
        with safe_open(str(source), "pt") as f:
            names = set(f.keys())
            for key in state:
                if key.startswith(untrained) and key in names:
                    state[key] = f.get_tensor(key)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_diffusers_atomically(family: ModelFamily, models, folder: Path, *, dtype, safe_serialization: bool) -> None:
    """Write a Diffusers folder into ``<folder>.tmp`` and rename it into place (no half-written folder)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    family.save_diffusers(models, tmp, dtype=dtype, safe_serialization=safe_serialization)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


class DreamBoothTarget(ModelTarget):
    """``train_db.py``: the text encoder trains by default (``--stop_text_encoder_training``)."""

    tool_kind = "dreambooth"

    def __init__(self) -> None:
        super().__init__(default_train_text_encoder=True)
