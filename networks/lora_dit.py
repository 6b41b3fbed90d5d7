"""What the LoRA network modules of the DiT families (``networks.lora_flux``, ``networks.lora_sd3``) share.

Both adapt the Linear layers of a transformer's blocks, named by the module path in the original
checkpoint layout (so LoRA names and checkpoint keys cannot disagree), plus text encoders named
``lora_te<N>_``. Shared here: text-encoder scopes (CLIP by the transformers-4 ``text_model.`` path,
T5 by its own path), block-index lists (``0,2,5-10``), rank lists (``[4,0,4]``), the split q/k/v
module (:class:`SplitLoRAModule`), per-layer-type ranks, the default rank and alpha, planning a DiT
module (optionally split) and assembling / loading a :class:`LoRANetwork`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from networks.lora import (
    DEFAULT_NETWORK_ALPHA, DEFAULT_NETWORK_DIM, TEXT_ENCODER_TARGET_CLASSES, ModelScope, _arg_value, _network_from_plan,
    clip_text_file_path, plan_from_weights, parse_network_args as parse_common_args,
)
from networks.lora_modules import LoRAModule
from networks.lora_network import LoRANetwork, PlannedModule, weights_of

logger = logging.getLogger(__name__)

__all__ = ["T5_TARGET_CLASSES", "TextEncoderSpec", "text_encoder_scopes", "as_list", "linears", "parse_block_indices",
           "parse_rank_list", "parse_type_dims", "TypeDimArgs", "network_dim_alpha", "common_args",
           "plan_text_encoder_modules", "plan_dit_module", "SplitLoRAModule", "assemble_network", "network_from_weights"]

T5_TARGET_CLASSES = ("T5Attention", "T5DenseGatedActDense")

#: one planned DiT module and, with ``split_qkv``, the output sizes of its fused parts
SplitPlan = tuple[PlannedModule, "tuple[int, ...] | None"]


@dataclass(frozen=True)
class TextEncoderSpec:
    """How one text encoder of a family is named in the file: ``lora_te1`` + CLIP paths, ``lora_te3`` + T5 paths."""

    prefix: str
    kind: str  # "clip" or "t5"


def as_list(text_encoders) -> list[nn.Module | None]:
    if text_encoders is None:
        return []
    if isinstance(text_encoders, (list, tuple)):
        return list(text_encoders)
    return [text_encoders]


def text_encoder_scopes(text_encoders, specs: Sequence[TextEncoderSpec],
                        include: Sequence[bool] | None = None) -> list[ModelScope]:
    """Scopes of the text encoders in ``specs`` order (None entries, or ``include[i]`` False, skipped)."""
    scopes = []
    for index, (encoder, spec) in enumerate(zip(as_list(text_encoders), specs)):
        if encoder is None or (include is not None and not include[index]):
            continue
        if spec.kind == "clip":
            scopes.append(ModelScope(spec.prefix, encoder, TEXT_ENCODER_TARGET_CLASSES, te_index=index,
                                     file_path=clip_text_file_path(encoder)))
        else:
            scopes.append(ModelScope(spec.prefix, encoder, T5_TARGET_CLASSES, te_index=index))
    return scopes


def linears(module: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for path, layer in module.named_modules():
        if isinstance(layer, nn.Linear):
            yield path, layer


def parse_block_indices(text: str | None, count: int, key: str) -> list[int]:
    """``"all"`` / ``"none"`` / ``"0,2,5-10"`` -> sorted block indices in ``[0, count)``."""
    if text is None or text.strip().lower() in ("", "all"):
        return list(range(count))
    if text.strip().lower() == "none":
        return []
    indices: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"--network_args {key}={text!r}: '{part}' is not an index or a range like 5-10")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if low > high:
            raise ValueError(f"--network_args {key}={text!r}: the range '{part}' is reversed; write {high}-{low}")
        if high >= count:
            raise ValueError(f"--network_args {key}={text!r}: '{part}' is outside the model's {count} blocks "
                             f"(0-{count - 1})")
        indices.update(range(low, high + 1))
    return sorted(indices)


def parse_rank_list(text: object, key: str, names: Sequence[str]) -> tuple[int, ...] | None:
    """``"[4,0,4]"`` -> ranks, one per entry of ``names`` (0 = no LoRA there); None when unset."""
    if text is None or not str(text).strip():
        return None
    values = [v.strip() for v in str(text).strip().strip("[]").split(",") if v.strip()]
    if len(values) != len(names) or not all(v.isdigit() for v in values):
        example = ",".join("4" if i == 0 else "0" for i in range(len(names)))
        raise ValueError(f"--network_args {key}={text!r}: give {len(names)} ranks [{','.join(names)}], "
                         f"e.g. {key}=[{example}] (0 = no LoRA on that layer)")
    return tuple(int(v) for v in values)


def parse_type_dims(kwargs: Mapping[str, object], keys: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """The per-layer-type ranks among ``keys`` that ``--network_args`` sets: ``((key, rank), ...)``
    in ``keys`` order (ranks >= 0; 0 = no LoRA on that type); raises ``ValueError`` naming a bad key."""
    return tuple((k, _arg_value(kwargs, k, int, low=0)) for k in keys if _arg_value(kwargs, k, int, low=0) is not None)


class TypeDimArgs:
    """Mixin of the families' network-args dataclasses: the per-layer-type ranks they parsed
    (``type_dims``, from :func:`parse_type_dims`) and the rank of one type."""

    type_dims: tuple[tuple[str, int], ...]

    def type_dim(self, key: str, default: int) -> int:
        """The rank ``--network_args`` gives layer type ``key``, else ``default`` (``network_dim``)."""
        return dict(self.type_dims).get(key, default)


def network_dim_alpha(network_dim: int | None, network_alpha: float | None) -> tuple[int, float]:
    """``--network_dim`` / ``--network_alpha`` with ``networks.lora``'s defaults for None (4, 1.0);
    raises ``ValueError`` for a rank that is not positive."""
    dim = DEFAULT_NETWORK_DIM if network_dim is None else int(network_dim)
    alpha = DEFAULT_NETWORK_ALPHA if network_alpha is None else float(network_alpha)
    if dim <= 0:
        raise ValueError(f"--network_dim must be a positive integer, got {network_dim}")
    return dim, alpha


def common_args(kwargs: Mapping[str, object], own_keys: frozenset[str]):
    """``networks.lora``'s options (dropouts, LoRA+, verbose); the family's own keys are not "unknown"."""
    return parse_common_args({k: v for k, v in kwargs.items() if k not in own_keys})


def plan_text_encoder_modules(scopes: Sequence[ModelScope], dim: int, alpha: float) -> list[PlannedModule]:
    """Every Linear inside the target blocks of the text-encoder scopes, at ``dim``/``alpha``."""
    planned = []
    for scope in scopes:
        if scope.te_index is None:
            continue
        for block_path, block in scope.root.named_modules():
            if not any(cls.__name__ in scope.target_classes for cls in type(block).__mro__):
                continue
            for sub, layer in linears(block):
                path = ".".join(p for p in (block_path, sub) if p)
                planned.append(PlannedModule(scope.lora_name(path), layer, dim, alpha, scope.te_index))
    return planned


def plan_dit_module(prefix: str, path: str, layer: nn.Module, rank: int, alpha: float,
                    split_sizes: tuple[int, ...] | None) -> SplitPlan:
    """The plan of one DiT layer at module ``path``, named ``<prefix>_<path with _>``.

    With ``split_sizes`` (a fused layer trained as one LoRA per part), the stored LoRA has rank
    ``parts x rank`` and alpha ``parts x alpha``, so each part's scale is ``alpha / rank``.
    """
    parts = len(split_sizes) if split_sizes else 1
    name = f"{prefix}_{path.replace('.', '_')}"
    return PlannedModule(name, layer, rank * parts, alpha * parts), split_sizes


class SplitLoRAModule(LoRAModule):
    """A LoRA on a fused layer (``qkv``, FLUX's ``linear1``) trained as one independent LoRA per part.

    Stored as one standard LoRA of rank ``parts x r`` whose ``lora_up`` is block-diagonal: part
    ``i``'s outputs only see rank channels ``i*r .. (i+1)*r``. The mask is applied in the forward
    (and off-diagonal weights start at zero and get zero gradient), so the file needs no
    conversion to load anywhere such a LoRA loads.
    """

    def __init__(self, *args, split_sizes: Sequence[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        parts = len(split_sizes)
        if self.lora_dim % parts or sum(split_sizes) != self.lora_up.weight.shape[0]:
            raise ValueError(f"{self.lora_name}: split sizes {list(split_sizes)} do not fit rank {self.lora_dim} "
                             f"and {self.lora_up.weight.shape[0]} outputs")
        rank = self.lora_dim // parts
        mask = torch.zeros_like(self.lora_up.weight)
        start = 0
        for i, size in enumerate(split_sizes):
            mask[start:start + size, i * rank:(i + 1) * rank] = 1.0
            start += size
        self.register_buffer("up_mask", mask, persistent=False)
        self.register_load_state_dict_post_hook(SplitLoRAModule._mask_loaded_up)

    def _masked_up(self, lx: torch.Tensor) -> torch.Tensor:
        weight = self.lora_up.weight * self.up_mask.to(self.lora_up.weight.dtype)
        return nn.functional.linear(lx, weight)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        org_out = self.org_forward(x, *args, **kwargs)
        if self.training and self.module_dropout and torch.rand((), device="cpu") < self.module_dropout:
            return org_out
        lx = self.lora_down(x)
        scale = self.scale
        if self.training:
            if self.dropout:
                lx = nn.functional.dropout(lx, p=self.dropout, training=True)
            if self.rank_dropout:
                keep = torch.rand((lx.shape[0],) + (1,) * (lx.dim() - 2) + (self.lora_dim,), device=lx.device)
                lx = lx * (keep >= self.rank_dropout).to(lx.dtype)
                scale = scale / (1.0 - self.rank_dropout)
        return org_out + self._masked_up(lx) * (self.multiplier * scale)

    @staticmethod
    def _mask_loaded_up(module: "SplitLoRAModule", incompatible_keys) -> None:
        # A load_state_dict *post* hook: torch loads a module's own tensors before its children's,
        # so in _load_from_state_dict lora_up would still hold its old values.
        with torch.no_grad():
            weight = module.lora_up.weight
            if weight.is_meta:
                return
            # A file from a plain LoRA has dense up weights; the split network can only hold the
            # block-diagonal part, so say what is dropped instead of silently changing it.
            outside = (weight * (1 - module.up_mask.to(weight.dtype))).abs().sum()
            if float(outside) > 0:
                logger.warning("%s: the file's lora_up is not block-diagonal; split_qkv keeps only the "
                               "per-part blocks", module.lora_name)
                weight.mul_(module.up_mask.to(weight.dtype))


def _use_split_modules(network: LoRANetwork, splits: Mapping[str, tuple[PlannedModule, tuple[int, ...]]],
                       multiplier: float, dropout, common) -> None:
    """Replace the planned plain modules of fused layers by :class:`SplitLoRAModule` s."""
    for index, lora in enumerate(network.unet_loras):
        if lora.lora_name not in splits:
            continue
        # The alpha comes from the plan, not from the module's buffer: reading a buffer is a host
        # sync, and impossible for a shape-only (meta) model.
        plan, sizes = splits[lora.lora_name]
        split = SplitLoRAModule(lora.lora_name, lora.org_module, multiplier, plan.rank,
                                plan.alpha, dropout=dropout, rank_dropout=common.rank_dropout,
                                module_dropout=common.module_dropout, split_sizes=sizes)
        network.add_module(lora.lora_name, split)
        network.unet_loras[index] = split


def assemble_network(scopes: Sequence[ModelScope], dit_plan: list[SplitPlan], *, dim: int, alpha: float,
                     multiplier: float, neuron_dropout: float | None, common, num_text_encoders: int,
                     train_t5xxl: bool) -> LoRANetwork:
    """The LoRANetwork of ``create_network``: every target Linear of the text-encoder ``scopes`` at
    ``dim``/``alpha``, then the planned DiT modules; fused layers with split sizes become
    :class:`SplitLoRAModule` s.

    ``neuron_dropout`` (``--network_dropout``) None means the ``dropout`` network arg.
    ``num_text_encoders`` is how many lrs ``--text_encoder_lr`` takes (one per encoder of the family,
    whether or not it has modules); ``train_t5xxl`` is the attribute trainers read.
    """
    dropout = neuron_dropout if neuron_dropout is not None else common.dropout
    planned = plan_text_encoder_modules(scopes, dim, alpha) + [plan for plan, _ in dit_plan]
    network = _network_from_plan(planned, multiplier, dropout, common)
    splits = {plan.lora_name: (plan, sizes) for plan, sizes in dit_plan if sizes}
    if splits:
        _use_split_modules(network, splits, multiplier, dropout, common)
    network.train_t5xxl = train_t5xxl
    network.num_text_encoders = num_text_encoders
    return network


def network_from_weights(scopes: Sequence[ModelScope], file: str | os.PathLike | None,
                         weights_sd: Mapping[str, torch.Tensor] | None, *, multiplier: float, common,
                         num_text_encoders: int, t5_prefix: str, for_inference: bool
                         ) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A network shaped like a LoRA file (ranks, alphas and layers from the file), weights loaded."""
    source, weights_sd = weights_of(file, weights_sd)
    planned = plan_from_weights(scopes, weights_sd, source)
    network = _network_from_plan(planned, multiplier, common.dropout, common)
    network.load_state_dict_checked(weights_sd, source)
    network.train_t5xxl = any(k.startswith(t5_prefix + "_") for k in weights_sd)
    network.num_text_encoders = num_text_encoders
    if for_inference:
        network.eval()
        network.requires_grad_(False)
    return network, dict(weights_sd)
