"""The Chroma DiT (lodestones' FLUX.1-schnell derivative) in its original checkpoint layout.

Chroma keeps FLUX's image/text streams (``img_in``, ``txt_in``, ``double_blocks``, ``single_blocks``,
``final_layer.linear``: the same keys, the same :class:`~library.families.flux.model.DoubleStreamBlock`
and :class:`~library.families.flux.model.SingleStreamBlock` code) and drops everything that turned
(timestep, guidance, CLIP pooled vector) into per-block modulations: ``time_in``, ``vector_in``,
``guidance_in``, every block's ``img_mod``/``txt_mod``/``modulation`` linears and the final layer's
``adaLN_modulation``. Instead one small network, ``distilled_guidance_layer`` (the "approximator"),
makes all modulation vectors at once (the reference's ``get_mod_vectors``):

* input ``[B, M, 64]`` for ``M = 3 * single + 12 * double + 2`` vectors: for vector ``i`` the
  sinusoidal embedding (16 channels) of the timestep, that of the guidance value (16; the reference
  feeds ``--guidance_scale``, 0 for Chroma), and that of the index ``i`` (32), each at ``x * 1000``;
* ``in_proj`` -> ``depth`` x (``x + layers[k](norms[k](x))``, ``layers[k]`` = Linear-SiLU-Linear,
  ``norms[k]`` an RMS norm with ``scale``) -> ``out_proj`` to the hidden width;
* vectors ``[0, 3S)`` go to the single blocks (shift, scale, gate each), ``[3S, 3S + 6D)`` to the
  double blocks' image stream, ``[3S + 6D, 3S + 12D)`` to their text stream, the last two
  (shift, scale) to the final layer.

There is no CLIP-L: the text is T5 only, with its attention mask; like the reference (and
diffusers' ``ChromaPipeline``) the DiT also attends to the first padding token after the caption.
Module names equal the checkpoint keys, so LoRA names are FLUX's (``lora_unet_double_blocks_0_
img_attn_qkv``, ...) minus the modulation layers Chroma does not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from library.families import dit_layers
from library.families.flux.model import (
    DoubleStreamBlock,
    FluxBlockStacks,
    FluxConfig,
    MLPEmbedder,
    ModulationOut,
    RMSNorm,
    SingleStreamBlock,
    default_axes_dim,
    strip_flux_prefix,
    timestep_embedding,
)

#: the key that tells a Chroma file from a FLUX.1 one (diffusers' single-file detection uses it too)
CHROMA_MARKER_KEY = "distilled_guidance_layer.in_proj.bias"
#: padding tokens after the caption the DiT still attends to (the reference's ``attn_padding``)
ATTN_PADDING = 1


def is_chroma_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a DiT state dict (keys with or without ``model.diffusion_model.``) is Chroma's."""
    return any(k.endswith(CHROMA_MARKER_KEY) for k in state_dict)


