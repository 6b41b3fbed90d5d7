"""OFT (orthogonal fine-tuning) for the Stable Diffusion 1.x/2.x and SDXL U-Net, with the kohya plug-in API.

``--network_module networks.oft --network_dim 4 --network_alpha 1e-3``. OFT (Qiu et al., 2023,
"Controlling Text-to-Image Diffusion by Orthogonal Finetuning") does not add a low-rank term: it
rotates each adapted layer's output channels by a learned orthogonal matrix ``R``, which keeps
the angles between the layer's neurons (its "hyperspherical energy") and so the pretrained
model's behaviour better than an additive update::

    y' = R^T (W x + b)          (merged: W' = R^T W, b' = R^T b)

``R`` is block-diagonal: ``network_dim`` blocks (default 4) of ``out / network_dim`` channels
each. Every block is the Cayley transform of a skew-symmetric matrix, which is orthogonal by
construction::

    Q = B - B^T                 (B: the trained block, zero-initialised, so R starts as I)
    R = (I + Q)(I - Q)^-1

``network_alpha`` is the constraint of "COFT": the Frobenius norm of all of a module's ``Q``
together is capped at ``alpha · out`` (``Q`` scaled down when larger), which bounds how far
``R`` may move from the identity. kohya's default is ``1e-3`` (used when no alpha is given); an
alpha of 1 or more hardly constrains anything and is warned about; ``0`` disables the constraint.
The multiplier blends with the identity, ``R_m = m·R + (1 − m)·I`` (``m = 1``: ``R``, ``m = 0``:
no change), the same as other tools apply an OFT's strength to the merged weight.

Targets (U-Net only; a text encoder is ignored): every ``nn.Linear`` and 1x1 conv of the
attention modules (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of ``attn1``/``attn2``) by default;
``enable_all_linear=True``: all of them inside the ``Transformer2DModel`` blocks (also
``proj_in``/``proj_out`` and the feed-forward), the same layers ``networks.lora`` adapts;
``enable_conv=True``: also the layers of ``ResnetBlock2D``, ``Downsample2D`` and ``Upsample2D``
(3x3 convs included). Names are ``networks.lora``'s with the prefix ``oft_unet`` (diffusers paths
for SD 1.x/2.x, SGM paths for SDXL; diffusers-named SDXL files load too).

File: ``oft_unet_<module>.oft_blocks`` [blocks, out/blocks, out/blocks] (the trained ``B``) and
``oft_unet_<module>.alpha`` (0-dim, the constraint factor). User documentation: ``docs/networks.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from typing import Mapping, Sequence

import torch
from torch import nn

from networks import lora
from networks.lora_diagnostics import format_key_list, guess_lora_kind
from networks.lora_modules import LayerAdapter, is_lora_target_layer
from networks.lora_network import LoRANetwork, PlannedModule, rename_lora_keys, weights_of

logger = logging.getLogger(__name__)

__all__ = ["create_network", "create_network_from_weights", "OFTModule", "OFTNetwork", "cayley", "oft_unet_scope",
           "DEFAULT_NUM_BLOCKS", "DEFAULT_CONSTRAINT"]

OFT_PREFIX_UNET = "oft_unet"
DEFAULT_NUM_BLOCKS = 4
DEFAULT_CONSTRAINT = 1e-3
#: diffusers' attention class (``CrossAttention`` in old releases and in kohya's own U-Net)
ATTENTION_TARGET_CLASSES = ("Attention", "CrossAttention")
_OFT_ARGS = ("enable_all_linear", "enable_conv", "verbose", "dropout")


def cayley(q: torch.Tensor) -> torch.Tensor:
    """``(I + Q)(I - Q)^-1`` for a batch of square matrices ``q`` [..., n, n] (orthogonal when ``Q`` is skew).

    ``(I + Q)`` and ``(I - Q)^-1`` commute, so this is ``solve(I - Q, I + Q)`` (no explicit inverse).
    """
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    return torch.linalg.solve(eye - q, eye + q)


def _out_features(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


class OFTModule(LayerAdapter):
    """Block-diagonal orthogonal rotation of one layer's output channels (see the module docstring).

    Called like :class:`~networks.lora_modules.LoRAModule` (so :class:`OFTNetwork` builds it from
    the same plans): ``lora_dim`` is the number of blocks, ``alpha`` the constraint factor
    (``None``: :data:`DEFAULT_CONSTRAINT`, ``0``: unconstrained). OFT has no dropout; the dropout
    arguments must be unset.
    """

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0,
                 lora_dim: int = DEFAULT_NUM_BLOCKS, alpha: float | None = DEFAULT_CONSTRAINT,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None) -> None:
        if not is_lora_target_layer(org_module):
            raise TypeError(f"OFT module {lora_name}: cannot adapt a {type(org_module).__name__}; "
                            "only nn.Linear and ungrouped nn.Conv2d layers are supported")
        if dropout or rank_dropout or module_dropout:
            raise ValueError(f"OFT module {lora_name}: OFT has no dropout options")
        out_dim = _out_features(org_module)
        num_blocks = int(lora_dim)
        if num_blocks <= 0 or out_dim % num_blocks:
            raise ValueError(f"OFT module {lora_name}: {out_dim} output channels cannot be split into {lora_dim} "
                             "equal blocks; choose a --network_dim (number of blocks) that divides the layer widths "
                             "(e.g. 4 or 8)")
        super().__init__(lora_name, org_module, multiplier)
        self.out_dim = out_dim
        self.num_blocks = num_blocks
        self.block_size = out_dim // num_blocks
        self.is_conv = isinstance(org_module, nn.Conv2d)
        weight = org_module.weight
        device = weight.device if weight.is_meta else None
        self.oft_blocks = nn.Parameter(torch.zeros(num_blocks, self.block_size, self.block_size, device=device))
        alpha = DEFAULT_CONSTRAINT if alpha is None else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha, device=device))
        self._set_constraint(alpha)
        # inference (eval, no grad) reuses R while the blocks, multiplier and constraint stay the same
        self._rotation_cache: tuple[tuple, torch.Tensor] | None = None

    @property
    def lora_dim(self) -> int:
        """The number of blocks (``network_dim``), under the name the network code reads."""
        return self.num_blocks

    def _set_constraint(self, alpha: float) -> None:
        #: cap on ||Q||_F (None: unconstrained); a float, so the forward needs no host sync
        self.constraint = alpha * self.out_dim if alpha > 0 else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 - torch hook
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.alpha.is_meta:
            self._set_constraint(float(self.alpha))

    # --- math --------------------------------------------------------------------------------

    def skew(self) -> torch.Tensor:
        """``Q = B - B^T`` per block, in float32, scaled down to the constraint when above it."""
        blocks = self.oft_blocks.float()
        q = blocks - blocks.transpose(1, 2)
        if self.constraint is not None:
            norm = torch.linalg.vector_norm(q)
            # = 1 while ||Q|| <= constraint (no gradient through the cap), constraint/||Q|| above it
            q = q * (self.constraint / norm.clamp(min=self.constraint))
        return q

    def rotation(self, multiplier: float | None = None) -> torch.Tensor:
        """The blocks of ``R_m = m·R + (1 − m)·I`` [blocks, size, size] in float32."""
        m = self.multiplier if multiplier is None else float(multiplier)
        r = cayley(self.skew())  # float32: autocast leaves linalg.solve in its input dtype
        if m != 1.0:
            eye = torch.eye(self.block_size, dtype=r.dtype, device=r.device)
            r = m * r + (1.0 - m) * eye
        return r

    def rotate(self, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``y`` with its channels (last dim for Linear, dim 1 for conv) multiplied by the blocks ``r``."""
        r = r.to(y.dtype)
        k, size = self.num_blocks, self.block_size
        if self.is_conv:  # [B, k·size, H, W]: out[b, k, j] = Σ_i R[k, i, j] y[b, k, i] = R[k]ᵀ @ y[b, k]
            blocks = y.reshape(y.shape[0], k, size, -1)
            return torch.matmul(r.transpose(1, 2), blocks).reshape(y.shape)
        # [..., k·size]: one batched matmul over the blocks, rows = every position
        rows = y.reshape(-1, k, size).transpose(0, 1)
        return torch.bmm(rows, r).transpose(0, 1).reshape(y.shape)

    def _inference_rotation(self) -> torch.Tensor:
        blocks = self.oft_blocks
        key = (self.multiplier, self.constraint, blocks.data_ptr(), blocks._version, blocks.device, blocks.dtype)
        if self._rotation_cache is None or self._rotation_cache[0] != key:
            self._rotation_cache = (key, self.rotation())
        return self._rotation_cache[1]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.org_forward(x, *args, **kwargs)
        if self.multiplier == 0.0:
            return out
        if self.training or torch.is_grad_enabled():
            return self.rotate(out, self.rotation())
        return self.rotate(out, self._inference_rotation())

    @torch.no_grad()
    def merge_to_layer(self, device: torch.device | str | None = None) -> None:
        """``W ← R_mᵀ W`` and ``b ← R_mᵀ b`` per block of output channels (float32 on ``device``), so
        the merged layer computes exactly what the applied module does."""
        if self.is_applied:
            raise RuntimeError(f"{self.lora_name} is applied to its layer; call network.restore() before merge_to")
        layer = self.org_module
        device = device or layer.weight.device
        r = self.rotation().to(device)
        for tensor in (layer.weight, layer.bias):
            if tensor is None:
                continue
            value = tensor.to(device, torch.float32).unflatten(0, (self.num_blocks, self.block_size))
            rotated = torch.einsum("kij,ki...->kj...", r, value).flatten(0, 1)
            tensor.copy_(rotated.to(tensor.device, tensor.dtype))

    def extra_repr(self) -> str:
        return (f"name={self.lora_name}, blocks={self.num_blocks}x{self.block_size}, "
                f"constraint={self.constraint}, multiplier={self.multiplier:g}")


