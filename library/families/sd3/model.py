"""The SD3 / SD3.5 denoiser (MMDiT; MMDiT-X for SD3.5 Medium) in the original SAI checkpoint layout.

Module paths are the checkpoint keys (``joint_blocks.0.x_block.attn.qkv.weight``, ``pos_embed``,
...), so the MMDiT part of ``sd3_medium.safetensors`` / ``sd3.5_large.safetensors`` loads with
``load_state_dict`` as is (after ``strip_sd3_prefix``), and LoRA module names come out as
``lora_unet_<path with _>`` with the fused ``qkv`` of the reference LoRA format. The LoRA network
finds the blocks by class name: ``JointBlock``.

Tensor conventions of ``SD3MMDiT.forward``: latents ``[B, 16, H, W]`` in model space (already
scaled and shifted), even H and W; ``timesteps [B]`` are ``sigma * 1000`` and embedded as given;
``context [B, T, 4096]`` (CLIP-L/G penultimate states padded to 4096 + T5 states) and
``y [B, 2048]`` (CLIP-L + CLIP-G pooled). The output is the velocity ``[B, 16, H, W]``. The compute
dtype is the dtype of ``x`` (or autocast's).

Position embedding (``position_embedding``): the checkpoint stores a fixed 2-D sin-cos table
``pos_embed [1, M*M, hidden]`` for an M x M patch grid; by default the model adds its centre crop
for the image's patch grid (top = (M - h) // 2, left = (M - w) // 2, as SAI and diffusers do).
Two training options change that (``set_pos_emb_random_crop_rate`` and ``enable_scaled_pos_embed``;
the definitions are ours and documented on those methods).

Memory options for training: ``enable_gradient_checkpointing(cpu_offload=...)`` and
``enable_block_swap(n, device)`` (shared with FLUX: ``library/families/dit_memory.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from library.families import dit_layers
from library.families.dit_layers import TIMESTEP_EMBED_DIM, FinalLayer, RMSNorm, attention, timestep_embedding
from library.families.dit_layers import layer_norm as _layer_norm
from library.families.dit_layers import modulate as _modulate
from library.families.dit_memory import MIN_RESIDENT_BLOCKS  # noqa: F401 (re-exported: part of this module's API)
from library.families.dit_memory import DiTMemoryMixin, largest_block_swap

CHECKPOINT_PREFIX = "model.diffusion_model."
DEFAULT_HEAD_DIM = 64  # every SD3/3.5 model; the weights show it only through the qk-norm scale
SIN_COS_THETA = 10000.0


def strip_sd3_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MMDiT part of a state dict, keys without ``model.diffusion_model.``.

    A full SAI checkpoint (``sd3_medium_incl_clips.safetensors``) holds the MMDiT under that prefix
    beside ``text_encoders.*`` and ``first_stage_model.*``: when any key has the prefix, only the
    prefixed keys are returned (prefix removed). A bare MMDiT file is returned as is. Tensors are
    not copied.
    """
    n = len(CHECKPOINT_PREFIX)
    if any(k.startswith(CHECKPOINT_PREFIX) for k in state_dict):
        return {k[n:]: v for k, v in state_dict.items() if k.startswith(CHECKPOINT_PREFIX)}
    return dict(state_dict)


