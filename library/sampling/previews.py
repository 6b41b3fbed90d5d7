"""Preview images during training: when to sample, and writing the images without side effects.

Contract
--------
* :func:`should_sample` decides whether a training event produces previews
  (``--sample_every_n_steps``, ``--sample_every_n_epochs``, ``--sample_at_first``).
* :func:`write_sample_images` generates one image per prompt and writes
  ``<output_dir>/sample/<output_name>_<e{epoch:06d} | {step:06d}>_<index:02d>_<YYYYmmddHHMMSS>_<seed>.png``
  atomically, with the generation settings as PNG text chunks. A prompt without a seed gets a
  fresh random one, which is written in the name and the metadata so the image can be reproduced.
  Training is not disturbed: the Python, NumPy, torch CPU and accelerator RNG states are restored
  afterwards (even on error), and the caller's ``eval_context`` (e.g. :func:`eval_mode`) puts the
  models in eval mode for the duration and restores their previous modes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Callable, ContextManager, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..io_utils import atomic_path
from .prompts import SamplePrompt

logger = logging.getLogger(__name__)

__all__ = [
    "GenerateFn",
    "WrittenSample",
    "eval_mode",
    "preserved_rng_state",
    "sample_image_name",
    "should_sample",
    "write_sample_images",
]

#: ``generate(prompt_with_seed, generator) -> image``; the generator is a seeded CPU generator.
GenerateFn = Callable[[SamplePrompt, torch.Generator], Image.Image]


class WrittenSample(NamedTuple):
    """One preview written to disk (``prompt.seed`` is the seed actually used)."""

    prompt: SamplePrompt
    path: Path


def should_sample(
    step: int,
    epoch: int | None,
    *,
    every_n_steps: int | None,
    every_n_epochs: int | None,
    at_first: bool,
    is_epoch_end: bool,
) -> bool:
    """Whether previews are due at this training event.

    Call with ``step`` = global optimizer steps done and ``is_epoch_end=False`` before training
    (step 0) and after each optimizer step, and with ``is_epoch_end=True`` and the 1-based number
    of the finished ``epoch`` at each epoch end. Rules: step 0 samples only with ``at_first``;
    when ``every_n_epochs`` is set it wins and step-based sampling is off; otherwise every
    ``every_n_steps`` steps. Unset or 0 intervals disable that trigger.
    """
    if is_epoch_end:
        return bool(every_n_epochs) and epoch is not None and epoch >= 1 and epoch % every_n_epochs == 0
    if step == 0:
        return at_first
    if every_n_epochs:
        return False
    return bool(every_n_steps) and step % every_n_steps == 0


def sample_image_name(output_name: str | None, *, step: int, epoch: int | None, index: int, seed: int,
                      timestamp: str) -> str:
    """The preview file name: epoch form (``e000003``) when ``epoch`` is given, else step form
    (``000150``). Without an ``output_name`` the name starts at the step/epoch part."""
    when = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    prefix = f"{output_name}_" if output_name else ""
    return f"{prefix}{when}_{index:02d}_{timestamp}_{seed}.png"


@contextlib.contextmanager
def preserved_rng_state(device: torch.device | str | None = None) -> Iterator[None]:
    """Restore Python ``random``, NumPy, torch CPU, all CUDA devices' and ``device``'s RNG on exit.

    Sampling reseeds the global generators; without this, the training run after the first
    preview would follow a different random sequence than a run without previews.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    # Other accelerators (mps, xpu, ...) expose the same get/set_rng_state pair on torch.<type>.
    device_type = torch.device(device).type if device is not None else "cpu"
    other = getattr(torch, device_type, None) if device_type not in ("cpu", "cuda") else None
    other_state = other.get_rng_state() if other is not None and hasattr(other, "get_rng_state") else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if other_state is not None:
            other.set_rng_state(other_state)


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Put ``modules`` in eval mode; on exit restore every submodule's own previous mode.

    Per-submodule, because a training wrapper can hold frozen parts that stay in eval mode;
    a plain ``.train()`` on exit would switch those to train mode (dropout on).
    """
    tops = [m for m in modules if m is not None]
    saved = [(sub, sub.training) for m in tops for sub in m.modules()]
    top_modes = [m.training for m in tops]
    try:
        for m in tops:
            m.eval()
        yield
    finally:
        for m, training in zip(tops, top_modes):
            m.train(training)  # through .train() so modules that override it see the switch back
        for sub, training in saved:
            sub.training = training  # then the submodules whose own mode differed


def _png_info(prompt: SamplePrompt) -> PngInfo:
    info = PngInfo()
    fields = {
        "prompt": prompt.prompt,
        "negative-prompt": prompt.negative_prompt,
        "seed": prompt.seed,
        "steps": prompt.steps,
        "scale": prompt.scale,
        "sampler": prompt.sampler,
        "width": prompt.width,
        "height": prompt.height,
        "guidance-scale": prompt.guidance_scale,
        "controlnet-image": prompt.controlnet_image,
    }
    for key, value in fields.items():
        if value is not None:
            info.add_text(key, str(value))  # tEXt; Pillow switches to UTF-8 iTXt for non-Latin-1 text
    return info


def write_sample_images(
    prompts: Sequence[SamplePrompt],
    generate: GenerateFn,
    *,
    output_dir: str | Path,
    output_name: str | None,
    step: int,
    epoch: int | None = None,
    device: torch.device | str | None = None,
    eval_context: ContextManager | None = None,
    process_index: int = 0,
    num_processes: int = 1,
) -> list[WrittenSample]:
    """Generate and write this process's share of ``prompts`` (``index % num_processes ==
    process_index``); return what was written, in prompt order.

    ``epoch`` selects the epoch form of the file name (pass it for epoch-end previews, ``None``
    for step previews). For each prompt the global torch RNG is seeded with the prompt's seed and
    ``generate`` gets a CPU generator seeded the same way. ``eval_context`` is entered around the
    whole batch (use :func:`eval_mode` and, e.g., a ScheduleFree optimizer's eval/train swap).
    ``device`` is the training device, whose RNG state is saved and restored besides CPU and CUDA.
    """
    mine = [p for i, p in enumerate(prompts) if i % num_processes == process_index]
    if not mine:
        return []
    sample_dir = Path(output_dir) / "sample"
    when = f"epoch {epoch}" if epoch is not None else f"step {step}"
    logger.info("generating %d sample image(s) at %s", len(mine), when)
    written: list[WrittenSample] = []
    # SystemRandom: a seed for seedless prompts that neither reads nor advances the global RNGs.
    seed_source = random.SystemRandom()
    with preserved_rng_state(device), (eval_context or contextlib.nullcontext()):
        for prompt in mine:
            seed = prompt.seed if prompt.seed is not None else seed_source.randrange(2**32)
            prompt = dataclasses.replace(prompt, seed=seed)
            torch.manual_seed(seed)  # for any module that draws from the global RNG
            generator = torch.Generator("cpu").manual_seed(seed)
            image = generate(prompt, generator)
            name = sample_image_name(output_name, step=step, epoch=epoch, index=prompt.index, seed=seed,
                                     timestamp=time.strftime("%Y%m%d%H%M%S"))
            path = sample_dir / name
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG", pnginfo=_png_info(prompt))
            logger.info("sample %02d (seed %d, %dx%d, %d steps, scale %g): %s -> %s", prompt.index, seed,
                        prompt.width, prompt.height, prompt.steps, prompt.scale, _shorten(prompt.prompt), path)
            written.append(WrittenSample(prompt, path))
    return written


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
