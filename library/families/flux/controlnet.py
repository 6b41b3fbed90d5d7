"""The FLUX.1 ControlNet in the reference's layout (kohya-ss ``ControlNetFlux``), and how it feeds the DiT.

Module names are the keys of the reference's ControlNet files (no prefix):

* ``img_in``, ``time_in.*``, ``vector_in.*``, ``guidance_in.*`` (dev models only), ``txt_in``: the
  DiT's input embedders; ``double_blocks.N.*`` (default 2) and ``single_blocks.N.*`` (default 0):
  FLUX blocks (:class:`~library.families.flux.model.DoubleStreamBlock`, ...);
* ``input_hint_block.{0,2,...,14}``: the conditioning-image encoder, eight 3x3 convolutions 3 -> 16
  channels with SiLU between them, three of stride 2 (8x down-sampling, the AE's), the last one
  zero-initialised; its output is packed 2x2 like the latents (64 channels) and projected by
  ``pos_embed_input`` (Linear 64 -> hidden), then added to the embedded image tokens;
* ``controlnet_blocks.N`` / ``controlnet_blocks_for_single.N``: zero-initialised Linear hidden ->
  hidden projections of each block's image tokens: the residuals the DiT adds
  (``Flux.forward(block_controlnet_hidden_states=..., block_controlnet_single_hidden_states=...)``).

A new ControlNet (:meth:`ControlNetFlux.from_flux`) copies the DiT's embedders and its first blocks
(the reference starts from random weights; a copy converges faster and is what diffusers'
``FluxControlNetModel.from_transformer`` does). The projections and the hint block's last convolution
are zero, so a new ControlNet changes nothing until it is trained.

Deliberate difference: the reference projects the *double* blocks' outputs for its single-block
residuals and adds them to the whole [text; image] sequence (which fails for any single depth > 0);
here each single block's image tokens are projected and added to the DiT's image tokens.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from einops import rearrange
from torch import nn

from library.families import dit_layers
from library.families.dit_memory import DiTMemoryMixin
from library.families.flux.controlnet_args import DEFAULT_DEPTH, DEFAULT_SINGLE_DEPTH
from library.families.flux.model import (
    DoubleStreamBlock,
    Flux,
    FluxConfig,
    MLPEmbedder,
    SingleStreamBlock,
    rope_frequencies,
    timestep_embedding,
)

logger = logging.getLogger(__name__)

HINT_CHANNELS = 16


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def input_hint_block(channels: int = HINT_CHANNELS) -> nn.Sequential:
    """3 -> ``channels`` convolutions, SiLU between, strides (1, 1, 2, 1, 2, 1, 2, 1); the last one zero."""
    strides = (1, 1, 2, 1, 2, 1, 2)
    layers: list[nn.Module] = []
    in_channels = 3
    for stride in strides:
        layers += [nn.Conv2d(in_channels, channels, 3, padding=1, stride=stride), nn.SiLU()]
        in_channels = channels
    layers.append(_zero(nn.Conv2d(channels, channels, 3, padding=1)))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class ControlNetFluxConfig:
    """The base DiT's config and the ControlNet's depths."""

    flux: FluxConfig
    depth: int = DEFAULT_DEPTH
    single_depth: int = DEFAULT_SINGLE_DEPTH

    def __post_init__(self) -> None:
        if self.depth < 0 or self.single_depth < 0 or self.depth + self.single_depth == 0:
            raise ValueError(f"a FLUX ControlNet needs at least one block: got {self.depth} double and "
                             f"{self.single_depth} single blocks")
        if self.flux.in_channels != 4 * HINT_CHANNELS:
            raise ValueError(f"a FLUX ControlNet packs its {HINT_CHANNELS}-channel hint 2x2 into the DiT's input "
                             f"width: the DiT must take {4 * HINT_CHANNELS} channels, not {self.flux.in_channels}")

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], flux: FluxConfig) -> "ControlNetFluxConfig":
        """The depths of a ControlNet file (its ``double_blocks.N`` / ``single_blocks.N``) on ``flux``."""
        return cls(flux, depth=dit_layers.count_numbered_blocks(state_dict, "double_blocks", "FLUX ControlNet"),
                   single_depth=dit_layers.count_numbered_blocks(state_dict, "single_blocks", "FLUX ControlNet"))


class ControlNetFlux(DiTMemoryMixin, nn.Module):
    """The ControlNet: ``forward`` returns the residuals for the DiT (see the module docstring)."""

    swap_label = "FLUX ControlNet"

    def __init__(self, config: ControlNetFluxConfig) -> None:
        super().__init__()
        self.config = config
        flux = config.flux
        hidden = flux.hidden_size
        self.img_in = nn.Linear(flux.in_channels, hidden)
        self.time_in = MLPEmbedder(dit_layers.TIMESTEP_EMBED_DIM, hidden)
        self.vector_in = MLPEmbedder(flux.vec_in_dim, hidden)
        self.guidance_in = MLPEmbedder(dit_layers.TIMESTEP_EMBED_DIM, hidden) if flux.guidance_embed else None
        self.txt_in = nn.Linear(flux.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, flux.num_heads, flux.mlp_ratio, flux.qkv_bias) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, flux.num_heads, flux.mlp_ratio) for _ in range(config.single_depth))
        self.controlnet_blocks = nn.ModuleList(_zero(nn.Linear(hidden, hidden)) for _ in range(config.depth))
        self.controlnet_blocks_for_single = nn.ModuleList(
            _zero(nn.Linear(hidden, hidden)) for _ in range(config.single_depth))
        self.pos_embed_input = nn.Linear(flux.in_channels, hidden)
        self.input_hint_block = input_hint_block()
        self._init_memory_options()

    @classmethod
    def from_flux(cls, flux: Flux, depth: int = DEFAULT_DEPTH, single_depth: int = DEFAULT_SINGLE_DEPTH,
                  dtype: torch.dtype = torch.float32) -> "ControlNetFlux":
        """A new ControlNet with the DiT's embedders and first blocks copied (in ``dtype``, on the DiT's device)."""
        if depth > flux.config.depth or single_depth > flux.config.depth_single_blocks:
            raise ValueError(f"a ControlNet of {depth} double + {single_depth} single blocks cannot be copied from a "
                             f"DiT of {flux.config.depth} + {flux.config.depth_single_blocks}")
        controlnet = cls(ControlNetFluxConfig(flux.config, depth, single_depth)).to(flux.device)
        own = controlnet.state_dict()
        copied = {k: v for k, v in flux.state_dict().items() if k in own and own[k].shape == v.shape}
        controlnet.load_state_dict(copied, strict=False)
        return controlnet.to(dtype)

    # -- memory options (DiTMemoryMixin): checkpointing only, the ControlNet is small ---------------

    def _block_stacks(self) -> list[tuple[str, nn.ModuleList]]:
        return [("double", self.double_blocks), ("single", self.single_blocks)]

    def _swap_plan(self, num_blocks: int) -> tuple[int, int]:
        return num_blocks, num_blocks  # never allowed: block_swap_limit() is 0 for stacks this small

    def _reference_weight(self) -> torch.Tensor:
        return self.img_in.weight

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, controlnet_cond: torch.Tensor, txt: torch.Tensor,
                txt_ids: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None = None,
                txt_attention_mask: torch.Tensor | None = None
                ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """``(double residuals, single residuals)``, each ``[B, L, hidden]``, for the DiT's inputs of
        :meth:`Flux.forward` and ``controlnet_cond [B, 3, 8h, 8w]`` in [0, 1] (the latent is h x w)."""
        self._begin_forward()
        dtype = img.dtype
        hint = self.input_hint_block(controlnet_cond.to(dtype))
        hint = rearrange(hint, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)
        if hint.shape[1] != img.shape[1]:
            raise ValueError(f"FLUX ControlNet: the conditioning image {tuple(controlnet_cond.shape[-2:])} gives "
                             f"{hint.shape[1]} tokens, the latents {img.shape[1]}: it must be the image's size")
        img = self.img_in(img) + self.pos_embed_input(hint)
        vec = self.time_in(timestep_embedding(timesteps).to(dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("FLUX ControlNet of a dev model: pass guidance [B]")
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt)
        freqs = rope_frequencies(torch.cat((txt_ids, img_ids), dim=1), self.config.flux.axes_dim,
                                 self.config.flux.theta)
        mask = None
        if txt_attention_mask is not None:
            keys = torch.cat((txt_attention_mask.bool(),
                              torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)), dim=1)
            mask = keys[:, None, None, :]

        double = []
        for i, (block, project) in enumerate(zip(self.double_blocks, self.controlnet_blocks)):
            img, txt = self._run_block(i, block, img, txt, vec, freqs, mask)
            double.append(project(img))
        single = []
        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for j, (block, project) in enumerate(zip(self.single_blocks, self.controlnet_blocks_for_single)):
            x = self._run_block(len(self.double_blocks) + j, block, x, vec, freqs, mask)
            single.append(project(x[:, n_txt:]))
        return tuple(double), tuple(single)


def residual_kwargs(controlnet: nn.Module, img: torch.Tensor, img_ids: torch.Tensor, control_image: torch.Tensor,
                    txt: torch.Tensor, txt_ids: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor,
                    guidance: torch.Tensor | None, mask: torch.Tensor | None) -> dict[str, list[torch.Tensor]]:
    """``Flux.forward`` keyword arguments carrying ``controlnet``'s residuals for one call with the DiT's
    inputs (one control image may serve a whole batch, e.g. CFG's two halves)."""
    image = control_image.to(device=img.device, dtype=img.dtype)
    if image.shape[0] != img.shape[0]:
        image = image.expand(img.shape[0], -1, -1, -1)
    double, single = controlnet(img, img_ids, image, txt, txt_ids, timesteps, y, guidance, txt_attention_mask=mask)
    return {"block_controlnet_hidden_states": [r.to(img.dtype) for r in double],
            "block_controlnet_single_hidden_states": [r.to(img.dtype) for r in single]}


def load_flux_controlnet(path: str | os.PathLike, flux: Flux, *, dtype: torch.dtype = torch.float32) -> ControlNetFlux:
    """A ControlNet file (the reference's layout, ``.safetensors`` or ``.ckpt``) for the DiT ``flux``:
    depths from the file, everything else from the DiT; every key must be there with the DiT's shapes
    (``CheckpointError`` naming the file otherwise)."""
    from library.families.dit_loading import build_dit
    from library.families.sd.checkpoint.common import CheckpointError
    from library.families.sd.loading import read_checkpoint

    path = Path(path)
    state_dict = read_checkpoint(path, mmap=False)
    if "input_hint_block.0.weight" not in state_dict or "controlnet_blocks.0.weight" not in state_dict and \
            "controlnet_blocks_for_single.0.weight" not in state_dict:
        raise CheckpointError(f"{path}: not a FLUX ControlNet file (no input_hint_block.* / controlnet_blocks.* "
                              "keys); a Diffusers FluxControlNetModel or an SD ControlNet cannot be used here")
    try:
        config = ControlNetFluxConfig.from_state_dict(state_dict, flux.config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model = build_dit(lambda: ControlNetFlux(config), state_dict, path, name="FLUX ControlNet", dtype=dtype,
                      device="cpu", log=logger)
    logger.info("FLUX ControlNet %s: %d double + %d single blocks", path.name, config.depth, config.single_depth)
    return model