class OFTNetwork(LoRANetwork):
    """A network of :class:`OFTModule` s on the U-Net, with the kohya plug-in methods of :class:`LoRANetwork`.

    ``unet_loras`` (also ``unet_ofts``) lists the modules; there are never text encoder modules.
    """

    module_kind = "OFT"

    @property
    def unet_ofts(self) -> list[OFTModule]:
        return self.unet_loras

    def prepare_network(self, args) -> None:
        """Refuse trainer flags that mean nothing for OFT (called by the trainer before ``apply_to``)."""
        from library.args import ArgumentError

        if getattr(args, "network_train_text_encoder_only", False):
            raise ArgumentError("--network_train_text_encoder_only: networks.oft adapts only the U-Net, so nothing "
                                "would be trained; drop the flag")
        if getattr(args, "scale_weight_norms", None):
            raise ArgumentError("--scale_weight_norms is for additive (LoRA) updates; OFT's rotations are bounded by "
                                "its constraint (--network_alpha) instead: drop --scale_weight_norms")

    def apply_max_norm_regularization(self, max_norm_value: float, device=None):
        raise ValueError("--scale_weight_norms does not apply to OFT (its constraint is --network_alpha)")

    def load_state_dict_checked(self, weights_sd: Mapping[str, torch.Tensor], source: str = "weights"):
        """As :meth:`LoRANetwork.load_state_dict_checked`, with a hint when the number of blocks differs."""
        own = self.state_dict()
        renamed = rename_lora_keys(weights_sd, self.name_aliases, source)
        for key, value in renamed.items():
            if key.endswith(".oft_blocks") and key in own and value.shape != own[key].shape:
                raise ValueError(f"{source}: {key} has shape {list(value.shape)} in the file but {list(own[key].shape)} "
                                 f"in this network: the file has {value.shape[0]} blocks per module, the network "
                                 f"{own[key].shape[0]}. Set --network_dim {value.shape[0]} or use --dim_from_weights.")
        return super().load_state_dict_checked(renamed, source)


