"""Lumina-Image 2.0's NextDiT in the original single-file layout (Alpha-VLLM's ``consolidated`` keys).

Module paths are the checkpoint keys, so a ``lumina_2_model_bf16.safetensors`` loads as it is and
LoRA names come out as ``lora_unet_<path with _>``:

* ``x_embedder`` (2x2 patches of the 16 latent channels -> hidden), ``t_embedder.mlp.{0,2}``
  (sinusoidal 256 -> ``min(hidden, 1024)``), ``cap_embedder.{0,1}`` (RMS norm + Linear of the
  Gemma-2 hidden states);
* ``context_refiner.N`` (caption tokens only, no modulation), ``noise_refiner.N`` (image tokens
  only) and ``layers.N`` (the joint sequence), all ``JointTransformerBlock`` s:
  ``attention.qkv`` (fused, grouped-query: ``heads + 2 * kv_heads`` head rows), ``attention.out``,
  ``attention.q_norm`` / ``k_norm``, ``feed_forward.w1/w2/w3`` (SwiGLU), ``attention_norm1/2``,
  ``ffn_norm1/2`` and, with modulation, ``adaLN_modulation.1`` (scale/gate for attention and MLP);
* ``final_layer.linear`` / ``final_layer.adaLN_modulation.1`` (``FinalLayer``, scale only) and
  ``norm_final.weight``, a norm the original model defines but never uses (kept so files load and
  save unchanged).

Tensor conventions of :meth:`NextDiT.forward`: latents ``x [B, 16, H, W]``; ``t [B]`` in Lumina's own
time, **0 = pure noise, 1 = the image** (the flow families here use sigma = 1 - t); Gemma-2 states
``cap_feats [B, L, cap_feat_dim]`` with ``cap_mask [B, L]`` (True/1 = real token, right-padded).
The output ``[B, 16, H, W]`` points from noise to the image (``x0 - noise``, the negative of the
velocity the other flow models predict).

The caption stays at its padded length: padded tokens are masked as keys everywhere, and the
image's position ids start at each sample's real caption length (computed on the device, so the
forward never reads a value back to the host). For valid tokens this is exactly the original's
packed ``[caption, image]`` sequence. Memory options (gradient checkpointing with CPU offload,
block swap of the main ``layers``) are :class:`~library.families.dit_memory.DiTMemoryMixin`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from library.families import dit_layers
from library.families.dit_layers import TIMESTEP_EMBED_DIM
from library.families.dit_layers import apply_rope, rope_frequencies  # the same adjacent-pair RoPE as FLUX
from library.families.dit_memory import DiTMemoryMixin

CHECKPOINT_PREFIX = "model.diffusion_model."
#: the caption tokens' axis, then the image rows and columns, as the original's position ids
ROPE_THETA = 10000.0


def strip_lumina_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DiT's tensors of a state dict: keys under ``model.diffusion_model.`` (ComfyUI / Neta-Lumina
    all-in-one files) when there are such keys, else the state dict as it is. Tensors are not copied."""
    n = len(CHECKPOINT_PREFIX)
    prefixed = {k[n:]: v for k, v in state_dict.items() if k.startswith(CHECKPOINT_PREFIX)}
    return prefixed if prefixed else dict(state_dict)


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """RoPE split of a head over (caption index, row, column), which weights cannot show: three equal
    even parts, as in every released NextDiT (head 96 -> (32, 32, 32); 120 -> (40, 40, 40))."""
    third = head_dim // 3
    if head_dim % 3 or third % 2 or third <= 0:
        raise ValueError(f"NextDiT head dim {head_dim} has no default RoPE split (three equal even parts); pass "
                         "axes_dim=(...) to LuminaConfig.from_state_dict")
    return third, third, third


