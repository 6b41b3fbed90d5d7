"""The LoRA module: a low-rank update that rides on an existing ``nn.Linear`` or ``nn.Conv2d``.

A :class:`LoRAModule` does not replace the layer it adapts. :meth:`LoRAModule.apply_to` swaps
the layer's ``forward`` for the module's own, which calls the original forward and adds the
low-rank term; the original layer stays where it is in the base model, so the base model's
state dict (and any checkpoint written from it) is unchanged. :meth:`LoRAModule.restore`
undoes the swap.

Only the module math and its weight-space equivalent live here; which layers get a module and
what they are called is decided by the network (``networks/lora.py``), so other model families
(SDXL, FLUX, SD3) reuse this class with their own naming. The hooking itself is
:class:`LayerAdapter`, which other adapter kinds share (OFT in ``networks/oft.py``, the DyLoRA and
LoRA-FA modules are :class:`LoRAModule` subclasses).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerAdapter", "LoRAModule", "lora_delta_weight", "is_lora_target_layer"]


def is_lora_target_layer(module: nn.Module) -> bool:
    """True for the layer types a LoRA module can adapt (``nn.Linear``, ungrouped ``nn.Conv2d``)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def lora_delta_weight(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The weight-space update ``scale * up @ down`` in the layout of the adapted layer's weight.

    Linear: ``down`` [r, in], ``up`` [out, r] -> [out, in]. Conv2d: ``down`` [r, in, kh, kw]
    (the original kernel), ``up`` [out, r, 1, 1] -> [out, in, kh, kw]. The conv case is exact
    because a 1x1 conv after a kxk conv is the kxk conv whose kernel is the channel mix of the
    two (stride, padding and dilation belong to the first conv and carry over unchanged).
    """
    delta = up.flatten(1) @ down.flatten(1)
    return (delta * scale).reshape(up.shape[0], *down.shape[1:])


class LayerAdapter(nn.Module):
    """What every adapter module shares: a file-format name, a multiplier, and the forward hook.

    :meth:`apply_to` routes the adapted layer's calls through the adapter's :meth:`forward`
    (which calls :attr:`org_forward`); :meth:`restore` undoes it. The layer is held outside the
    module tree, so its weights are never part of the adapter's parameters or state dict.
    Subclasses implement ``forward`` and :meth:`merge_to_layer`.
    """

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.multiplier = float(multiplier)
        # The adapted layer is kept in a list so it is NOT registered as a submodule: its weights
        # must not appear in the network's state dict or parameters.
        self._org_module: list[nn.Module] = [org_module]
        self.org_forward: Callable[..., torch.Tensor] | None = None
        self._had_instance_forward = False
        self._previous_instance_forward: Callable[..., torch.Tensor] | None = None

    @property
    def org_module(self) -> nn.Module:
        """The layer this module adapts (not a registered submodule)."""
        return self._org_module[0]

    @property
    def is_applied(self) -> bool:
        return self.org_forward is not None

    def apply_to(self) -> None:
        """Route the adapted layer's calls through :meth:`forward`. Calling it twice is an error."""
        if self.is_applied:
            raise RuntimeError(f"{type(self).__name__} {self.lora_name} is already applied to its layer")
        org = self.org_module
        # Remember whether the layer already had an instance-level forward (another network
        # applied before this one), so restore() puts back exactly what was there.
        self._had_instance_forward = "forward" in org.__dict__
        self._previous_instance_forward = org.__dict__.get("forward")
        self.org_forward = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        """Give the adapted layer its original forward back (no-op when not applied)."""
        if not self.is_applied:
            return
        org = self.org_module
        if self._had_instance_forward:
            org.forward = self._previous_instance_forward
        else:
            del org.forward
        self.org_forward = None
        self._previous_instance_forward = None

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)

    def merge_to_layer(self, device: torch.device | str | None = None) -> None:
        """Fold the adapter (at its multiplier) into the layer's weights; the module must not be applied."""
        raise NotImplementedError


