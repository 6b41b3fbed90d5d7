"""Layers, formulas and config rules that the FLUX.1 DiT and the SD3 MMDiT share to the letter.

Only what is the same in both models lives here: the module paths (and so the checkpoint keys)
of what each model builds stay in its own ``model.py``. Where the two checkpoint layouts name the
same thing differently (the RMS-norm weight: FLUX's ``scale``, SD3's ``weight``), the shared module
takes the name as a parameter.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

TIMESTEP_EMBED_DIM = 256


class TransformerWidths:
    """``head_dim`` and ``mlp_hidden_dim`` of a config with ``hidden_size``, ``num_heads`` and
    ``mlp_ratio`` fields (a mixin of the frozen config dataclasses)."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return round(self.hidden_size * self.mlp_ratio)


def count_numbered_blocks(state_dict: Mapping[str, torch.Tensor], stack: str, model: str) -> int:
    """How many blocks ``<stack>.N.*`` the state dict has; ``ValueError`` (naming ``model``) unless
    they are numbered 0..N-1 (a pruned model must be renumbered consecutively)."""
    pattern = re.compile(rf"^{re.escape(stack)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if indices and indices != set(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise ValueError(f"{model} state dict: {stack} are not numbered 0..{max(indices)}: {missing} missing "
                         "(renumber the blocks of a pruned model consecutively)")
    return len(indices)


def precise_float_dtype(device: torch.device) -> torch.dtype:
    """float64 for exact position math, float32 on MPS (which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def timestep_embedding(t: torch.Tensor, dim: int = TIMESTEP_EMBED_DIM, max_period: float = 10000.0,
                       time_factor: float = 1.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` of ``t [B] * time_factor``, in float32.

    Channel ``k < dim/2`` is ``cos(t * f_k)``, channel ``dim/2 + k`` is ``sin(t * f_k)`` (cos half
    first), with ``f_k = max_period ** (-k / (dim/2))``. FLUX passes sigma with ``time_factor``
    1000; SD3 passes ``sigma * 1000`` already scaled (``time_factor`` 1, no multiplication).
    """
    t = t.float()
    if time_factor != 1.0:
        t = t * time_factor
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMS norm of ``x`` over its last dim times ``weight``: normalised in float32, then back in
    ``x``'s dtype; the weight is cast to that dtype too (it may be stored as fp8/bf16)."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return normed * weight.to(x.dtype)


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned weight (eps 1e-6), see :func:`rms_norm`. The weight's
    name is the checkpoint layout's: ``weight_name`` (a subclass sets it; SD3 ``weight``, FLUX ``scale``)."""

    weight_name = "weight"

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_parameter(self.weight_name, nn.Parameter(torch.ones(dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, getattr(self, self.weight_name), self.eps)


def layer_norm(dim: int) -> nn.LayerNorm:
    """The parameter-free LayerNorm (eps 1e-6) both models put before every modulation."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``."""
    return x * (1 + scale) + shift


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA over ``[B, H, L, D]`` -> ``[B, L, H*D]`` (heads merged). ``mask``: bool, True = attend."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class FinalLayer(nn.Module):
    """The output layer: ``linear(modulate(norm_final(x), shift, scale))`` with shift and scale
    from ``adaLN_modulation(c)`` (SiLU, Linear to ``2 * hidden``). Keys: ``linear.*``,
    ``adaLN_modulation.1.*`` (``norm_final`` has no parameters)."""

    def __init__(self, hidden: int, out_features: int) -> None:
        super().__init__()
        self.norm_final = layer_norm(hidden)
        self.linear = nn.Linear(hidden, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# -- rotary position embedding (adjacent channel pairs; FLUX.1, Chroma, Lumina) ------------------

def rope_frequencies(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """Rotary angles for position ids ``[B, L, n_axes]`` -> ``[B, 1, L, head_dim/2, 2]`` (cos, sin), float32.

    Axis ``i`` uses ``axes_dim[i]`` channels of each head: pairs rotated by ``id * theta^(-2k/d)``.
    """
    dtype = precise_float_dtype(ids.device)  # float64 keeps large positions exact
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=ids.device) / dim)
        angles.append(ids[..., axis].to(dtype)[..., None] * omega)
    angle = torch.cat(angles, dim=-1)
    return torch.stack([angle.cos(), angle.sin()], dim=-1).float().unsqueeze(1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x [B, H, L, D]`` by ``freqs`` (``rope_frequencies``)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = freqs[..., 0], freqs[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)