@dataclass(frozen=True)
class SD3Config(dit_layers.TransformerWidths):
    """Architecture of an SD3 / SD3.5 MMDiT; defaults are SD3 Medium.

    ``qk_norm``: ``"rms"`` (per-head RMS norm of q and k, SD3.5) or None. ``x_block_self_attn_layers``:
    joint blocks whose image stream has the extra self-attention ``attn2`` (MMDiT-X, SD3.5 Medium:
    0..12). ``final_context_pre_only``: the last block's context stream stops after its q/k/v
    (no ``attn.proj``, no MLP; true for every released model).
    """

    hidden_size: int = 1536
    depth: int = 24
    num_heads: int = 24
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    context_in_dim: int = 4096
    adm_in_channels: int = 2048
    mlp_ratio: float = 4.0
    pos_embed_max_size: int = 192
    qk_norm: str | None = None
    x_block_self_attn_layers: tuple[int, ...] = ()
    final_context_pre_only: bool = True

    def __post_init__(self) -> None:
        layers = tuple(sorted(int(i) for i in self.x_block_self_attn_layers))
        object.__setattr__(self, "x_block_self_attn_layers", layers)
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            problems.append(f"hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos position table)")
        if self.qk_norm not in (None, "rms"):
            problems.append(f"qk_norm must be None or 'rms', got {self.qk_norm!r}")
        bad = [i for i in self.x_block_self_attn_layers if not 0 <= i < self.depth]
        if bad:
            problems.append(f"x_block_self_attn_layers {bad} are outside 0..{self.depth - 1}")
        if problems:
            raise ValueError("SD3Config: " + "; ".join(problems))

    def context_pre_only(self, index: int) -> bool:
        """Whether joint block ``index``'s context stream is pre-only."""
        return self.final_context_pre_only and index == self.depth - 1

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "SD3Config":
        """Read the architecture from tensor shapes and key presence (keys with or without the
        ``model.diffusion_model.`` prefix; meta tensors are fine).

        Hidden size, patch and input channels from ``x_embedder.proj.weight``; depth = the number of
        ``joint_blocks.N`` (numbered 0..N-1); head dim from ``attn.ln_q.weight`` when the model has
        qk-norm, else 64 (``num_heads = hidden / head_dim``); the table size M from
        ``pos_embed [1, M*M, hidden]``; MMDiT-X layers from ``x_block.attn2`` keys; the pre-only
        context block from a missing ``context_block.attn.proj``. Raises ``ValueError`` naming the
        key for a state dict that is not an SD3 MMDiT or is inconsistent.
        """
        sd = strip_sd3_prefix(state_dict)
        if "x_embedder.proj.weight" not in sd:
            hint = ""
            if "img_in.weight" in sd:
                hint = " (this looks like a FLUX.1 DiT)"
            elif "pos_embed.proj.weight" in sd or any(k.startswith("transformer_blocks.") for k in sd):
                hint = " (this looks like a Diffusers SD3Transformer2DModel; convert it to the SAI layout)"
            raise ValueError(f"not an SD3 MMDiT state dict: key 'x_embedder.proj.weight' is missing{hint}")
        depth = dit_layers.count_numbered_blocks(sd, "joint_blocks", "SD3")
        if depth == 0:
            raise ValueError("not an SD3 MMDiT state dict: no 'joint_blocks.N.*' keys")
        required = ["pos_embed", "t_embedder.mlp.0.weight", "y_embedder.mlp.0.weight", "context_embedder.weight",
                    "final_layer.linear.weight", "joint_blocks.0.x_block.mlp.fc1.weight"]
        for key in required:
            if key not in sd:
                extra = (" (a checkpoint saved without the position table: copy 'pos_embed' from the base model)"
                         if key == "pos_embed" else "")
                raise ValueError(f"not an SD3 MMDiT state dict: key {key!r} is missing{extra}")

        hidden, in_channels, patch, patch_w = sd["x_embedder.proj.weight"].shape
        if patch != patch_w:
            raise ValueError(f"SD3 state dict: x_embedder.proj.weight has a non-square patch {patch}x{patch_w}")
        pos_shape = tuple(sd["pos_embed"].shape)
        max_size = math.isqrt(pos_shape[1]) if len(pos_shape) == 3 else 0
        if len(pos_shape) != 3 or max_size * max_size != pos_shape[1] or pos_shape[2] != hidden:
            raise ValueError(f"SD3 state dict: pos_embed must be [1, M*M, {hidden}] for a square M x M table, "
                             f"got {list(pos_shape)}")

        qk_keys = [f"joint_blocks.{i}.{s}.attn.ln_q.weight" for i in range(depth) for s in ("x_block", "context_block")]
        with_qk = [k for k in qk_keys if k in sd]
        if with_qk and len(with_qk) != len(qk_keys):
            missing = sorted(set(qk_keys) - set(with_qk))[:3]
            raise ValueError(f"SD3 state dict: qk-norm weights only in some blocks (missing e.g. {missing})")
        head_dim = sd[qk_keys[0]].shape[0] if with_qk else DEFAULT_HEAD_DIM
        if hidden % head_dim:
            raise ValueError(f"SD3 state dict: hidden size {hidden} (x_embedder.proj.weight) is not a multiple of "
                             f"the head dim {head_dim}")

        self_attn = tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd)
        pre_only = [i for i in range(depth) if f"joint_blocks.{i}.context_block.attn.proj.weight" not in sd]
        if pre_only and pre_only != [depth - 1]:
            raise ValueError(f"SD3 state dict: context blocks {pre_only} have no attn.proj; only the last block "
                             f"({depth - 1}) may be pre-only")
        for i in range(depth):
            _check_modulation(sd, f"joint_blocks.{i}.x_block", hidden, 9 if i in self_attn else 6)
            _check_modulation(sd, f"joint_blocks.{i}.context_block", hidden, 2 if i in pre_only else 6)

        out_rows = sd["final_layer.linear.weight"].shape[0]
        if out_rows % (patch * patch):
            raise ValueError(f"SD3 state dict: final_layer.linear.weight has {out_rows} rows, not a multiple of "
                             f"patch^2 = {patch * patch}")
        return cls(
            hidden_size=hidden,
            depth=depth,
            num_heads=hidden // head_dim,
            patch_size=patch,
            in_channels=in_channels,
            out_channels=out_rows // (patch * patch),
            context_in_dim=sd["context_embedder.weight"].shape[1],
            adm_in_channels=sd["y_embedder.mlp.0.weight"].shape[1],
            mlp_ratio=sd["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] / hidden,
            pos_embed_max_size=max_size,
            qk_norm="rms" if with_qk else None,
            x_block_self_attn_layers=self_attn,
            final_context_pre_only=bool(pre_only),
        )


def _check_modulation(sd: Mapping[str, torch.Tensor], prefix: str, hidden: int, chunks: int) -> None:
    key = f"{prefix}.adaLN_modulation.1.weight"
    if key not in sd:
        raise ValueError(f"SD3 state dict: key {key!r} is missing")
    rows = sd[key].shape[0]
    if rows != chunks * hidden:
        raise ValueError(f"SD3 state dict: {key} has {rows} rows, expected {chunks} x {hidden} for this block "
                         "(9 x hidden with x_block.attn2, 2 x hidden for a pre-only context block, else 6 x hidden)")


# -- sinusoidal embeddings ------------------------------------------------------------------------------
# The timestep embedding is dit_layers.timestep_embedding with t as given (SD3 passes sigma * 1000).


def sincos_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """2-D sin-cos embedding ``[h*w, dim]`` (row-major cells) of row coordinates ``rows [h]`` and
    column coordinates ``cols [w]``, in the dtype of the coordinates.

    The layout of the SD3 table: channels ``[0, dim/2)`` encode the column coordinate, ``[dim/2, dim)``
    the row coordinate; in each half, ``sin(c * w_k)`` for k < dim/4 then ``cos(c * w_k)``, with
    ``w_k = 10000 ** (-k / (dim / 4))``.
    """
    quarter = dim // 4
    omega = SIN_COS_THETA ** (-torch.arange(quarter, dtype=rows.dtype, device=rows.device) / quarter)

    def half(coords: torch.Tensor) -> torch.Tensor:
        angles = coords[:, None] * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    h, w = rows.shape[0], cols.shape[0]
    col_part = half(cols)[None, :, :].expand(h, w, 2 * quarter)
    row_part = half(rows)[:, None, :].expand(h, w, 2 * quarter)
    return torch.cat([col_part, row_part], dim=-1).reshape(h * w, dim)


def sincos_pos_embed_table(dim: int, max_size: int, base_size: int, *,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """The stored position table ``[1, M*M, dim]`` (float32) of an M x M grid whose cell k (row or
    column) has coordinate ``k * base_size / max_size`` - the convention of diffusers'
    ``get_2d_sincos_pos_embed(dim, M, base_size=B)`` (B = the training resolution in patches, 64 for
    1024 px). Tiny demo models use it; real checkpoints bring their own table."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    coords = torch.arange(max_size, dtype=dit_layers.precise_float_dtype(device), device=device) * (base_size / max_size)
    return sincos_2d(coords, coords, dim).float()[None]


@dataclass(frozen=True)
class PosEmbedGrid:
    """How a stored table maps cells to coordinates: cell u (row or column index) has coordinate
    ``offset + step * u``; ``base_size`` is the patch grid of the training resolution."""

    max_size: int
    offset: float
    step: float
    base_size: int


def read_pos_embed_grid(table: torch.Tensor, *, base_size: int | None = None) -> PosEmbedGrid:
    """Fit ``offset`` and ``step`` of a stored ``pos_embed [1, M*M, dim]`` and check that the table
    (every (M // 16)-th row of cells, all columns and channels) is ``sincos_2d`` of those coordinates,
    to twice the storage dtype's eps. One host read, for setup, not per step.

    The fit: channel 0 and channel dim/4 of the first row of cells are ``sin``/``cos`` of the column
    coordinate at frequency 1, so their angle, unwrapped, is a straight line over the columns.
    A fit within 1e-3 of offset 0 and step B / M (B whole: the generator's convention, see
    ``sincos_pos_embed_table``) is snapped to those exact values. ``base_size`` None reads it as
    ``step * M``. Raises ``ValueError`` when the table is not such a sin-cos table
    (e.g. not loaded yet, or on the meta device).
    """
    if table.device.type == "meta":
        raise ValueError("pos_embed is on the meta device: load the checkpoint weights before enabling the scaled "
                         "position embedding")
    dim = table.shape[-1]
    max_size = math.isqrt(table.shape[1])
    sample_rows = list(range(0, max_size, max(1, max_size // 16)))
    # Only the sampled rows of cells travel (in float64, the whole 3.5 Medium table would be 1.8 GB).
    cells = table.detach().reshape(max_size, max_size, dim)[sample_rows].to("cpu", torch.float64)
    first_row = cells[0]
    angle = torch.atan2(first_row[:, 0], first_row[:, dim // 4])
    steps = torch.remainder(torch.diff(angle) + math.pi, 2 * math.pi) - math.pi  # unwrap: |step| < pi
    unwrapped = torch.cat([angle[:1], angle[0] + torch.cumsum(steps, 0)])
    u = torch.arange(max_size, dtype=torch.float64)
    step = float(((u - u.mean()) * (unwrapped - unwrapped.mean())).sum() / ((u - u.mean()) ** 2).sum())
    offset = float(unwrapped.mean() - step * u.mean())
    if abs(offset) < 1e-3 and abs(step * max_size - round(step * max_size)) < 1e-3:
        # The generator's convention (offset 0, step B / M): take its exact values, not the fit's
        # rounding noise (bf16 tables), so a base-size grid reproduces the table's crop exactly.
        offset, step = 0.0, round(step * max_size) / max_size

    coords = offset + step * u
    expected = sincos_2d(coords[sample_rows], coords, dim).reshape(len(sample_rows), max_size, dim)
    deviation = float((expected - cells).abs().max())
    tolerance = max(1e-4, 2 * torch.finfo(table.dtype).eps) if table.dtype.is_floating_point else 1e-4
    if not deviation <= tolerance:
        raise ValueError(f"pos_embed is not a 2-D sin-cos table (max deviation {deviation:.3g} from the best fit "
                         f"offset {offset:.4g}, step {step:.4g}); the scaled position embedding needs the model's "
                         "original table (load the weights first)")
    if base_size is None:
        base = step * max_size
        if abs(base - round(base)) > 1e-3 or round(base) < 1:
            raise ValueError(f"pos_embed: the table's base grid ({base:.4g} patches = step x M) is not a whole "
                             "number; pass base_size (the training resolution in patches, 64 for 1024 px)")
        base_size = round(base)
    if not 1 <= base_size <= max_size:
        raise ValueError(f"base_size {base_size} must be in 1..{max_size} (the table size)")
    return PosEmbedGrid(max_size=max_size, offset=offset, step=step, base_size=int(base_size))


# -- layers ---------------------------------------------------------------------------------------------
# RMSNorm (its weight is SAI's ``weight``), the LayerNorm, _modulate, attention and FinalLayer are the
# ones FLUX uses too (library/families/dit_layers.py).


class SelfAttention(nn.Module):
    """Fused ``qkv``, optional per-head ``ln_q``/``ln_k`` RMS norms, output ``proj`` (absent when
    ``pre_only``: the stream's attention output is never used). The block does the attention."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None, pre_only: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.ln_q = RMSNorm(head_dim) if qk_norm == "rms" else None
        self.ln_k = RMSNorm(head_dim) if qk_norm == "rms" else None
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, L, dim]`` -> (q, k, v), each ``[B, H, L, D]``, q and k normed when the model has qk-norm."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DismantledBlock(nn.Module):
    """One stream (context or image) of a joint block: adaLN modulation, attention projections, MLP.

    ``adaLN_modulation`` gives 6 chunks (shift, scale, gate for attention, the same for the MLP); 9
    with ``self_attention`` (a further shift, scale, gate for ``attn2``, MMDiT-X); 2 when ``pre_only``
    (shift, scale: the stream only feeds q/k/v to the joint attention).
    """

    def __init__(self, hidden: int, num_heads: int, mlp_hidden: int, qk_norm: str | None, *,
                 pre_only: bool = False, self_attention: bool = False) -> None:
        super().__init__()
        if pre_only and self_attention:
            raise ValueError("DismantledBlock: a pre-only stream cannot have the extra self-attention")
        self.pre_only = pre_only
        self.chunks = 2 if pre_only else 9 if self_attention else 6
        self.norm1 = _layer_norm(hidden)
        self.attn = SelfAttention(hidden, num_heads, qk_norm, pre_only=pre_only)
        self.attn2 = SelfAttention(hidden, num_heads, qk_norm) if self_attention else None
        if not pre_only:
            self.norm2 = _layer_norm(hidden)
            self.mlp = Mlp(hidden, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, self.chunks * hidden))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """-> (q, k, v) for the joint attention, (q, k, v) of ``attn2`` or None, the modulation chunks."""
        mods = self.adaLN_modulation(c)[:, None, :].chunk(self.chunks, dim=-1)
        normed = self.norm1(x)
        qkv = self.attn.heads(_modulate(normed, mods[0], mods[1]))
        qkv2 = self.attn2.heads(_modulate(normed, mods[6], mods[7])) if self.attn2 is not None else None
        return qkv, qkv2, mods

    def post_attention(self, x: torch.Tensor, attn_out: torch.Tensor, mods, attn2_out: torch.Tensor | None = None):
        """Residual updates after the attention (not for a pre-only stream)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = x + gate_msa * self.attn.proj(attn_out)
        if attn2_out is not None:
            x = x + mods[8] * self.attn2.proj(attn2_out)
        return x + gate_mlp * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Context and image streams with their own weights, one attention over [context; image] tokens."""

    def __init__(self, config: SD3Config, index: int) -> None:
        super().__init__()
        args = (config.hidden_size, config.num_heads, config.mlp_hidden_dim, config.qk_norm)
        self.context_block = DismantledBlock(*args, pre_only=config.context_pre_only(index))
        self.x_block = DismantledBlock(*args, self_attention=index in config.x_block_self_attn_layers)

    def forward(self, context: torch.Tensor, x: torch.Tensor,
                c: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """-> (context, x) after the block; context is None after a pre-only context stream."""
        (cq, ck, cv), _, c_mods = self.context_block.pre_attention(context, c)
        (xq, xk, xv), x_qkv2, x_mods = self.x_block.pre_attention(x, c)
        joint = attention(torch.cat((cq, xq), dim=2), torch.cat((ck, xk), dim=2), torch.cat((cv, xv), dim=2))
        n_ctx = context.shape[1]
        ctx_out, x_out = joint[:, :n_ctx], joint[:, n_ctx:]
        attn2_out = attention(*x_qkv2) if x_qkv2 is not None else None
        x = self.x_block.post_attention(x, x_out, x_mods, attn2_out)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, ctx_out, c_mods), x


class PatchEmbed(nn.Module):
    """``proj``: a p x p conv with stride p; ``[B, C, H, W]`` -> ``[B, (H/p)(W/p), hidden]`` (row-major)."""

    def __init__(self, in_channels: int, hidden: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MLPEmbedder(nn.Module):
    """``mlp``: Linear -> SiLU -> Linear (``t_embedder``, ``y_embedder``)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


# -- the model ------------------------------------------------------------------------------------------


def _swap_last_joint_blocks(num_blocks: int) -> tuple[int]:
    return (num_blocks,)


def max_blocks_to_swap(config: SD3Config) -> int:
    """Largest ``--blocks_to_swap`` that keeps ``MIN_RESIDENT_BLOCKS`` joint blocks on the device."""
    return largest_block_swap(_swap_last_joint_blocks, (config.depth,))


class SD3MMDiT(DiTMemoryMixin, nn.Module):
    """The SD3 / SD3.5 MMDiT; ``state_dict()`` keys are the SAI checkpoint keys (no prefix).

    ``pos_embed`` is a persistent buffer (saved, not trained) filled by ``load_state_dict``; a model
    built from a config alone holds zeros there. ``--blocks_to_swap N`` swaps the last N joint
    blocks; the memory options are :class:`DiTMemoryMixin`'s.
    """

    swap_label = "SD3"

    def __init__(self, config: SD3Config) -> None:
        super().__init__()
        self.config = config
        hidden, m = config.hidden_size, config.pos_embed_max_size
        self.patch_size = config.patch_size
        self.x_embedder = PatchEmbed(config.in_channels, hidden, config.patch_size)
        self.register_buffer("pos_embed", torch.zeros(1, m * m, hidden), persistent=True)
        self.t_embedder = MLPEmbedder(TIMESTEP_EMBED_DIM, hidden)
        self.y_embedder = MLPEmbedder(config.adm_in_channels, hidden)
        self.context_embedder = nn.Linear(config.context_in_dim, hidden)
        self.joint_blocks = nn.ModuleList(JointBlock(config, i) for i in range(config.depth))
        self.final_layer = FinalLayer(hidden, config.patch_size ** 2 * config.out_channels)

        self._init_memory_options()
        self.pos_emb_random_crop_rate = 0.0
        self.use_scaled_pos_embed = False
        self._pos_grid: PosEmbedGrid | None = None

    # -- memory options (DiTMemoryMixin) ---------------------------------------------------------------

    def _block_stacks(self) -> list[tuple[str, nn.ModuleList]]:
        return [("joint", self.joint_blocks)]

    def _swap_plan(self, num_blocks: int) -> tuple[int]:
        return _swap_last_joint_blocks(num_blocks)

    def _reference_weight(self) -> torch.Tensor:
        return self.x_embedder.proj.weight

    # -- position embedding ----------------------------------------------------------------------------

    def set_pos_emb_random_crop_rate(self, rate: float) -> None:
        """``--pos_emb_random_crop_rate``: in training mode, with probability ``rate`` per forward, the
        position window is placed at a random offset instead of the centre.

        Our definition: one draw ``torch.rand(()) < rate`` from torch's global CPU RNG per forward
        (made only when training with ``rate > 0``, so evaluation consumes no random numbers). On a hit,
        the crop mode takes ``top ~ U{0..M-h}``, ``left ~ U{0..M-w}`` (``torch.randint``, CPU); the
        scaled mode draws the grid centre uniformly where the grid stays inside the table's cell range
        (see ``enable_scaled_pos_embed``). The whole batch shares the window.
        """
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"--pos_emb_random_crop_rate must be in [0, 1], got {rate}")
        self.pos_emb_random_crop_rate = float(rate)

    def enable_scaled_pos_embed(self, enabled: bool = True, *, base_size: int | None = None) -> None:
        """``--enable_scaled_pos_embed`` (SD3.5 Medium multi-resolution training): compute the embedding
        for the patch grid instead of cropping the table. Call after loading the weights.

        Our definition, in table cell units u (a cell's coordinate is ``offset + step * u``, both fitted
        from the stored table by ``read_pos_embed_grid``; ``offset = 0``, ``step = B / M`` for the
        released tables): let B be the base grid (``base_size``, default ``step * M``: 64 patches =
        1024 px), ``c0 = (M - B) // 2 + (B - 1) / 2`` the centre of the base grid's centre crop and
        ``g = B / sqrt(h * w)`` the cell step per patch. Row i of an h x w patch grid is at
        ``u = c0 + (i - (h - 1) / 2) * g``, column j at ``u = c0 + (j - (w - 1) / 2) * g``; the
        embedding is ``sincos_2d`` of ``offset + step * u``. So every grid covers the area of the base
        grid with square patches (aspect kept), and an h = w = B grid gets exactly the table's centre
        crop. Random offsets (``set_pos_emb_random_crop_rate``) move the centre, per axis, uniformly
        within ``[(n - 1) g / 2, M - 1 - (n - 1) g / 2]`` (the centre ``c0`` when that is empty).
        """
        if not enabled:
            self.use_scaled_pos_embed, self._pos_grid = False, None
            return
        self._pos_grid = read_pos_embed_grid(self.pos_embed, base_size=base_size)
        self.use_scaled_pos_embed = True

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """Position embedding ``[1, height * width, hidden]`` for a patch grid, in ``pos_embed``'s dtype
        and device: the centre crop of the table, or per the training options (random offsets only in
        training mode)."""
        shifted = (self.training and self.pos_emb_random_crop_rate > 0.0
                   and float(torch.rand(())) < self.pos_emb_random_crop_rate)
        if self.use_scaled_pos_embed:
            return self._scaled_pos_embed(height, width, shifted)
        m = self.config.pos_embed_max_size
        if height > m or width > m:
            p = self.patch_size
            raise ValueError(f"SD3 MMDiT: a {height * p}x{width * p} latent ({height}x{width} patches) exceeds the "
                             f"position table of {m}x{m} patches (at most {m * p * 8} px a side); use a smaller "
                             "resolution or --enable_scaled_pos_embed")
        if shifted:
            top = int(torch.randint(0, m - height + 1, ()))
            left = int(torch.randint(0, m - width + 1, ()))
        else:
            top, left = (m - height) // 2, (m - width) // 2
        table = self.pos_embed.reshape(1, m, m, -1)
        return table[:, top:top + height, left:left + width].reshape(1, height * width, -1)

    def _scaled_pos_embed(self, height: int, width: int, shifted: bool) -> torch.Tensor:
        grid = self._pos_grid
        m, base = grid.max_size, grid.base_size
        center = (m - base) // 2 + (base - 1) / 2
        step = base / math.sqrt(height * width)
        device = self.pos_embed.device
        dtype = dit_layers.precise_float_dtype(device)

        def axis(n: int) -> torch.Tensor:
            mid = center
            low, high = (n - 1) * step / 2, m - 1 - (n - 1) * step / 2
            if shifted and low <= high:
                mid = low + float(torch.rand(())) * (high - low)
            cells = mid + (torch.arange(n, dtype=dtype, device=device) - (n - 1) / 2) * step
            return grid.offset + grid.step * cells

        rows = axis(height)
        cols = axis(width)
        return sincos_2d(rows, cols, self.config.hidden_size).to(self.pos_embed.dtype)[None]

    # -- forward ---------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        """Velocity ``[B, out_channels, H, W]`` for model-space latents ``x [B, in_channels, H, W]``.

        ``timesteps [B]``: sigma * 1000 (embedded as given); ``context [B, T, context_in_dim]``;
        ``y [B, adm_in_channels]`` (pooled CLIP-L + CLIP-G).
        """
        self._check_inputs(x, timesteps, context, y)
        self._begin_forward()
        p = self.patch_size
        height, width = x.shape[-2] // p, x.shape[-1] // p
        dtype = x.dtype
        tokens = self.x_embedder(x) + self.position_embedding(height, width).to(dtype)
        c = self.t_embedder(timestep_embedding(timesteps).to(dtype)) + self.y_embedder(y)
        context = self.context_embedder(context)
        for i, block in enumerate(self.joint_blocks):
            context, tokens = self._run_block(i, block, context, tokens, c)
        out = self.final_layer(tokens, c)
        # [B, h*w, p*p*C] with (row in patch, column in patch, channel) per token -> [B, C, h*p, w*p]
        out = out.reshape(out.shape[0], height, width, p, p, self.config.out_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(out.shape[0], self.config.out_channels, height * p, width * p)

    def _check_inputs(self, x, timesteps, context, y) -> None:
        """Shape checks (no tensor values are read, so no host sync)."""
        cfg = self.config
        p = cfg.patch_size
        problems = []
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % p or x.shape[3] % p:
            problems.append(f"x must be [B, {cfg.in_channels}, H, W] latents with H and W multiples of {p}, "
                            f"got {tuple(x.shape)}")
        batch = x.shape[0]
        if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != cfg.context_in_dim:
            problems.append(f"context must be [{batch}, T, {cfg.context_in_dim}], got {tuple(context.shape)}")
        if y.ndim != 2 or y.shape != (batch, cfg.adm_in_channels):
            problems.append(f"y must be [{batch}, {cfg.adm_in_channels}] pooled text, got {tuple(y.shape)}")
        if timesteps.ndim != 1 or timesteps.shape[0] != batch:
            problems.append(f"timesteps must be [{batch}] (sigma * 1000), got {tuple(timesteps.shape)}")
        if problems:
            raise ValueError("SD3MMDiT.forward: " + "; ".join(problems))
