"""The FLUX.1 denoiser (dev / schnell and pruned variants) in the original BFL checkpoint layout.

Module paths are the checkpoint keys (``double_blocks.0.img_attn.qkv.weight``, ...), so a BFL
``flux1-dev.safetensors`` loads with ``load_state_dict`` as is, and LoRA module names come out as
``lora_unet_<path with _>`` (fused ``qkv`` / ``linear1`` as in the reference LoRA format). The
LoRA network finds the blocks by class name: ``DoubleStreamBlock`` and ``SingleStreamBlock``.

Tensor conventions of ``Flux.forward``: latents are packed 2x2 patches (``pack_latents``), one
token per patch, with position ids ``[B, L, 3]`` (``image_ids``: 0, row, column) and text ids
``[B, T, 3]`` of zeros (``text_ids``). ``timesteps`` and ``guidance`` are given as the flow sigma
and the guidance scale; the model multiplies both by 1000 before the sinusoidal embedding. The
compute dtype is the dtype of the ``img`` input (or autocast's).

Memory options for training: ``enable_gradient_checkpointing(cpu_offload=...)`` and
``enable_block_swap(n, device)`` (shared with SD3: ``library/families/dit_memory.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from library.families import dit_layers
from library.families.dit_layers import TIMESTEP_EMBED_DIM
from library.families.dit_layers import apply_rope, rope_frequencies
from library.families.dit_layers import FinalLayer as LastLayer  # BFL's name for the shared final layer
from library.families.dit_layers import layer_norm as _layer_norm
from library.families.dit_memory import MIN_RESIDENT_BLOCKS  # noqa: F401 (re-exported: part of this module's API)
from library.families.dit_memory import DiTMemoryMixin, largest_block_swap

CHECKPOINT_PREFIX = "model.diffusion_model."
TIME_FACTOR = 1000.0


def strip_flux_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with a leading ``model.diffusion_model.`` removed from every key that has it
    (full ComfyUI-style checkpoints carry it; BFL DiT files do not). Tensors are not copied."""
    n = len(CHECKPOINT_PREFIX)
    return {(k[n:] if k.startswith(CHECKPOINT_PREFIX) else k): v for k, v in state_dict.items()}


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """RoPE split of a head over the 3 id axes (index, row, column), for weights that cannot show it.

    Rule: axis 0 gets ``head_dim // 8``, rows and columns ``(head_dim - a0) // 2`` each; this is
    the real (16, 56, 56) for head_dim 128. Every part must be even (rotations act on pairs), so
    head dims where the rule does not split exactly raise ``ValueError``.
    """
    a0 = head_dim // 8
    a1 = (head_dim - a0) // 2
    axes = (a0, a1, a1)
    if sum(axes) != head_dim or any(a <= 0 or a % 2 for a in axes):
        raise ValueError(f"FLUX head dim {head_dim} has no default RoPE split (got {axes}: each part must be "
                         "even and positive and they must sum to the head dim); pass axes_dim=(...) "
                         "explicitly to FluxConfig / FluxConfig.from_state_dict")
    return axes