# --- scope and planning ------------------------------------------------------------------------

def oft_unet_scope(unet: nn.Module, enable_all_linear: bool = False, enable_conv: bool = False) -> lora.ModelScope:
    """``networks.lora``'s U-Net scope (naming, SDXL aliases) with the ``oft_unet`` prefix and OFT's targets."""
    base = lora.unet_scope(unet)
    targets = lora.UNET_TARGET_CLASSES if enable_all_linear else ATTENTION_TARGET_CLASSES
    conv_targets = lora.UNET_CONV_TARGET_CLASSES if enable_conv else ()
    return dataclasses.replace(base, prefix=OFT_PREFIX_UNET, target_classes=targets, conv_target_classes=conv_targets)


def _bool_arg(kwargs: Mapping[str, object], key: str) -> bool:
    raw = kwargs.get(key)
    if raw is None:
        return False
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no", "", "none"):
            return False
        raise ValueError(f"--network_args {key}={raw!r}: expected True or False")
    return bool(raw)


def _warn_unknown(kwargs: Mapping[str, object]) -> None:
    unknown = sorted(k for k in kwargs if k not in _OFT_ARGS)
    if unknown:
        logger.warning("networks.oft ignores unknown --network_args %s (known: %s)", ", ".join(unknown),
                       ", ".join(a for a in _OFT_ARGS if a != "dropout"))


