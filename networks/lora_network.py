"""The LoRA network object: a set of :class:`LoRAModule` s with the kohya plug-in methods.

Family-agnostic: which layers get a module and what they are called arrives as a list of
:class:`PlannedModule` (see ``networks/lora.py`` for SD 1.x/2.x). The network registers every
module under its file-format name, so ``state_dict()`` *is* the LoRA file's content.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from library.io_utils import addnet_hashes, save_safetensors, save_torch
from networks.lora_diagnostics import format_key_list, guess_lora_kind
from networks.lora_modules import LoRAModule

logger = logging.getLogger(__name__)

__all__ = ["PlannedModule", "LoRANetwork", "load_weights_file", "rename_lora_keys", "weights_of"]


@dataclass(frozen=True)
class PlannedModule:
    """One module to create: its file-format name, the layer, rank, alpha, and owner.

    ``te_index`` is ``None`` for the denoiser (U-Net/DiT), else the text encoder's position.
    ``block`` is the denoiser block that block lr weights address (``None``: no block).
    """

    lora_name: str
    layer: nn.Module
    rank: int
    alpha: float | None
    te_index: int | None = None
    block: int | None = None


def load_weights_file(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a LoRA state dict from ``.safetensors`` or a torch file (``.pt``/``.ckpt``/``.bin``)."""
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weights file not found: {path}")
    try:
        if path.suffix.lower() == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file (safetensors header, zip, pickle): one line, not a traceback
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable LoRA file ({reason}); an interrupted download or copy leaves "
                         f"such files, fetch or save it again") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a LoRA state dict (expected a mapping of names to tensors)")
    return state


def weights_of(file: str | os.PathLike | None, weights_sd: Mapping[str, torch.Tensor] | None
               ) -> tuple[str, Mapping[str, torch.Tensor]]:
    """``(source name for messages, state dict)`` of ``create_network_from_weights``' two ways of
    passing weights: a file, or an already loaded ``weights_sd`` (which wins)."""
    source = str(file) if file is not None else "weights"
    if weights_sd is None:
        if file is None:
            raise ValueError("create_network_from_weights needs a file or weights_sd")
        weights_sd = load_weights_file(file)
    return source, weights_sd


def rename_lora_keys(weights_sd: Mapping[str, torch.Tensor], aliases: Mapping[str, str],
                     source: str = "weights") -> dict[str, torch.Tensor]:
    """``weights_sd`` with every module name found in ``aliases`` replaced by its file-format name.

    Why: a file may spell a module another way than the format we save (diffusers-named SDXL
    LoRAs: ``lora_unet_down_blocks_1_...`` for ``lora_unet_input_blocks_4_1_...``); renaming the
    keys up front lets every later step work with one spelling. Raises ``ValueError`` when a
    module appears under both spellings (the file would set it twice).
    """
    if not aliases:
        return dict(weights_sd)
    renamed: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    count = 0
    for key, value in weights_sd.items():
        name, dot, suffix = key.partition(".")
        target = aliases.get(name, name)
        new_key = f"{target}{dot}{suffix}"
        if new_key in renamed:
            raise ValueError(f"{source}: {key} and {origin[new_key]} are the same module ({target}) in two "
                             "spellings; keep only one of them in the file")
        renamed[new_key] = value
        origin[new_key] = key
        count += target != name
    if count:
        logger.info("%s: %d keys renamed from the model's module paths to the file-format names", source, count)
    return renamed