class LoRAModule(LayerAdapter):
    """Low-rank adapter for one layer.

    ``y = org(x) + up(dropout(down(x))) * multiplier * alpha / rank``

    * ``down``: Linear ``in -> rank`` (no bias), or for a Conv2d a conv ``in -> rank`` with the
      original kernel size, stride, padding and dilation ("LierLa" for Linear and 1x1 convs,
      "C3Lier" for 3x3 convs). Initialised kaiming-uniform(a=sqrt(5)), like ``nn.Linear``.
    * ``up``: Linear ``rank -> out`` or 1x1 conv, initialised to zero, so a fresh module leaves
      the layer's output unchanged.
    * ``alpha``: a 0-dim buffer saved as ``<name>.alpha``; ``None`` or 0 means ``alpha = rank``
      (scale 1). Changing it through ``load_state_dict`` updates the scale.
    * ``dropout`` (neuron dropout on the ``down`` output), ``rank_dropout`` (zero whole rank
      channels per sample and rescale by ``1/(1-p)``) and ``module_dropout`` (skip the LoRA
      term for this call with probability ``p``) act only in training mode.

    ``scale`` and ``multiplier`` are plain Python floats so the forward adds no tensor ops or
    host syncs beyond the LoRA math itself.
    """

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        if not is_lora_target_layer(org_module):
            raise TypeError(
                f"LoRA module {lora_name}: cannot adapt a {type(org_module).__name__}; "
                "only nn.Linear and ungrouped nn.Conv2d layers are supported"
            )
        if int(lora_dim) <= 0:
            raise ValueError(f"LoRA module {lora_name}: rank must be a positive integer, got {lora_dim}")
        super().__init__(lora_name, org_module, multiplier)
        self.lora_dim = int(lora_dim)
        self.dropout = float(dropout or 0.0)
        self.rank_dropout = float(rank_dropout or 0.0)
        self.module_dropout = float(module_dropout or 0.0)

        # Build the adapter on the base layer's device when that is "meta" (shape-only models),
        # otherwise on the current default device: the trainer moves the network afterwards,
        # and the adapter weights stay in the default (fp32) dtype whatever the base dtype is.
        weight = org_module.weight
        device = weight.device if weight.is_meta else None
        self.is_conv = isinstance(org_module, nn.Conv2d)
        if self.is_conv:
            self.lora_down = nn.Conv2d(
                org_module.in_channels, self.lora_dim, org_module.kernel_size, org_module.stride,
                org_module.padding, org_module.dilation, bias=False, device=device,
            )
            self.lora_up = nn.Conv2d(self.lora_dim, org_module.out_channels, 1, 1, bias=False, device=device)
        else:
            self.lora_down = nn.Linear(org_module.in_features, self.lora_dim, bias=False, device=device)
            self.lora_up = nn.Linear(self.lora_dim, org_module.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

        if alpha is None or float(alpha) == 0.0:
            alpha = self.lora_dim
        self.register_buffer("alpha", torch.tensor(float(alpha), device=device))
        self.scale = float(alpha) / self.lora_dim

    # --- math --------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 - torch hook
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The scale is cached as a float for a sync-free forward; a loaded alpha must refresh it.
        if not self.alpha.is_meta:
            alpha = float(self.alpha)
            self.scale = (alpha if alpha != 0.0 else self.lora_dim) / self.lora_dim

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        org_out = self.org_forward(x, *args, **kwargs)
        if self.training:
            # torch.rand on the CPU generator: no device sync, and activation checkpointing
            # replays the CPU RNG state, so the recomputed forward makes the same choice.
            if self.module_dropout and torch.rand((), device="cpu") < self.module_dropout:
                return org_out
            return org_out + self._train_delta(x)
        return org_out + self.lora_up(self.lora_down(x)) * (self.multiplier * self.scale)

    def _train_delta(self, x: torch.Tensor) -> torch.Tensor:
        lx = self.lora_down(x)
        if self.dropout:
            lx = F.dropout(lx, p=self.dropout, training=True)
        scale = self.scale
        if self.rank_dropout:
            # One keep/drop decision per (sample, rank channel), broadcast over tokens or pixels.
            if self.is_conv:
                mask_shape = (lx.shape[0], self.lora_dim) + (1,) * (lx.dim() - 2)
            else:
                mask_shape = (lx.shape[0],) + (1,) * (lx.dim() - 2) + (self.lora_dim,)
            keep = torch.rand(mask_shape, device=lx.device) >= self.rank_dropout
            lx = lx * keep.to(lx.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(lx) * (self.multiplier * scale)

    # --- weight space ------------------------------------------------------------------------

    def delta_weight(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """``up @ down * alpha/rank`` (without the multiplier) in the adapted layer's weight layout."""
        up = self.lora_up.weight.to(device=device, dtype=dtype)
        down = self.lora_down.weight.to(device=device, dtype=dtype)
        return lora_delta_weight(up, down, self.scale)

    @torch.no_grad()
    def merge_to_layer(self, device: torch.device | str | None = None) -> None:
        """``W += multiplier * up @ down * alpha/rank``, computed in float32 on ``device`` (default:
        the layer's), the sum cast back to the layer's dtype."""
        if self.is_applied:
            raise RuntimeError(f"{self.lora_name} is applied to its layer; call network.restore() before merge_to")
        weight = self.org_module.weight
        delta = self.delta_weight(torch.float32, device or weight.device) * self.multiplier
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))

    @torch.no_grad()
    def scale_delta_(self, factor: torch.Tensor) -> None:
        """Multiply the update ``up @ down`` by ``factor`` (a 0-dim tensor): every trained factor by its
        square root, so both stay equally large (max-norm regularisation)."""
        root = factor.sqrt()
        for param in self.parameters():
            param.mul_(root.to(param.device, param.dtype))

    def extra_repr(self) -> str:
        return f"name={self.lora_name}, rank={self.lora_dim}, scale={self.scale:g}, multiplier={self.multiplier:g}"
