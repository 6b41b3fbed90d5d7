"""What a training run trains and saves: a network module (LoRA, ...) or the model itself.

The loop (:class:`library.training.trainer.Trainer`) is the same for every training method; it
asks its :class:`TrainingTarget` which modules are trained (and wrapped by accelerate), which
parameter groups the optimizer gets, what happens at epoch starts and after optimizer steps, and
how a save is written. Three targets exist:

* :class:`NetworkTarget` (``train_network.py`` and the other ``*_train_network.py``): the base
  models are frozen; a ``--network_module`` network is created, hooked in and saved through the
  kohya plug-in API.
* :class:`library.training.fine_tune.ModelTarget` (``fine_tune.py``, ``train_db.py``,
  ``sdxl_train.py``): the denoiser (and, when asked, the text encoders) are trained and saved as a
  checkpoint.
* :class:`library.training.textual_inversion.EmbeddingTarget` (``train_textual_inversion.py``,
  ``sdxl_train_textual_inversion.py``): new token vectors; saved as an embedding file.
"""

from __future__ import annotations

import abc
import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from library.args import ArgumentError
from library.families.base import FamilyModels, ModelFamily
from library.training.network_extras import merge_base_weights

logger = logging.getLogger(__name__)


def parse_network_args(items: list[str] | None) -> dict[str, str]:
    """``--network_args conv_dim=4 conv_alpha=1`` -> strings, split on the first ``=`` (plug-in API)."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ArgumentError(f"--network_args: '{item}' is not key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _flagged(flag: str, error: Exception) -> str:
    """``error``'s message, starting with the flag it is about unless it names it already."""
    message = str(error)
    return message if message.startswith(flag) else f"{flag}: {message}"