@dataclass(frozen=True)
class LuminaConfig:
    """Architecture of a NextDiT; defaults are Lumina-Image 2.0's (Alpha-VLLM ``NextDiT_2B_GQA_patch2_
    Adaln_Refiner``: hidden 2304, 26 layers, 2 + 2 refiner layers, 24 heads, 8 kv heads, Gemma-2-2B
    captions of width 2304, RoPE axes (32, 32, 32))."""

    patch_size: int = 2
    in_channels: int = 16
    hidden_size: int = 2304
    num_layers: int = 26
    num_noise_refiner_layers: int = 2
    num_context_refiner_layers: int = 2
    num_heads: int = 24
    num_kv_heads: int = 8
    ffn_hidden_size: int = 9216  # 4 x hidden rounded up to a multiple of 256
    cap_feat_dim: int = 2304
    time_embed_dim: int = 1024  # min(hidden, 1024)
    axes_dim: tuple[int, ...] = (32, 32, 32)
    theta: float = ROPE_THETA
    norm_eps: float = 1e-5
    has_norm_final: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"LuminaConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"LuminaConfig: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise ValueError(f"LuminaConfig: axes_dim {self.axes_dim} must be even numbers summing to the head dim "
                             f"{self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Output rows of q, k and v in the fused ``attention.qkv`` (grouped-query attention)."""
        return (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim)

    @property
    def patch_features(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], *, patch_size: int = 2,
                        axes_dim: tuple[int, ...] | None = None) -> "LuminaConfig":
        """The architecture from tensor shapes and key presence (meta tensors are fine; keys with or
        without ``model.diffusion_model.``).

        Depths count the numbered blocks (pruned models work when renumbered 0..N-1); the head dim is
        the qk-norm width, the kv heads follow from the fused qkv rows. The patch size (2) and the RoPE
        split (:func:`default_axes_dim`) cannot be seen in the weights. Raises ``ValueError`` naming
        the missing key for a state dict that is not a NextDiT.
        """
        sd = strip_lumina_prefix(state_dict)
        for key in ("x_embedder.weight", "cap_embedder.1.weight", "t_embedder.mlp.0.weight",
                    "final_layer.linear.weight"):
            if key not in sd:
                raise ValueError(f"not a Lumina-Image 2.0 NextDiT state dict: key {key!r} is missing")
        layers = dit_layers.count_numbered_blocks(sd, "layers", "NextDiT")
        stack = "layers" if layers else "noise_refiner"
        norm_key, qkv_key, w1_key = (f"{stack}.0.attention.q_norm.weight", f"{stack}.0.attention.qkv.weight",
                                     f"{stack}.0.feed_forward.w1.weight")
        for key in (norm_key, qkv_key, w1_key):
            if key not in sd:
                raise ValueError(f"not a Lumina-Image 2.0 NextDiT state dict: key {key!r} is missing (a NextDiT "
                                 "without qk-norm, e.g. Lumina-Next, is not supported)")
        hidden, patch_features = sd["x_embedder.weight"].shape
        if patch_features % (patch_size * patch_size):
            raise ValueError(f"NextDiT state dict: x_embedder takes {patch_features} features, not a multiple of "
                             f"{patch_size}x{patch_size} patches")
        head_dim = sd[norm_key].shape[0]
        if hidden % head_dim:
            raise ValueError(f"NextDiT state dict: hidden size {hidden} is not a multiple of the head dim {head_dim}")
        heads = hidden // head_dim
        qkv_rows = sd[qkv_key].shape[0]
        kv_heads, rest = divmod(qkv_rows // head_dim - heads, 2)
        if rest or qkv_rows % head_dim or kv_heads <= 0:
            raise ValueError(f"NextDiT state dict: {qkv_key} has {qkv_rows} rows, not {heads} query heads plus "
                             f"two equal key/value groups of head dim {head_dim}")
        return cls(
            patch_size=patch_size,
            in_channels=patch_features // (patch_size * patch_size),
            hidden_size=hidden,
            num_layers=layers,
            num_noise_refiner_layers=dit_layers.count_numbered_blocks(sd, "noise_refiner", "NextDiT"),
            num_context_refiner_layers=dit_layers.count_numbered_blocks(sd, "context_refiner", "NextDiT"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            ffn_hidden_size=sd[w1_key].shape[0],
            cap_feat_dim=sd["cap_embedder.1.weight"].shape[1],
            time_embed_dim=sd["t_embedder.mlp.0.weight"].shape[0],
            axes_dim=tuple(axes_dim) if axes_dim is not None else default_axes_dim(head_dim),
            has_norm_final="norm_final.weight" in sd,
        )


LUMINA_IMAGE_2_CONFIG = LuminaConfig()


# -- layers -------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding (256 channels, cos half first) of t in [0, 1] -> MLP (``mlp.0``, ``mlp.2``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_EMBED_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(dit_layers.timestep_embedding(t).to(dtype))


class JointAttention(nn.Module):
    """Grouped-query self-attention: fused ``qkv``, per-head RMS ``q_norm``/``k_norm``, RoPE, ``out``."""

    def __init__(self, config: LuminaConfig) -> None:
        super().__init__()
        self.sizes = config.qkv_sizes
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, sum(self.sizes), bias=False)
        self.out = nn.Linear(self.sizes[0], config.hidden_size, bias=False)
        self.q_norm = dit_layers.RMSNorm(self.head_dim, eps=config.norm_eps)
        self.k_norm = dit_layers.RMSNorm(self.head_dim, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, freqs: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = torch.split(self.qkv(x), self.sizes, dim=-1)
        q = self.q_norm(q.view(batch, length, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(batch, length, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, freqs).to(v.dtype), apply_rope(k, freqs).to(v.dtype)
        # Query head h reads key/value head h // (heads / kv_heads), as the original's repeat does.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)`` (the SiLU in float32)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.w1(x)
        return self.w2(F.silu(gate.float()).to(gate.dtype) * self.w3(x))


class JointTransformerBlock(nn.Module):
    """Pre/post RMS-normed attention and SwiGLU; with ``modulation`` the timestep embedding scales the
    normed inputs and gates (tanh) both residual branches (``adaLN_modulation.1``: scale_msa,
    gate_msa, scale_mlp, gate_mlp)."""

    def __init__(self, config: LuminaConfig, modulation: bool) -> None:
        super().__init__()
        dim, eps = config.hidden_size, config.norm_eps
        self.modulation = modulation
        self.attention = JointAttention(config)
        self.feed_forward = FeedForward(dim, config.ffn_hidden_size)
        self.attention_norm1 = dit_layers.RMSNorm(dim, eps=eps)
        self.ffn_norm1 = dit_layers.RMSNorm(dim, eps=eps)
        self.attention_norm2 = dit_layers.RMSNorm(dim, eps=eps)
        self.ffn_norm2 = dit_layers.RMSNorm(dim, eps=eps)
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.time_embed_dim, 4 * dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, freqs: torch.Tensor,
                temb: torch.Tensor | None = None) -> torch.Tensor:
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), mask, freqs))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(temb)[:, None, :].chunk(4, dim=-1)
        attn = self.attention(self.attention_norm1(x) * (1 + scale_msa), mask, freqs)
        x = x + gate_msa.tanh() * self.attention_norm2(attn)
        mlp = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(mlp)