def _no_dropout(neuron_dropout: float | None, kwargs: Mapping[str, object]) -> None:
    dropout = kwargs.get("dropout")
    if neuron_dropout or (dropout not in (None, "", "None", "none") and float(dropout)):
        logger.warning("networks.oft has no dropout: --network_dropout / dropout ignored")


def _network(planned: list[PlannedModule], multiplier: float, aliases: Mapping[str, str], verbose: bool) -> OFTNetwork:
    network = OFTNetwork(planned, multiplier=multiplier, name_aliases=aliases, module_class=OFTModule)
    if verbose:
        for module in network.unet_ofts:
            logger.info("  %s: %d blocks of %d, constraint %s", module.lora_name, module.num_blocks, module.block_size,
                        module.constraint)
    return network


# --- the plug-in API ---------------------------------------------------------------------------

def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: object,
) -> OFTNetwork:
    """A fresh OFT network on ``unet`` (all rotations the identity).

    ``network_dim``: blocks per module (None: 4); ``network_alpha``: the constraint factor (None:
    1e-3; warned about when 1 or more). ``kwargs`` are ``--network_args``: ``enable_all_linear``,
    ``enable_conv`` (``True``/``False``), ``verbose``. ``vae`` and ``text_encoder`` are accepted for
    the plug-in API and not adapted.
    """
    if unet is None:
        raise ValueError("networks.oft adapts the U-Net; create_network got none")
    _warn_unknown(kwargs)
    _no_dropout(neuron_dropout, kwargs)
    num_blocks = DEFAULT_NUM_BLOCKS if network_dim is None else int(network_dim)
    if num_blocks <= 0:
        raise ValueError(f"--network_dim (the number of OFT blocks) must be a positive integer, got {network_dim}")
    alpha = DEFAULT_CONSTRAINT if network_alpha is None else float(network_alpha)
    if alpha < 0:
        raise ValueError(f"--network_alpha (the OFT constraint) must be >= 0, got {network_alpha}")
    if alpha >= 1:
        logger.warning("networks.oft: --network_alpha %g is the constraint factor (cap on ||Q|| = alpha x channels); "
                       "values >= 1 barely constrain the rotations, kohya's default is 1e-3", alpha)
    scope = oft_unet_scope(unet, _bool_arg(kwargs, "enable_all_linear"), _bool_arg(kwargs, "enable_conv"))
    planned = [PlannedModule(name, layer, num_blocks, alpha)
               for name, layer in lora.iter_target_layers(scope, include_conv_blocks=bool(scope.conv_target_classes))]
    return _network(planned, multiplier, scope.name_aliases(), _bool_arg(kwargs, "verbose"))


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: object,
) -> tuple[OFTNetwork, dict[str, torch.Tensor]]:
    """An OFT network shaped like an OFT file, its weights loaded: ``(network, weights_sd)``.

    Blocks per module come from ``oft_blocks`` (dim 0), the constraint from ``alpha`` (a module
    without one is unconstrained); any Linear/Conv2d of the U-Net can be named, so files made with
    other target options load too. A diffusers-named SDXL file is renamed to SGM names; the
    returned ``weights_sd`` carries the file-format names. Raises ``ValueError`` naming the file
    for a LoRA (or other) file, names that match no layer, or blocks that do not fit a layer.
    """
    if unet is None:
        raise ValueError("networks.oft adapts the U-Net; create_network_from_weights got none")
    _warn_unknown(kwargs)
    source, weights_sd = weights_of(file, weights_sd)
    scope = oft_unet_scope(unet)
    aliases = scope.name_aliases()
    file_sd = weights_sd
    weights_sd = rename_lora_keys(file_sd, aliases, source)
    foreign = [k for k in weights_sd if k.partition(".")[2] not in ("oft_blocks", "alpha")]
    if foreign:
        hint = (" Load a LoRA with --network_module networks.lora (or the module it was trained with)."
                if any(k.endswith(".lora_down.weight") for k in foreign) else "")
        raise ValueError(f"{source}: {len(foreign)} keys are not OFT (oft_blocks/alpha) keys, e.g. "
                         f"{format_key_list(foreign, 3)}. The file looks like {guess_lora_kind(file_sd)}.{hint}")
    blocks = {k.partition(".")[0]: v for k, v in weights_sd.items() if k.endswith(".oft_blocks")}
    alphas = {k.partition(".")[0]: v for k, v in weights_sd.items() if k.endswith(".alpha")}
    planned, layer_names = [], set()
    for path, layer in unet.named_modules():
        if not is_lora_target_layer(layer):
            continue
        name = scope.lora_name(path)
        if name is None:
            continue
        layer_names.add(name)
        if name not in blocks:
            continue
        shape = tuple(blocks[name].shape)
        out_dim = _out_features(layer)
        if len(shape) != 3 or shape[1] != shape[2] or shape[0] * shape[1] != out_dim:
            raise ValueError(f"{source}: {name}.oft_blocks has shape {list(shape)}, which does not fit the layer's "
                             f"{out_dim} output channels; load the file with the base model it was trained for")
        alpha_t = alphas.get(name)
        alpha = 0.0 if alpha_t is None or alpha_t.is_meta or not alpha_t.numel() else float(alpha_t.float().reshape(-1)[0])
        planned.append(PlannedModule(name, layer, shape[0], alpha))
    names_in_file = {k.partition(".")[0] for k in weights_sd}
    unmatched = sorted(names_in_file - layer_names)
    if unmatched:
        examples = [name for name, _ in itertools.islice(lora.iter_target_layers(scope, False), 1)]
        raise ValueError(f"{source}: {len(unmatched)} of {len(names_in_file)} OFT modules name no layer of the U-Net, "
                         f"e.g. {format_key_list(unmatched)}; this U-Net's names look like {', '.join(examples)}. "
                         "Load it with the base model it was trained for.")
    no_blocks = sorted(names_in_file - blocks.keys())
    if no_blocks:
        raise ValueError(f"{source}: modules without oft_blocks: {format_key_list(no_blocks)}; the file is incomplete")
    network = _network(planned, multiplier, aliases, _bool_arg(kwargs, "verbose"))
    network.load_state_dict_checked(weights_sd, source)
    if for_inference:
        network.eval()
        network.requires_grad_(False)
    return network, weights_sd