@dataclass(frozen=True)
class ChromaConfig(FluxConfig):
    """Architecture of a Chroma DiT; defaults are the released Chroma (Chroma1-Base/HD: FLUX.1's
    3072 x 24 heads, 19 double + 38 single blocks; approximator 64 -> 5120 x 5 -> 3072).

    ``guidance_embed`` stays True: the approximator takes a guidance value, so callers pass one
    (and sample with FLUX.1-dev's shifted schedule and 512 T5 tokens, as the reference does).
    ``vec_in_dim`` is unused (no CLIP-L).
    """

    approximator_in_dim: int = 64
    approximator_hidden_size: int = 5120
    approximator_depth: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.approximator_in_dim % 4:
            raise ValueError(f"ChromaConfig: approximator_in_dim {self.approximator_in_dim} must be a multiple of 4 "
                             "(timestep, guidance: a quarter each; vector index: half)")

    @property
    def num_modulations(self) -> int:
        """How many modulation vectors the approximator makes (344 for the full-size model)."""
        return 3 * self.depth_single_blocks + 12 * self.depth + 2

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], *,
                        axes_dim: tuple[int, ...] | None = None) -> "ChromaConfig":
        """Read the architecture from tensor shapes and key presence (as ``FluxConfig.from_state_dict``;
        ``ValueError`` naming the missing key for a state dict that is not a Chroma DiT)."""
        sd = strip_flux_prefix(state_dict)
        if not is_chroma_state_dict(sd):
            raise ValueError(f"not a Chroma DiT state dict: key {CHROMA_MARKER_KEY!r} is missing")
        depth = dit_layers.count_numbered_blocks(sd, "double_blocks", "Chroma")
        depth_single = dit_layers.count_numbered_blocks(sd, "single_blocks", "Chroma")
        approximator_depth = dit_layers.count_numbered_blocks(sd, "distilled_guidance_layer.layers", "Chroma")
        if depth:
            norm_key, mlp_key = "double_blocks.0.img_attn.norm.query_norm.scale", "double_blocks.0.img_mlp.0.weight"
        else:
            norm_key, mlp_key = "single_blocks.0.norm.query_norm.scale", None
        required = ["img_in.weight", "txt_in.weight", "distilled_guidance_layer.in_proj.weight",
                    "distilled_guidance_layer.out_proj.weight", "final_layer.linear.weight", norm_key]
        for key in required + ([mlp_key] if mlp_key else []):
            if key not in sd:
                raise ValueError(f"not a Chroma DiT state dict: key {key!r} is missing")
        hidden, in_channels = sd["img_in.weight"].shape
        head_dim = sd[norm_key].shape[0]
        if hidden % head_dim:
            raise ValueError(f"Chroma state dict: hidden size {hidden} (img_in.weight) is not a multiple of the "
                             f"head dim {head_dim} ({norm_key})")
        mlp_hidden = sd[mlp_key].shape[0] if mlp_key else sd["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden
        approx_hidden, approx_in = sd["distilled_guidance_layer.in_proj.weight"].shape
        out_channels = sd["final_layer.linear.weight"].shape[0]
        return cls(
            in_channels=in_channels,
            context_in_dim=sd["txt_in.weight"].shape[1],
            hidden_size=hidden,
            mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single_blocks=depth_single,
            axes_dim=tuple(axes_dim) if axes_dim is not None else default_axes_dim(head_dim),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd if depth else True,
            out_channels=None if out_channels == in_channels else out_channels,
            approximator_in_dim=approx_in,
            approximator_hidden_size=approx_hidden,
            approximator_depth=approximator_depth,
        )


class Approximator(nn.Module):
    """``distilled_guidance_layer``: ``in_proj``, residual RMS-normed MLPs, ``out_proj`` (see the module docstring)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, depth: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden_dim)
        self.layers = nn.ModuleList(MLPEmbedder(hidden_dim, hidden_dim) for _ in range(depth))
        self.norms = nn.ModuleList(RMSNorm(hidden_dim) for _ in range(depth))
        self.out_proj = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))
        return self.out_proj(x)


def _triples(mods: torch.Tensor) -> list[ModulationOut]:
    """``[B, 3n, D]`` -> n (shift, scale, gate) triples, each ``[B, 1, D]`` (broadcast over tokens)."""
    return [ModulationOut(mods[:, i:i + 1], mods[:, i + 1:i + 2], mods[:, i + 2:i + 3])
            for i in range(0, mods.shape[1], 3)]


class ChromaDoubleStreamBlock(DoubleStreamBlock):
    """FLUX's double block without ``img_mod``/``txt_mod``: ``mods [B, 12, D]`` are the image
    stream's two triples, then the text stream's."""

    has_modulation = False

    def forward(self, img: torch.Tensor, txt: torch.Tensor, mods: torch.Tensor, freqs: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.modulated_forward(img, txt, _triples(mods), freqs, mask)


class ChromaSingleStreamBlock(SingleStreamBlock):
    """FLUX's single block without ``modulation``: ``mods [B, 3, D]`` is its (shift, scale, gate)."""

    has_modulation = False

    def forward(self, x: torch.Tensor, mods: torch.Tensor, freqs: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        (mod,) = _triples(mods)
        return self.modulated_forward(x, mod, freqs, mask)


class ChromaFinalLayer(nn.Module):
    """``linear(modulate(norm_final(x), shift, scale))`` with shift and scale given (no ``adaLN_modulation``)."""

    def __init__(self, hidden: int, out_features: int) -> None:
        super().__init__()
        self.norm_final = dit_layers.layer_norm(hidden)
        self.linear = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor, mods: torch.Tensor) -> torch.Tensor:
        shift, scale = mods[:, 0:1], mods[:, 1:2]
        return self.linear(dit_layers.modulate(self.norm_final(x), shift, scale))


def attended_text(mask: torch.Tensor, padding: int = ATTN_PADDING) -> torch.Tensor:
    """T5's (right-padded) token mask ``[B, T]`` -> the text tokens Chroma attends to: the caption
    and its first ``padding`` padding tokens (bool). No value is read back to the host."""
    lengths = mask.to(torch.long).sum(dim=-1, keepdim=True) + padding
    return torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths


class Chroma(FluxBlockStacks, nn.Module):
    """The Chroma transformer; ``state_dict()`` keys are the Chroma checkpoint keys.

    ``forward`` takes the arguments of :meth:`library.families.flux.model.Flux.forward` (``y``, the
    CLIP vector, is accepted and ignored), so samplers and the training objective call both alike.
    Memory options (checkpointing, ``--blocks_to_swap`` with FLUX's plan) are :class:`DiTMemoryMixin`'s.
    """

    swap_label = "Chroma"

    def __init__(self, config: ChromaConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.in_channels = config.in_channels
        self.out_channels = config.output_channels
        self.img_in = nn.Linear(config.in_channels, hidden)
        self.distilled_guidance_layer = Approximator(config.approximator_in_dim, hidden,
                                                     config.approximator_hidden_size, config.approximator_depth)
        self.txt_in = nn.Linear(config.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(
            ChromaDoubleStreamBlock(hidden, config.num_heads, config.mlp_ratio, config.qkv_bias)
            for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(
            ChromaSingleStreamBlock(hidden, config.num_heads, config.mlp_ratio)
            for _ in range(config.depth_single_blocks))
        self.final_layer = ChromaFinalLayer(hidden, self.out_channels)
        self._init_memory_options()

    # -- forward -----------------------------------------------------------------------------------

    def modulation_input(self, timesteps: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """The approximator's input ``[B, M, in_dim]`` (float32) for sigmas and guidance values ``[B]``."""
        quarter = self.config.approximator_in_dim // 4
        count = self.config.num_modulations
        t = timestep_embedding(timesteps, quarter)
        g = timestep_embedding(guidance.to(timesteps.device), quarter)
        index = timestep_embedding(torch.arange(count, device=timesteps.device, dtype=torch.float32), 2 * quarter)
        per_sample = torch.cat((t, g), dim=-1)[:, None, :].expand(-1, count, -1)
        return torch.cat((per_sample, index[None].expand(timesteps.shape[0], -1, -1)), dim=-1)

    def modulations(self, timesteps: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """All modulation vectors ``[B, M, hidden]`` (the reference's ``get_mod_vectors``)."""
        if guidance is None:
            guidance = torch.zeros_like(timesteps)
        return self.distilled_guidance_layer(self.modulation_input(timesteps, guidance).to(dtype))

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                txt_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity ``[B, L, out_channels]`` for packed latents ``img [B, L, in_channels]``.

        ``txt [B, T, context_in_dim]`` (T5 states), ``timesteps [B]`` sigma in [0, 1], ``guidance
        [B]`` (None = 0, what Chroma is trained with), ``txt_attention_mask [B, T]`` (T5's token mask;
        the caption plus :data:`ATTN_PADDING` padding tokens are attended to; None = every token).
        """
        self._check_inputs(img, img_ids, txt, txt_ids, timesteps, txt_attention_mask)
        self._begin_forward()
        cfg = self.config
        dtype = img.dtype
        img = self.img_in(img)
        txt = self.txt_in(txt)
        mods = self.modulations(timesteps, guidance, dtype)

        freqs, mask = self._joint_rope_and_mask(
            txt_ids, img_ids, None if txt_attention_mask is None else attended_text(txt_attention_mask), img)

        single, double = 3 * cfg.depth_single_blocks, 6 * cfg.depth
        for i, block in enumerate(self.double_blocks):
            block_mods = torch.cat((mods[:, single + 6 * i:single + 6 * i + 6],
                                    mods[:, single + double + 6 * i:single + double + 6 * i + 6]), dim=1)
            img, txt = self._run_block(i, block, img, txt, block_mods, freqs, mask)
        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for j, block in enumerate(self.single_blocks):
            x = self._run_block(cfg.depth + j, block, x, mods[:, 3 * j:3 * j + 3], freqs, mask)
        return self.final_layer(x[:, n_txt:], mods[:, -2:])

    def _check_inputs(self, img, img_ids, txt, txt_ids, timesteps, txt_attention_mask) -> None:
        problems = self._shape_problems(img, img_ids, txt, txt_ids, timesteps, txt_attention_mask)
        if problems:
            raise ValueError("Chroma.forward: " + "; ".join(problems))
