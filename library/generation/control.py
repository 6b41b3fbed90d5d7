"""ControlNet and ControlNet-LLLite in ``gen_img.py``: which control applies at which step, and how.

Flags (kohya's names): ``--control_net_models`` (ControlNet v1.x for SD 1.x/2.x, or SDXL
ControlNets with ``--sdxl``; loaded by :func:`library.controlnet.loading.load_controlnet`) or
``--control_net_lllite_models`` (SDXL), ``--control_net_preps``, ``--control_net_multipliers``,
``--control_net_ratios`` (one value per model, in the order the models are given; missing values
are ``none`` / 1.0 / 1.0) and ``--guide_image_path`` (:mod:`library.generation.control_images`).
ControlNets and LLLite cannot be combined in one run (as in the reference).

* multiplier: a ControlNet's residuals are scaled by it (diffusers' ``conditioning_scale``); an LLLite
  network's input nudges are. 0 switches the model off.
* ratio: the fraction of the denoising steps, from the first, during which the model applies: at
  step ``i`` of ``n`` it is on when ``i < ratio * n`` (ratio 1: every step, 0.5: the first half,
  0: never). The reference switches off only *after* ``i / n`` exceeds the ratio, one step later.
* several ControlNets: their residuals are added (diffusers' ``MultiControlNetModel`` rule);
  several LLLite networks each nudge their layers.
* hires fix: both passes are controlled (the guide resized to each pass's size), or with
  ``--highres_fix_disable_control_net`` only the first (as in the reference).

Classifier-free guidance batches (``[uncond, cond]``, and ``[uncond, negative, cond]`` with
``--negative_scale``) get the same guide images in every block of rows.

:class:`Controls` is what the generator holds: :meth:`Controls.next_guides` gives each batch its guide
images, :meth:`Controls.pass_for` prepares one denoising pass (guide tensors at the pass size, LLLite
embeddings), :meth:`Controls.on_step` follows ``sample_latents``' steps, and
:meth:`Controls.unet_kwargs` adds the ControlNet residuals to a U-Net call.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from library.generation.control_images import ControlInputError, Prep, guide_tensor, load_guide_images, parse_prep

logger = logging.getLogger(__name__)

__all__ = ["ControlInputError", "ControlNetUnit", "Controls", "LLLiteUnit", "load_controls"]


@dataclass
class ControlNetUnit:
    """One ControlNet (a diffusers ``ControlNetModel``) with its preprocessing, multiplier and ratio."""

    model: Any
    prep: Prep | None = None
    multiplier: float = 1.0
    ratio: float = 1.0
    name: str = "controlnet"
    active: bool = True
    hint: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class LLLiteUnit:
    """One ControlNet-LLLite network, hooked into the U-Net (``networks.control_net_lllite``)."""

    network: Any
    prep: Prep | None = None
    multiplier: float = 1.0
    ratio: float = 1.0
    name: str = "lllite"
    active: bool = True

    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the deepest level the network embeds for is 8 * 2**(depth-1)
        pixels per token (32 on SDXL)."""
        return 8 * 2 ** (max(m.depth for m in self.network.unet_modules) - 1)


def _applies(index: int, total: int, unit) -> bool:
    return unit.multiplier != 0.0 and index < unit.ratio * total


class Controls:
    """The control models of a run and their guide images (rules in the module docstring)."""

    def __init__(self, controlnets: Sequence[ControlNetUnit] = (), lllites: Sequence[LLLiteUnit] = (),
                 guides: Sequence[Image.Image] = ()) -> None:
        self.controlnets = list(controlnets)
        self.lllites = list(lllites)
        self.guides = list(guides)
        if (self.controlnets or self.lllites) and not self.guides:
            raise ControlInputError("control models need guide images: add --guide_image_path FILE_OR_FOLDER")
        self._next = 0

    @property
    def enabled(self) -> bool:
        return bool(self.controlnets or self.lllites)

    def to(self, device, dtype) -> None:
        for unit in self.controlnets:
            unit.model.to(device=device, dtype=dtype)
        for unit in self.lllites:
            unit.network.to(device=device, dtype=dtype)

    def next_guides(self, count: int) -> list[Image.Image] | None:
        """The guide images of the next ``count`` generated images (None without control models)."""
        if not self.enabled:
            return None
        picked = [self.guides[(self._next + k) % len(self.guides)] for k in range(count)]
        self._next += count
        return picked

    @contextlib.contextmanager
    def pass_for(self, guides: Sequence[Image.Image] | None, width: int, height: int, device: torch.device,
                 dtype: torch.dtype, *, control: bool = True) -> Iterator[None]:
        """One denoising pass at ``width`` x ``height``: guide tensors for the ControlNets, control
        image embeddings for the LLLite networks (dropped again afterwards). ``control=False``: a pass
        without them (``--highres_fix_disable_control_net``'s second pass)."""
        if not self.enabled:
            yield
            return
        if not control:
            # No hint: unet_kwargs adds no residuals; no control embedding: the LLLite modules pass
            # their input through (whatever on_step sets their multipliers to).
            for unit in self.controlnets:
                unit.hint = None
            for unit in self.lllites:
                unit.network.set_cond_image(None)
            yield
            return
        if guides is None or not guides:
            raise ControlInputError("a control pass needs guide images (Controls.next_guides)")
        for unit in self.controlnets:
            unit.hint = guide_tensor(guides, width, height, unit.prep).to(device, dtype)
            unit.active = True
        for unit in self.lllites:
            multiple = unit.size_multiple()
            if width % multiple or height % multiple:
                raise ControlInputError(f"ControlNet-LLLite {unit.name}: the image size {width}x{height} must have "
                                        f"sides that are multiples of {multiple} (--W/--H, hires fix first pass)")
            image = guide_tensor(guides, width, height, unit.prep).to(device, dtype)
            with torch.no_grad():
                unit.network.set_cond_image(image)
            unit.network.set_multiplier(unit.multiplier)
            unit.active = True
        try:
            yield
        finally:
            for unit in self.controlnets:
                unit.hint = None
            for unit in self.lllites:
                unit.network.set_cond_image(None)

    def on_step(self, index: int, total: int) -> None:
        """Switch each model on or off for step ``index`` of ``total`` (its ratio)."""
        for unit in self.controlnets:
            unit.active = _applies(index, total, unit)
        for unit in self.lllites:
            active = _applies(index, total, unit)
            if active != unit.active:
                unit.network.set_multiplier(unit.multiplier if active else 0.0)
                unit.active = active

    def unet_kwargs(self, sample: torch.Tensor, timestep: torch.Tensor, hidden_states: torch.Tensor,
                    unet_kwargs: dict[str, Any]) -> dict[str, Any]:
        """``down_block_additional_residuals`` / ``mid_block_additional_residual`` of the active
        ControlNets for one U-Net call (empty when none is active)."""
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for unit in self.controlnets:
            if not unit.active or unit.hint is None:
                continue
            repeat = sample.shape[0] // unit.hint.shape[0]
            hint = unit.hint.repeat(repeat, 1, 1, 1) if repeat > 1 else unit.hint
            unit_down, unit_mid = unit.model(sample, timestep, encoder_hidden_states=hidden_states, controlnet_cond=hint,
                                             conditioning_scale=unit.multiplier,
                                             added_cond_kwargs=unet_kwargs.get("added_cond_kwargs"), return_dict=False)
            if down is None:
                down, mid = list(unit_down), unit_mid
            else:
                down = [a + b for a, b in zip(down, unit_down, strict=True)]
                mid = mid + unit_mid
        if down is None:
            return {}
        return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}