@dataclass(frozen=True)
class FluxConfig(dit_layers.TransformerWidths):
    """Architecture of a FLUX.1 DiT; defaults are FLUX.1-dev. ``out_channels`` None = ``in_channels``."""

    in_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = True
    out_channels: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"FluxConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise ValueError(f"FluxConfig: axes_dim {self.axes_dim} must be even numbers summing to the head dim "
                             f"{self.head_dim}")

    @property
    def output_channels(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], *,
                        axes_dim: tuple[int, ...] | None = None) -> "FluxConfig":
        """Read the architecture from tensor shapes and key presence (keys with or without the
        ``model.diffusion_model.`` prefix; meta tensors are fine).

        Depths count the ``double_blocks.N`` / ``single_blocks.N`` present (pruned models work;
        the numbers must run 0..N-1). The head dim comes from the qk-norm scale. ``axes_dim`` cannot
        be seen in the weights: ``default_axes_dim(head_dim)`` unless given. Raises ``ValueError``
        naming the missing key for a state dict that is not a FLUX DiT.
        """
        sd = strip_flux_prefix(state_dict)
        if "img_in.weight" not in sd:
            hint = ""
            if "x_embedder.weight" in sd:
                hint = " (this looks like a Diffusers FluxTransformer2DModel; convert it to the BFL layout)"
            elif any(k.startswith("joint_blocks.") for k in sd):
                hint = " (this looks like an SD3 MMDiT)"
            raise ValueError(f"not a FLUX.1 DiT state dict: key 'img_in.weight' is missing{hint}")
        depth = dit_layers.count_numbered_blocks(sd, "double_blocks", "FLUX")
        depth_single = dit_layers.count_numbered_blocks(sd, "single_blocks", "FLUX")
        if depth:
            norm_key, mlp_key = "double_blocks.0.img_attn.norm.query_norm.scale", "double_blocks.0.img_mlp.0.weight"
        else:
            norm_key, mlp_key = "single_blocks.0.norm.query_norm.scale", None
        required = ["txt_in.weight", "vector_in.in_layer.weight", "time_in.in_layer.weight",
                    "final_layer.linear.weight", norm_key] + ([mlp_key] if mlp_key else [])
        for key in required:
            if key not in sd:
                raise ValueError(f"not a FLUX.1 DiT state dict: key {key!r} is missing")

        hidden, in_channels = sd["img_in.weight"].shape
        head_dim = sd[norm_key].shape[0]
        if hidden % head_dim:
            raise ValueError(f"FLUX state dict: hidden size {hidden} (img_in.weight) is not a multiple of the "
                             f"head dim {head_dim} ({norm_key})")
        if mlp_key:
            mlp_hidden = sd[mlp_key].shape[0]
        else:  # linear1 = 3 * hidden (qkv) + mlp hidden
            mlp_hidden = sd["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden
        out_channels = sd["final_layer.linear.weight"].shape[0]
        return cls(
            in_channels=in_channels,
            vec_in_dim=sd["vector_in.in_layer.weight"].shape[1],
            context_in_dim=sd["txt_in.weight"].shape[1],
            hidden_size=hidden,
            mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single_blocks=depth_single,
            axes_dim=tuple(axes_dim) if axes_dim is not None else default_axes_dim(head_dim),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd if depth else True,
            guidance_embed="guidance_in.in_layer.weight" in sd,
            out_channels=None if out_channels == in_channels else out_channels,
        )


# -- embeddings -------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int = TIMESTEP_EMBED_DIM, max_period: float = 10000.0,
                       time_factor: float = TIME_FACTOR) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` (cos half first) of ``t * time_factor``, in float32
    (:func:`library.families.dit_layers.timestep_embedding`; FLUX passes sigma, scaled by 1000 here)."""
    return dit_layers.timestep_embedding(t, dim, max_period, time_factor)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, freqs: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
    """RoPE on q, k then SDPA; ``[B, H, L, D]`` -> ``[B, L, H*D]``. ``mask``: bool, True = attend."""
    return dit_layers.attention(apply_rope(q, freqs), apply_rope(k, freqs), v, mask)


class MLPEmbedder(nn.Module):
    """``in_layer`` -> SiLU -> ``out_layer`` (time_in, vector_in, guidance_in)."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(dit_layers.RMSNorm):
    """RMS norm over the last dim with a learned ``scale`` (BFL's name; eps 1e-6), computed in float32."""

    weight_name = "scale"


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class SelfAttention(nn.Module):
    """Fused ``qkv`` projection, per-head qk RMS norm, output ``proj`` (the block does the attention)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, L, dim]`` -> normed q, k and v, each ``[B, H, L, D]``."""
        q, k, v = rearrange(self.qkv(x), "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class ModulationOut(NamedTuple):
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor

    def modulate(self, x: torch.Tensor) -> torch.Tensor:
        return dit_layers.modulate(x, self.shift, self.scale)


class Modulation(nn.Module):
    """``lin(silu(vec))`` split into one (single) or two (double) shift/scale/gate triples ``[B, 1, dim]``."""

    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: torch.Tensor) -> list[ModulationOut]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return [ModulationOut(*out[i:i + 3]) for i in range(0, self.multiplier, 3)]


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Separate image and text weights, one joint attention over [text; image] tokens."""

    #: FLUX.1 blocks compute their shift/scale/gate from ``vec`` (``img_mod``/``txt_mod``); Chroma's
    #: blocks (:mod:`library.families.flux.chroma`) are given them and have no modulation layers.
    has_modulation = True

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        mlp_hidden = round(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True) if self.has_modulation else None
        self.img_norm1 = _layer_norm(hidden_size)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = _layer_norm(hidden_size)
        self.img_mlp = _mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True) if self.has_modulation else None
        self.txt_norm1 = _layer_norm(hidden_size)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = _layer_norm(hidden_size)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, freqs: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.modulated_forward(img, txt, (*self.img_mod(vec), *self.txt_mod(vec)), freqs, mask)

    def modulated_forward(self, img: torch.Tensor, txt: torch.Tensor, mods: Sequence[ModulationOut],
                          freqs: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The block given its modulations: image attention, image MLP, text attention, text MLP."""
        img_attn_mod, img_mlp_mod, txt_attn_mod, txt_mlp_mod = mods
        img_q, img_k, img_v = self.img_attn.heads(img_attn_mod.modulate(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self.txt_attn.heads(txt_attn_mod.modulate(self.txt_norm1(txt)))
        joint = attention(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2),
                          torch.cat((txt_v, img_v), dim=2), freqs, mask)
        n_txt = txt.shape[1]
        txt_out, img_out = joint[:, :n_txt], joint[:, n_txt:]

        img = img + img_attn_mod.gate * self.img_attn.proj(img_out)
        img = img + img_mlp_mod.gate * self.img_mlp(img_mlp_mod.modulate(self.img_norm2(img)))
        txt = txt + txt_attn_mod.gate * self.txt_attn.proj(txt_out)
        txt = txt + txt_mlp_mod.gate * self.txt_mlp(txt_mlp_mod.modulate(self.txt_norm2(txt)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One weight set over [text; image] tokens; attention and MLP run in parallel (fused linears)."""

    #: see :attr:`DoubleStreamBlock.has_modulation`
    has_modulation = True

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = round(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = _layer_norm(hidden_size)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False) if self.has_modulation else None

    def forward(self, x: torch.Tensor, vec: torch.Tensor, freqs: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        (mod,) = self.modulation(vec)
        return self.modulated_forward(x, mod, freqs, mask)

    def modulated_forward(self, x: torch.Tensor, mod: ModulationOut, freqs: torch.Tensor,
                          mask: torch.Tensor | None) -> torch.Tensor:
        """The block given its modulation."""
        qkv, mlp = torch.split(self.linear1(mod.modulate(self.pre_norm(x))),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, freqs, mask)
        return x + mod.gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))


# -- the model --------------------------------------------------------------------------------------


def block_swap_plan(num_blocks: int) -> tuple[int, int]:
    """``--blocks_to_swap N`` -> (double blocks, single blocks) kept on the CPU: N//2 double and
    (N - N//2) * 2 single (a single block is about half a double block)."""
    return num_blocks // 2, (num_blocks - num_blocks // 2) * 2


def max_blocks_to_swap(config: FluxConfig) -> int:
    """Largest N whose plan leaves ``MIN_RESIDENT_BLOCKS`` of each kind on the device (35 for FLUX.1)."""
    return largest_block_swap(block_swap_plan, (config.depth, config.depth_single_blocks))


class FluxBlockStacks(DiTMemoryMixin):
    """What FLUX.1 and Chroma share around their ``double_blocks`` / ``single_blocks`` stacks and
    ``img_in``: the memory options (which stacks swap, how N swapped blocks split between them), the
    joint sequence's RoPE and attention mask, and the input shape checks."""

    def _joint_rope_and_mask(self, txt_ids: torch.Tensor, img_ids: torch.Tensor, text_keys: torch.Tensor | None,
                             img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """RoPE frequencies of the ``[text, image]`` sequence, and its key mask ``[B, 1, 1, T + L]`` from
        ``text_keys`` (bool ``[B, T]``, True = attended; every image token is) or None (all attended)."""
        freqs = rope_frequencies(torch.cat((txt_ids, img_ids), dim=1), self.config.axes_dim, self.config.theta)
        if text_keys is None:
            return freqs, None
        keys = torch.cat((text_keys, torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)), dim=1)
        return freqs, keys[:, None, None, :]

    def _shape_problems(self, img, img_ids, txt, txt_ids, timesteps, txt_attention_mask) -> list[str]:
        """What is wrong with the shapes of the inputs both models take (no tensor values are read, so
        no host sync); each model adds its own inputs' checks."""
        cfg = self.config
        problems = []
        if img.ndim != 3 or img.shape[-1] != cfg.in_channels:
            problems.append(f"img must be [B, L, {cfg.in_channels}] packed latents, got {tuple(img.shape)}")
        if txt.ndim != 3 or txt.shape[-1] != cfg.context_in_dim:
            problems.append(f"txt must be [B, T, {cfg.context_in_dim}], got {tuple(txt.shape)}")
        if img_ids.ndim != 3 or img_ids.shape[1:] != (img.shape[1], len(cfg.axes_dim)):
            problems.append(f"img_ids must be [B, {img.shape[1]}, {len(cfg.axes_dim)}], got {tuple(img_ids.shape)}")
        if txt_ids.ndim != 3 or txt_ids.shape[1:] != (txt.shape[1], len(cfg.axes_dim)):
            problems.append(f"txt_ids must be [B, {txt.shape[1]}, {len(cfg.axes_dim)}], got {tuple(txt_ids.shape)}")
        if timesteps.ndim != 1:
            problems.append(f"timesteps must be [B], got {tuple(timesteps.shape)}")
        if txt_attention_mask is not None and txt_attention_mask.shape != txt.shape[:2]:
            problems.append(f"txt_attention_mask must be [B, T] = {tuple(txt.shape[:2])}, "
                            f"got {tuple(txt_attention_mask.shape)}")
        return problems

    def _block_stacks(self) -> list[tuple[str, nn.ModuleList]]:
        return [("double", self.double_blocks), ("single", self.single_blocks)]

    def _swap_plan(self, num_blocks: int) -> tuple[int, int]:
        return block_swap_plan(num_blocks)

    def _reference_weight(self) -> torch.Tensor:
        return self.img_in.weight


class Flux(FluxBlockStacks, nn.Module):
    """The FLUX.1 transformer; ``state_dict()`` keys are the BFL checkpoint keys.

    ``--blocks_to_swap N`` swaps the last ``N // 2`` double and ``(N - N // 2) * 2`` single blocks
    (:func:`block_swap_plan`); the other memory options are :class:`DiTMemoryMixin`'s.
    """

    swap_label = "FLUX"

    def __init__(self, config: FluxConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.in_channels = config.in_channels
        self.out_channels = config.output_channels
        self.img_in = nn.Linear(config.in_channels, hidden)
        self.time_in = MLPEmbedder(TIMESTEP_EMBED_DIM, hidden)
        self.vector_in = MLPEmbedder(config.vec_in_dim, hidden)
        self.guidance_in = MLPEmbedder(TIMESTEP_EMBED_DIM, hidden) if config.guidance_embed else None
        self.txt_in = nn.Linear(config.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, config.num_heads, config.mlp_ratio, config.qkv_bias)
            for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, config.num_heads, config.mlp_ratio) for _ in range(config.depth_single_blocks))
        self.final_layer = LastLayer(hidden, self.out_channels)
        self._init_memory_options()

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None = None,
                txt_attention_mask: torch.Tensor | None = None, *,
                block_controlnet_hidden_states: Sequence[torch.Tensor] | None = None,
                block_controlnet_single_hidden_states: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Velocity prediction ``[B, L, out_channels]`` for packed latents ``img [B, L, in_channels]``.

        ``txt [B, T, context_in_dim]`` (T5 states), ``y [B, vec_in_dim]`` (CLIP pooled),
        ``timesteps [B]`` sigma in [0, 1], ``guidance [B]`` (required when the model has
        ``guidance_in``, ignored otherwise), ``txt_attention_mask [B, T]`` (True/1 = real token; padded text tokens
        are then never attended to; image tokens always are).

        ControlNet residuals (:class:`library.families.flux.controlnet.ControlNetFlux`), each ``[B, L, hidden]``:
        ``block_controlnet_hidden_states[i % n]`` is added to the image stream after double block ``i``,
        ``block_controlnet_single_hidden_states[j % n]`` to the image tokens after single block ``j``
        (cycling through the ControlNet's blocks, as the reference does).
        """
        self._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance, txt_attention_mask)
        self._begin_forward()
        dtype = img.dtype
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps).to(dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)

        freqs, mask = self._joint_rope_and_mask(
            txt_ids, img_ids, None if txt_attention_mask is None else txt_attention_mask.bool(), img)

        double_residuals = block_controlnet_hidden_states or ()
        single_residuals = block_controlnet_single_hidden_states or ()
        for i, block in enumerate(self.double_blocks):
            img, txt = self._run_block(i, block, img, txt, vec, freqs, mask)
            if double_residuals:
                img = img + double_residuals[i % len(double_residuals)]
        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for j, block in enumerate(self.single_blocks):
            x = self._run_block(self.config.depth + j, block, x, vec, freqs, mask)
            if single_residuals:
                x = torch.cat((x[:, :n_txt], x[:, n_txt:] + single_residuals[j % len(single_residuals)]), dim=1)
        return self.final_layer(x[:, n_txt:], vec)

    def _check_inputs(self, img, img_ids, txt, txt_ids, timesteps, y, guidance, txt_attention_mask) -> None:
        cfg = self.config
        problems = self._shape_problems(img, img_ids, txt, txt_ids, timesteps, txt_attention_mask)
        if y.ndim != 2 or y.shape[-1] != cfg.vec_in_dim:
            problems.append(f"y must be [B, {cfg.vec_in_dim}] pooled text, got {tuple(y.shape)}")
        if cfg.guidance_embed and guidance is None:
            problems.append("this model has guidance_in (FLUX.1-dev style): pass guidance [B] (e.g. 3.5 or 1.0)")
        if problems:
            raise ValueError("Flux.forward: " + "; ".join(problems))


# -- latent packing and position ids ----------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]``: one token per 2x2 patch, channel-major in a patch."""
    if latents.ndim != 4 or latents.shape[2] % 2 or latents.shape[3] % 2:
        raise ValueError(f"pack_latents: expected [B, C, H, W] with even H and W, got {tuple(latents.shape)}")
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for latent ``height`` x ``width``: ``[B, L, 4C]`` -> ``[B, C, H, W]``."""
    if height % 2 or width % 2 or x.ndim != 3 or x.shape[1] != (height // 2) * (width // 2):
        raise ValueError(f"unpack_latents: {tuple(x.shape)} is not a packed {height}x{width} latent "
                         f"(need even sizes and L = {(height // 2) * (width // 2)})")
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, w=width // 2, ph=2, pw=2)


def image_ids(batch: int, height: int, width: int, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Position ids of packed latent tokens (latent ``height`` x ``width``): ``[B, (H/2)(W/2), 3]``
    with axis 0 = 0, axis 1 = patch row, axis 2 = patch column (row-major, like ``pack_latents``)."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(1, h * w, 3).repeat(batch, 1, 1)


def text_ids(batch: int, length: int, device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Position ids of the text tokens: zeros ``[B, T, 3]``."""
    return torch.zeros(batch, length, 3, device=device, dtype=dtype)