class LoRANetwork(nn.Module):
    """A LoRA network over one denoiser and zero or more text encoders.

    Modules are created at construction (so ``state_dict()`` is complete right away) and hooked
    into the base models by :meth:`apply_to`. Attributes read by trainers: ``text_encoder_loras``,
    ``unet_loras`` (lists of :class:`LoRAModule`), ``train_unet``, ``train_text_encoder``,
    ``multiplier``.

    ``module_class`` builds each module, called like :class:`LoRAModule` (``name, layer,
    multiplier, rank, alpha, dropout=, rank_dropout=, module_dropout=``): the LoRA variants
    (``networks/dylora.py``, ``networks/lora_fa.py``) and OFT (``networks/oft.py``) pass their own
    module class and reuse everything else. :attr:`module_kind` names the modules in logs.
    """

    module_kind = "LoRA"

    def __init__(
        self,
        planned: Sequence[PlannedModule],
        *,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        loraplus_unet_lr_ratio: float | None = None,
        loraplus_text_encoder_lr_ratio: float | None = None,
        block_lr_weights: Sequence[float] | None = None,
        name_aliases: Mapping[str, str] | None = None,
        module_class: Callable[..., LoRAModule] = LoRAModule,
    ) -> None:
        super().__init__()
        self.multiplier = float(multiplier)
        # other spellings of module names that loading accepts (see rename_lora_keys); saving never uses them
        self.name_aliases: dict[str, str] = dict(name_aliases or {})
        # lr multiplier per denoiser block (index = PlannedModule.block); None: one "unet" group
        self.block_lr_weights = list(block_lr_weights) if block_lr_weights is not None else None
        self._block_of: dict[str, int | None] = {plan.lora_name: plan.block for plan in planned}
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio
        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        self._te_index: dict[str, int] = {}
        self._dropped_names: set[str] = set()
        self._frozen: list[LoRAModule] = []
        #: how many text encoders the base model has (``--text_encoder_lr`` takes one lr each); None: as
        #: many as the modules name (a family whose encoders may have no modules sets it, e.g. FLUX's T5)
        self.num_text_encoders: int | None = None
        for plan in planned:
            if plan.lora_name in self._modules:
                raise ValueError(f"two layers map to the same LoRA name {plan.lora_name}; the naming scheme is ambiguous")
            lora = module_class(
                plan.lora_name, plan.layer, self.multiplier, plan.rank, plan.alpha,
                dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
            )
            self.add_module(plan.lora_name, lora)
            if plan.te_index is None:
                self.unet_loras.append(lora)
            else:
                self.text_encoder_loras.append(lora)
                self._te_index[plan.lora_name] = plan.te_index
        self.train_text_encoder = bool(self.text_encoder_loras)
        self.train_unet = bool(self.unet_loras)
        logger.info("create %s for Text Encoder: %d modules.", self.module_kind, len(self.text_encoder_loras))
        logger.info("create %s for U-Net: %d modules.", self.module_kind, len(self.unet_loras))

    @property
    def loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    # --- applying ----------------------------------------------------------------------------

    def _drop(self, loras: list[LoRAModule]) -> None:
        for lora in loras:
            lora.restore()
            delattr(self, lora.lora_name)
            self._dropped_names.add(lora.lora_name)

    def apply_to(self, text_encoder: Any = None, unet: Any = None, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the modules into their layers. A part not applied is removed from the network.

        ``apply_text_encoder=False`` (``--network_train_unet_only``) or ``apply_unet=False``
        (``--network_train_text_encoder_only``) drop those modules: they are neither trained nor
        saved. The model arguments are accepted for the plug-in API; the modules already know
        their layers.
        """
        if not apply_text_encoder and self.text_encoder_loras:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet and self.unet_loras:
            self._drop(self.unet_loras)
            self.unet_loras = []
        self.train_text_encoder = bool(self.text_encoder_loras)
        self.train_unet = bool(self.unet_loras)
        for lora in self.loras:
            lora.apply_to()
        logger.info(
            "%s applied: %d text encoder modules, %d U-Net modules", self.module_kind, len(self.text_encoder_loras),
            len(self.unet_loras)
        )

    def restore(self) -> None:
        """Unhook every module from its layer (the base models behave as before ``apply_to``)."""
        for lora in reversed(self.loras):
            lora.restore()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for lora in self.loras:
            lora.set_multiplier(multiplier)

    # --- loading -----------------------------------------------------------------------------

    def load_weights(self, file: str | os.PathLike) -> Any:
        """Load a ``.safetensors`` or torch LoRA file; returns ``load_state_dict``'s result."""
        return self.load_state_dict_checked(load_weights_file(file), str(file))

    def load_state_dict_checked(self, weights_sd: Mapping[str, torch.Tensor], source: str = "weights") -> Any:
        """``load_state_dict`` with errors that say what is wrong with the file.

        Module names the network knows in another spelling (:attr:`name_aliases`, e.g. the
        diffusers paths of an SDXL U-Net) are renamed first. Keys naming no module raise
        ``ValueError`` with examples and a guess of what the file is for; a shape mismatch names
        the key and both shapes. Modules dropped by ``apply_to``
        (e.g. text encoder with ``--network_train_unet_only``) are skipped silently; a module
        whose ``alpha`` is missing gets alpha = rank, the file format's rule. Network weights the
        file lacks keep their values (logged).
        """
        own = self.state_dict()
        file_sd = weights_sd  # the names as the file spells them: what the error messages judge
        weights_sd = rename_lora_keys(file_sd, self.name_aliases, source)
        weights = {k: v for k, v in weights_sd.items() if k.partition(".")[0] not in self._dropped_names}
        unexpected = [k for k in weights if k not in own]
        if unexpected:
            raise ValueError(
                f"{source}: {len(unexpected)} of {len(weights_sd)} LoRA weights match no module of this network, e.g. "
                f"{format_key_list(unexpected)}. The file looks like {guess_lora_kind(file_sd)}, while this "
                f"network's own keys look like {guess_lora_kind(own)}. Load the LoRA with the base model it was trained for."
            )
        for key, value in list(weights.items()):
            expected = own[key].shape
            if key.endswith(".alpha") and value.numel() == 1:
                weights[key] = value.reshape(expected)  # some writers store alpha as shape [1]
            elif value.shape != expected:
                raise ValueError(f"{source}: {key} has shape {list(value.shape)} in the file but {list(expected)} in this network. "
                                 + _shape_hint(key, value.shape, expected, file_sd, own))
        for name in {k.partition(".")[0] for k in weights}:
            lora = getattr(self, name)
            if f"{name}.alpha" not in weights and f"{name}.lora_down.weight" in weights:
                weights[f"{name}.alpha"] = lora.alpha.new_tensor(float(lora.lora_dim))
        info = self.load_state_dict(weights, strict=False)
        if info.missing_keys:
            logger.warning(
                "%s: %d network weights are not in the file and keep their current values, e.g. %s",
                source, len(info.missing_keys), format_key_list(info.missing_keys, 3),
            )
        return info

    # --- training hooks ----------------------------------------------------------------------

    def prepare_optimizer_params(
        self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None, default_lr: float | None
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Optimizer param groups and their names for lr logging.

        Groups: ``textencoder`` (``textencoder1``... when several text encoders get different
        lrs from a list) and ``unet``; with block lr weights the U-Net is split into
        ``unet_block<i>`` groups (ascending ``i``) at ``unet lr * weight[i]`` (modules outside
        every block stay in ``unet``). With a LoRA+ ratio, ``lora_up`` weights go to an extra
        ``<group> plus`` group at ``lr * ratio``. A ``None`` lr falls back to ``default_lr``; an
        lr of 0 leaves the group out and freezes its parameters.
        """
        self._frozen = []
        groups: list[dict[str, Any]] = []
        descriptions: list[str] = []

        te_lrs = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
        te_count = self.num_text_encoders or 1 + max(self._te_index.values(), default=0)
        if not te_lrs:
            te_lrs = [None]
        if len(te_lrs) not in (1, te_count):
            raise ValueError(f"--text_encoder_lr has {len(te_lrs)} values but the network has {te_count} text encoders; give 1 or {te_count}")
        if len(set(te_lrs)) == 1:
            self._add_group(groups, descriptions, self.text_encoder_loras, te_lrs[0], default_lr, "textencoder",
                            self.loraplus_text_encoder_lr_ratio)
        else:
            for index, lr in enumerate(te_lrs):
                loras = [lora for lora in self.text_encoder_loras if self._te_index[lora.lora_name] == index]
                self._add_group(groups, descriptions, loras, lr, default_lr, f"textencoder{index + 1}",
                                self.loraplus_text_encoder_lr_ratio)
        if self.block_lr_weights is None:
            self._add_group(groups, descriptions, self.unet_loras, unet_lr, default_lr, "unet", self.loraplus_unet_lr_ratio)
        else:
            self._add_block_groups(groups, descriptions, unet_lr, default_lr)
        return groups, descriptions

    def _add_block_groups(self, groups, descriptions, unet_lr, default_lr) -> None:
        base_lr = default_lr if unet_lr is None else unet_lr
        if base_lr is None and self.unet_loras:
            raise ValueError("block lr weights (down/mid/up_lr_weight) scale a learning rate: set --unet_lr or --learning_rate")
        by_block: dict[int | None, list[LoRAModule]] = {}
        for lora in self.unet_loras:
            by_block.setdefault(self._block_of.get(lora.lora_name), []).append(lora)
        self._add_group(groups, descriptions, by_block.pop(None, []), base_lr, None, "unet", self.loraplus_unet_lr_ratio)
        for block in sorted(by_block):
            # weight 0 gives lr 0, which _add_group turns into frozen modules (e.g. --dim_from_weights)
            self._add_group(groups, descriptions, by_block[block], base_lr * self.block_lr_weights[block], None,
                            f"unet_block{block}", self.loraplus_unet_lr_ratio)

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, default_lr):
        """Same as :meth:`prepare_optimizer_params` (which already accepts a list of TE lrs)."""
        return self.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)

    def _add_group(self, groups, descriptions, loras, lr, default_lr, name, plus_ratio) -> None:
        if not loras:
            return
        lr = default_lr if lr is None else lr
        if lr is not None and float(lr) == 0.0:
            self._frozen.extend(loras)
            for lora in loras:
                lora.requires_grad_(False)
            logger.info("learning rate for %s is 0: its LoRA modules are frozen", name)
            return
        named = [(n, p) for lora in loras for n, p in lora.named_parameters()]
        if plus_ratio:
            if lr is None:
                raise ValueError(f"LoRA+ (loraplus_*_lr_ratio) needs an explicit learning rate for {name}; set --learning_rate")
            parts = [([p for n, p in named if not n.startswith("lora_up.")], lr, name),
                     ([p for n, p in named if n.startswith("lora_up.")], lr * plus_ratio, f"{name} plus")]
        else:
            parts = [([p for _, p in named], lr, name)]
        for params, group_lr, description in parts:
            if not params:
                continue
            group: dict[str, Any] = {"params": params}
            if group_lr is not None:
                group["lr"] = group_lr
            groups.append(group)
            descriptions.append(description)

    def prepare_grad_etc(self, text_encoder: Any = None, unet: Any = None) -> None:
        """Make the network trainable (except groups frozen by an lr of 0)."""
        self.requires_grad_(True)
        for lora in self._frozen:
            lora.requires_grad_(False)

    def on_epoch_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.train()

    def get_trainable_params(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the base models checkpoint their blocks, and the hooked forwards run inside them."""

    # --- saving ------------------------------------------------------------------------------

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None, metadata: Mapping[str, Any] | None = None) -> None:
        """Write the LoRA atomically, cast to ``dtype`` if given.

        ``.safetensors``: with ``metadata`` (values stringified) plus ``sshs_model_hash`` and
        ``sshs_legacy_hash`` when metadata is not None. Other suffixes: ``torch.save`` of the
        state dict (no metadata).
        """
        state = {k: v.detach().to("cpu", dtype=dtype) if dtype is not None else v.detach().cpu() for k, v in self.state_dict().items()}
        if Path(file).suffix.lower() == ".safetensors":
            meta = None
            if metadata is not None:
                meta = {str(k): str(v) for k, v in metadata.items()}
                meta["sshs_model_hash"], meta["sshs_legacy_hash"] = addnet_hashes(state, meta)
            save_safetensors(state, file, meta)
        else:
            save_torch(state, file)

    # --- weight-space operations -------------------------------------------------------------

    def is_mergeable(self) -> bool:
        return True

    @torch.no_grad()
    def merge_to(
        self, text_encoder: Any = None, unet: Any = None, weights_sd: Mapping[str, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> None:
        """Fold every module into its layer's weights (LoRA: add ``multiplier * up @ down * alpha/rank``).

        ``weights_sd`` (if given) is loaded first, and only modules it contains are merged; with
        ``None`` every module is merged with its current weights. The delta is computed in
        float32 on ``device`` (default: the layer's device) and the sum cast back to the layer's
        dtype; ``dtype`` is accepted for the plug-in API. Modules must not be applied (hooked),
        or their delta would count twice.
        """
        names = None
        if weights_sd is not None:
            weights_sd = rename_lora_keys(weights_sd, self.name_aliases, "merge_to weights")
            self.load_state_dict_checked(weights_sd, "merge_to weights")
            names = {k.partition(".")[0] for k in weights_sd}
        merged = 0
        for lora in self.loras:
            if names is not None and lora.lora_name not in names:
                continue
            lora.merge_to_layer(device)  # each module kind knows its weight-space form
            merged += 1
        logger.info("merged %d %s modules into the model weights", merged, self.module_kind)

    @torch.no_grad()
    def apply_max_norm_regularization(
        self, max_norm_value: float, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scale down modules whose ``||up @ down * alpha/rank||`` exceeds ``max_norm_value``.

        The update is scaled by ``max_norm / norm`` (``LoRAModule.scale_delta_``: both factors by its
        square root). Returns ``(keys_scaled,
        mean_norm, max_norm)`` over the norms after capping as 0-dim float tensors on ``device``,
        *without* a host sync: the trainer runs this every step but needs the numbers only when it
        logs, so it converts them then (``float(t)`` / ``int(t)`` work on the tensors as on the
        plain numbers other network modules return).
        """
        if not self.loras:
            zero = torch.zeros((), device=device)
            return zero, zero, zero
        norms = []
        for lora in self.loras:
            norm = lora.delta_weight(torch.float32, device).norm()
            ratio = torch.clamp(max_norm_value / norm, max=1.0)  # a zero norm gives inf -> 1
            lora.scale_delta_(ratio)  # LoRA: both factors by sqrt(ratio); LoRA-FA: only up, by ratio
            norms.append(torch.stack([norm, norm * ratio]))
        stacked = torch.stack(norms)
        return (stacked[:, 0] > max_norm_value).sum().float(), stacked[:, 1].mean(), stacked[:, 1].max()


def _shape_hint(key: str, got: torch.Size, expected: torch.Size, file_sd: Mapping, own_sd: Mapping) -> str:
    rank_axis = 0 if key.endswith("lora_down.weight") else 1
    others_equal = all(g == e for i, (g, e) in enumerate(zip(got, expected)) if i != rank_axis)
    if len(got) == len(expected) and others_equal:
        return (f"The ranks differ (file {got[rank_axis]}, network {expected[rank_axis]}): use --dim_from_weights, "
                "or set --network_dim (conv_dim for 3x3 convs) to the file's rank.")
    return (f"The file looks like {guess_lora_kind(file_sd)}, while this network's own keys look like "
            f"{guess_lora_kind(own_sd)}. Load the LoRA with the base model it was trained for.")