def _per_model(values: Sequence | None, count: int, flag: str, default):
    values = list(values or [])
    if len(values) > count:
        raise ControlInputError(f"--{flag} has {len(values)} values but only {count} control model(s) are given: "
                                "give one value per model")
    return values + [default] * (count - len(values))


def load_controls(args, *, unet, sdxl: bool) -> Controls:
    """The control models named by ``args``, hooked into / bound to ``unet`` (on the CPU, float32)."""
    controlnet_paths = list(getattr(args, "control_net_models", None) or [])
    lllite_paths = list(getattr(args, "control_net_lllite_models", None) or [])
    if controlnet_paths and lllite_paths:
        raise ControlInputError("--control_net_models and --control_net_lllite_models cannot be used together: "
                                "pick one kind of control")
    paths = controlnet_paths or lllite_paths
    if not paths:
        for flag in ("control_net_preps", "control_net_multipliers", "control_net_ratios", "guide_image_path",
                     "highres_fix_disable_control_net"):
            if getattr(args, flag, None):
                logger.warning("--%s is ignored without --control_net_models or --control_net_lllite_models", flag)
        return Controls()
    preps = [parse_prep(p) for p in _per_model(getattr(args, "control_net_preps", None), len(paths),
                                               "control_net_preps", None)]
    multipliers = _per_model(getattr(args, "control_net_multipliers", None), len(paths), "control_net_multipliers", 1.0)
    ratios = _per_model(getattr(args, "control_net_ratios", None), len(paths), "control_net_ratios", 1.0)
    for ratio in ratios:
        if not 0.0 <= ratio <= 1.0:
            raise ControlInputError(f"--control_net_ratios {ratio}: a ratio is the fraction of the steps with control, "
                                    "between 0 and 1")
    guides = load_guide_images(getattr(args, "guide_image_path", None))
    if not guides:
        raise ControlInputError("control models need guide images: add --guide_image_path FILE_OR_FOLDER")
    if lllite_paths:
        if not sdxl:
            raise ControlInputError("--control_net_lllite_models: ControlNet-LLLite is for SDXL models; add --sdxl")
        from networks.control_net_lllite import LLLiteError, create_network_from_weights

        units = []
        for path, prep, mult, ratio in zip(lllite_paths, preps, multipliers, ratios):
            try:
                network = create_network_from_weights(unet, path, multiplier=mult)
            except (LLLiteError, FileNotFoundError) as e:
                raise ControlInputError(f"--control_net_lllite_models {path}: {e}") from None
            network.apply_to()
            network.eval().requires_grad_(False)
            units.append(LLLiteUnit(network, prep, mult, ratio, name=str(path)))
            logger.info("ControlNet-LLLite %s: multiplier %g, ratio %g", path, mult, ratio)
        return Controls(lllites=units, guides=guides)

    from library.controlnet.loading import load_controlnet

    units = []
    for path, prep, mult, ratio in zip(controlnet_paths, preps, multipliers, ratios):
        try:
            model = load_controlnet(path, unet)
        except (FileNotFoundError, OSError, ValueError) as e:
            raise ControlInputError(f"--control_net_models {path}: {e}") from None
        model.eval().requires_grad_(False)
        units.append(ControlNetUnit(model, prep, mult, ratio, name=str(path)))
        logger.info("ControlNet %s: multiplier %g, ratio %g", path, mult, ratio)
    return Controls(controlnets=units, guides=guides)