class FinalLayer(nn.Module):
    """``linear(norm_final(x) * (1 + scale))`` with ``scale = adaLN_modulation(temb)`` (no shift)."""

    def __init__(self, config: LuminaConfig) -> None:
        super().__init__()
        self.norm_final = dit_layers.layer_norm(config.hidden_size)
        self.linear = nn.Linear(config.hidden_size, config.patch_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.time_embed_dim, config.hidden_size))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale = self.adaLN_modulation(temb)[:, None, :]
        return self.linear(self.norm_final(x) * (1 + scale))


# -- patches and positions ----------------------------------------------------------------------------


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), p*p*C]``: row-major patches, features (row, column, channel)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1).reshape(
        b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(x: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a latent ``height`` x ``width``."""
    b = x.shape[0]
    h, w = height // patch, width // patch
    return x.view(b, h, w, patch, patch, -1).permute(0, 5, 1, 3, 2, 4).reshape(b, -1, height, width)


def position_ids(cap_mask: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(caption ids [B, L, 3], image ids [B, h*w, 3])`` for patch rows ``height`` and columns ``width``.

    Caption token i has (i, 0, 0); image patch (r, c) has (n, r, c) with n the sample's real
    caption length (``cap_mask.sum(1)``, a device tensor), as in the original's packed sequence.
    """
    batch, length = cap_mask.shape
    device = cap_mask.device
    cap = torch.zeros(batch, length, 3, device=device)
    cap[..., 0] = torch.arange(length, device=device, dtype=torch.float32)
    rows = torch.arange(height, device=device, dtype=torch.float32).repeat_interleave(width)
    cols = torch.arange(width, device=device, dtype=torch.float32).repeat(height)
    img = torch.stack(torch.broadcast_tensors(cap_mask.sum(dim=1, dtype=torch.float32)[:, None], rows[None],
                                              cols[None]), dim=-1)
    return cap, img


# -- the model ----------------------------------------------------------------------------------------


class NextDiT(DiTMemoryMixin, nn.Module):
    """The Lumina-Image 2.0 transformer; ``state_dict()`` keys are the original checkpoint keys.

    ``--blocks_to_swap N`` keeps the last N of the main ``layers`` in CPU memory (the refiners are
    small and always stay on the device); the refiner blocks are numbered after the main layers for
    :meth:`_run_block` and never swapped.
    """

    swap_label = "Lumina"

    def __init__(self, config: LuminaConfig) -> None:
        super().__init__()
        self.config = config
        self.x_embedder = nn.Linear(config.patch_features, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.time_embed_dim)
        self.cap_embedder = nn.Sequential(dit_layers.RMSNorm(config.cap_feat_dim, eps=config.norm_eps),
                                          nn.Linear(config.cap_feat_dim, config.hidden_size))
        self.context_refiner = nn.ModuleList(JointTransformerBlock(config, modulation=False)
                                             for _ in range(config.num_context_refiner_layers))
        self.noise_refiner = nn.ModuleList(JointTransformerBlock(config, modulation=True)
                                           for _ in range(config.num_noise_refiner_layers))
        self.layers = nn.ModuleList(JointTransformerBlock(config, modulation=True) for _ in range(config.num_layers))
        if config.has_norm_final:
            self.norm_final = dit_layers.RMSNorm(config.hidden_size, eps=config.norm_eps)  # unused, as in the original
        self.final_layer = FinalLayer(config)
        self._init_memory_options()

    # -- memory options (DiTMemoryMixin) -----------------------------------------------------------

    def _block_stacks(self) -> list[tuple[str, nn.ModuleList]]:
        return [("main", self.layers)]

    def _swap_plan(self, num_blocks: int) -> tuple[int]:
        return (num_blocks,)

    def _reference_weight(self) -> torch.Tensor:
        return self.x_embedder.weight

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, cap_feats: torch.Tensor,
                cap_mask: torch.Tensor) -> torch.Tensor:
        """``x0 - noise`` estimate ``[B, C, H, W]`` for latents ``x`` at Lumina time ``t`` (0 = noise).

        ``cap_feats [B, L, cap_feat_dim]`` Gemma-2 hidden states, ``cap_mask [B, L]`` (True/1 = real
        token). The compute dtype is ``x``'s (or autocast's).
        """
        self._check_inputs(x, t, cap_feats, cap_mask)
        self._begin_forward()
        cfg = self.config
        batch, _, height, width = x.shape
        rows, cols = height // cfg.patch_size, width // cfg.patch_size
        dtype = x.dtype
        mask = cap_mask.bool()
        n_cap = mask.shape[1]

        temb = self.t_embedder(t, dtype)
        cap = self.cap_embedder(cap_feats.to(dtype))
        cap_ids, img_ids = position_ids(mask, rows, cols)
        cap_freqs = rope_frequencies(cap_ids, cfg.axes_dim, cfg.theta)
        img_freqs = rope_frequencies(img_ids, cfg.axes_dim, cfg.theta)

        refiner_index = len(self.layers)  # past the swappable stack: never swapped
        cap_keys = mask[:, None, None, :]
        for block in self.context_refiner:
            cap = self._run_block(refiner_index, block, cap, cap_keys, cap_freqs)
            refiner_index += 1
        # Padded caption tokens are only ever masked keys; zeroing them keeps a caption with no real
        # token (all keys masked: NaN rows) from reaching the image through 0 * NaN.
        cap = cap.masked_fill(~mask[..., None], 0.0)
        img = self.x_embedder(patchify(x, cfg.patch_size))
        for block in self.noise_refiner:
            img = self._run_block(refiner_index, block, img, None, img_freqs, temb)
            refiner_index += 1

        joint = torch.cat((cap, img), dim=1)
        freqs = torch.cat((cap_freqs, img_freqs), dim=2)
        keys = torch.cat((mask, torch.ones(batch, rows * cols, dtype=torch.bool, device=mask.device)), dim=1)
        keys = keys[:, None, None, :]
        for i, block in enumerate(self.layers):
            joint = self._run_block(i, block, joint, keys, freqs, temb)
        out = self.final_layer(joint[:, n_cap:], temb)
        return unpatchify(out, height, width, cfg.patch_size)

    def _check_inputs(self, x, t, cap_feats, cap_mask) -> None:
        """Shape checks (no tensor values are read, so no host sync)."""
        cfg = self.config
        problems = []
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % cfg.patch_size or x.shape[3] % cfg.patch_size:
            problems.append(f"x must be [B, {cfg.in_channels}, H, W] latents with H and W multiples of "
                            f"{cfg.patch_size}, got {tuple(x.shape)}")
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            problems.append(f"t must be [B] = [{x.shape[0]}], got {tuple(t.shape)}")
        if cap_feats.ndim != 3 or cap_feats.shape[-1] != cfg.cap_feat_dim or cap_feats.shape[0] != x.shape[0]:
            problems.append(f"cap_feats must be [B, L, {cfg.cap_feat_dim}], got {tuple(cap_feats.shape)}")
        if cap_mask.shape != cap_feats.shape[:2]:
            problems.append(f"cap_mask must be [B, L] = {tuple(cap_feats.shape[:2])}, got {tuple(cap_mask.shape)}")
        if problems:
            raise ValueError("NextDiT.forward: " + "; ".join(problems))