class TrainingTarget(abc.ABC):
    """The trained part of a run. Methods are called by the loop in the order they are listed."""

    #: the kind of tool, for messages that name the script to use for another model family
    #: (a key of ``library.families.script_hints.FIXES``)
    tool_kind: str = "network"
    #: whether the text encoders run with gradients (their forward in the step is not under no_grad)
    train_text_encoder: bool = False
    #: whether this target trains base-model weights (the denoiser, and the text encoders when
    #: ``train_text_encoder``): those are kept in ``trained_dtype``, the frozen ones in the weight dtype
    trains_base_weights: bool = False
    #: whether every image needs a ControlNet conditioning image: the dataset is built as a ControlNet
    #: dataset and batches carry ``conditioning_images`` (``library.dataset_config.build_dataset_group``)
    needs_conditioning_images: bool = False

    def validate_args(self, args) -> None:
        """Flag checks of this training method, before any loading."""

    def prepare_data(self, args, family: ModelFamily, models: FamilyModels, groups: list) -> None:
        """After the base models are loaded and the dataset groups built (training group first, then
        the validation group if any), before ``--debug_dataset`` and caching: tokenizer additions and
        caption replacements (textual inversion)."""

    @abc.abstractmethod
    def create(self, args, family: ModelFamily, models: FamilyModels) -> None:
        """Build what is trained (after the base models are loaded and the caches filled)."""

    def trained_dtype(self, weight_dtype: torch.dtype, args) -> torch.dtype:
        """The dtype the trained base-model parts are kept in (frozen parts use ``weight_dtype``)."""
        return weight_dtype

    @abc.abstractmethod
    def prepare_for_training(self, args, family: ModelFamily, models: FamilyModels) -> None:
        """After the base models are placed: make the trained parameters trainable, checkpointing."""

    @abc.abstractmethod
    def optimizer_params(self, args) -> tuple[list, list[str] | None]:
        """Optimizer parameter groups and their names (for ``lr/<name>`` logs; None: unnamed)."""

    @abc.abstractmethod
    def modules(self) -> list[nn.Module]:
        """The trained modules: wrapped by ``accelerator.prepare`` and put in eval mode around
        previews and validation."""

    def set_prepared(self, prepared: list[nn.Module], accelerator) -> None:
        """Receive the modules ``accelerator.prepare`` returned (same order as :meth:`modules`)."""

    def cast_for_full_precision(self, dtype: torch.dtype) -> None:
        """``--full_fp16`` / ``--full_bf16``: keep the trained weights in ``dtype``."""
        for module in self.modules():
            module.to(dtype)

    @abc.abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What ``--max_grad_norm`` clips."""

    def on_epoch_start(self, family: ModelFamily, models: FamilyModels) -> None:
        """Called before every epoch."""

    def after_optimizer_step(self, args, step: int, device) -> Any:
        """Called once per optimizer step (not per accumulation micro-batch); may return logs."""
        return None

    @abc.abstractmethod
    def save(self, path: Path, dtype: torch.dtype | None, metadata: dict[str, str], *, epoch: int, step: int) -> None:
        """Write the trained result to ``path`` (atomically)."""

    def metadata_args(self) -> dict[str, str]:
        """``ss_network_args`` of the metadata (networks only)."""
        return {}

    def prompt_text(self, text: str) -> str:
        """A preview prompt (or negative prompt) as it is encoded (textual inversion expands its token)."""
        return text


class SingleNetworkTarget(TrainingTarget):
    """A target that trains one network object of the kohya plug-in API (``get_trainable_params``,
    ``prepare_optimizer_params``): ``self.network``, which ``accelerator.prepare`` wraps as ``self.prepared``."""

    network: Any = None
    prepared: Any = None

    def modules(self) -> list[nn.Module]:
        return [self.prepared]

    def set_prepared(self, prepared: list[nn.Module], accelerator) -> None:
        self.prepared = prepared[0]
        self.network = accelerator.unwrap_model(self.prepared)

    def cast_for_full_precision(self, dtype: torch.dtype) -> None:
        self.network.to(dtype)

    def trainable_parameters(self):
        return self.network.get_trainable_params()


class NetworkTarget(SingleNetworkTarget):
    """A ``--network_module`` network (LoRA, ...) on frozen base models, through the kohya plug-in API."""

    def __init__(self) -> None:
        self.network = None
        self.prepared = None
        self.network_args: dict[str, str] = {}
        self._family: ModelFamily | None = None
        self._models: FamilyModels | None = None

    def create(self, args, family: ModelFamily, models: FamilyModels) -> None:
        args.network_module = args.network_module or family.default_network_module  # also in the metadata
        try:
            module = importlib.import_module(args.network_module)
        except ImportError as e:
            raise ArgumentError(f"--network_module {args.network_module}: cannot import it ({e})") from e
        network_args = parse_network_args(args.network_args)
        text_encoders = family.network_text_encoders(models)
        if getattr(args, "base_weights", None):  # merged first: the new network trains on top of them
            merge_base_weights(module, args.base_weights, args.base_weights_multiplier, models.vae, text_encoders,
                               models.denoiser)
        # The plug-in API reports bad --network_args values (and weights that do not fit) as ValueError
        # with a message for the user: shown as one line naming the flag, not as a traceback.
        try:
            if args.dim_from_weights:
                network, _ = module.create_network_from_weights(1.0, args.network_weights, models.vae,
                                                                text_encoders, models.denoiser, **network_args)
            else:
                kwargs = dict(network_args)
                if args.network_dropout is not None:
                    kwargs.setdefault("dropout", str(args.network_dropout))  # the name LyCORIS reads
                network = module.create_network(1.0, args.network_dim, args.network_alpha, models.vae, text_encoders,
                                                models.denoiser, neuron_dropout=args.network_dropout, **kwargs)
        except ValueError as e:
            flag = "--network_weights" if args.dim_from_weights else "--network_args"
            raise ArgumentError(_flagged(flag, e)) from None
        if network is None:
            raise ArgumentError(f"--network_module {module.__name__}: create_network returned nothing")
        if hasattr(network, "prepare_network"):
            network.prepare_network(args)
        network.apply_to(text_encoders, models.denoiser, not args.network_train_unet_only,
                         not args.network_train_text_encoder_only)
        if args.network_weights:
            try:
                info = network.load_weights(args.network_weights)
            except ValueError as e:  # another model's LoRA, other shapes, a damaged file
                raise ArgumentError(_flagged("--network_weights", e)) from None
            logger.info("loaded network weights from %s: %s", args.network_weights, info)
        self.network, self.prepared, self.network_args = network, network, network_args
        # A network without text encoder modules (OFT, or a LoRA whose TE part was dropped) runs the
        # encoders without gradients; modules that do not say so are assumed to train them.
        self.train_text_encoder = not args.network_train_unet_only and bool(getattr(network, "train_text_encoder", True))
        self._family, self._models = family, models

    def prepare_for_training(self, args, family: ModelFamily, models: FamilyModels) -> None:
        if args.gradient_checkpointing:
            self.network.enable_gradient_checkpointing()
        self.network.prepare_grad_etc(family.network_text_encoders(models), models.denoiser)

    def optimizer_params(self, args):
        """The network's parameter groups; ``--text_encoder_lr a b`` gives each text encoder its own lr
        where the network module supports it (kohya's ``prepare_optimizer_params_with_multiple_te_lrs``)."""
        te_lrs = list(args.text_encoder_lr or [])
        unet_lr = args.unet_lr if not args.network_train_text_encoder_only else 0
        if len(te_lrs) > 1 and hasattr(self.network, "prepare_optimizer_params_with_multiple_te_lrs"):
            params = self.network.prepare_optimizer_params_with_multiple_te_lrs(te_lrs, unet_lr, args.learning_rate)
        else:
            if len(te_lrs) > 1:
                logger.warning("--network_module %s takes one text encoder learning rate; using the first of %s",
                               args.network_module, te_lrs)
            params = self.network.prepare_optimizer_params(te_lrs[0] if te_lrs else None, unet_lr, args.learning_rate)
        # The plug-in API allows either the groups alone or (groups, names of the groups).
        return params if isinstance(params, tuple) else (params, None)

    def on_epoch_start(self, family: ModelFamily, models: FamilyModels) -> None:
        self.network.on_epoch_start(family.network_text_encoders(models), models.denoiser)

    def after_optimizer_step(self, args, step: int, device):
        max_norm = getattr(args, "scale_weight_norms", None)
        if not max_norm:
            return None
        # The results stay on the device; the trainer reads a block of steps back at once, so
        # max-norm costs no host sync per step.
        return self.network.apply_max_norm_regularization(max_norm, device)

    def save(self, path: Path, dtype, metadata, *, epoch: int, step: int) -> None:
        self.network.save_weights(str(path), dtype, metadata)

    def metadata_args(self) -> dict[str, str]:
        return self.network_args
