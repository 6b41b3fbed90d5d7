"""``tools/merge_models.py``: the weighted sum of several full checkpoints, one tensor at a time.

For every tensor the files share, ``out = Σ_i ratio_i · W_i`` (computed in ``--precision`` on
``--device``, in the order the files are given, written in ``--saving_precision``). The ratios
are used as given (default ``1/N`` each, a plain average); they are not normalised, so ratios that
do not sum to 1 scale the weights (logged as a warning). Tensors not in every file, non-floating
tensors (``position_ids``) and, with ``--unet_only``, everything outside the denoiser are copied
from the first file; ``--show_skipped`` lists them.

Only headers are read before merging: files of different model families, or a shared tensor with
different shapes in two files, are refused before anything is written. Reading and writing go
tensor by tensor (:mod:`library.model_tools.tensor_files`), so memory holds two tensors at a time,
not N models; the output appears only when complete.
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from library.model_tools.checkpoints import DENOISER_PREFIX, KIND_NAMES, ModelToolError, kind_of_keys, with_article
from library.model_tools.tensor_files import SafetensorsWriter, TensorFile, TensorInfo, open_tensor_file

logger = logging.getLogger(__name__)

PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class MergePlan:
    """What happens to each tensor of the first file: merged, or copied from it (with why)."""

    layout: list[TensorInfo]  # the output tensors, in the first file's order
    merged: set[str]
    skipped: dict[str, str]  # name -> reason it is copied from the first file
    dropped: list[str]  # tensors of other files the first file does not have


def resolve_ratios(count: int, ratios: Sequence[float] | None) -> list[float]:
    if not ratios:
        return [1.0 / count] * count
    if len(ratios) != count:
        raise ModelToolError(f"--ratios has {len(ratios)} values but --models names {count} files; give one ratio "
                             f"per model (or none for the plain average)")
    return [float(r) for r in ratios]


def _check_families(files: Sequence[TensorFile]) -> str:
    kinds = [kind_of_keys(f.keys()) for f in files]
    for f, kind in zip(files, kinds):
        if kind == "lora":
            raise ModelToolError(f"{f.path} is a LoRA/network file, not a full model: merge LoRAs with "
                                 f"networks/merge_lora.py, sdxl_merge_lora.py or svd_merge_lora.py")
    first = kinds[0]
    for f, kind in zip(files[1:], kinds[1:]):
        if kind != first:
            raise ModelToolError(f"{f.path} is {with_article(kind)} but {files[0].path} is {with_article(first)}: "
                                 f"only models of the same architecture can be merged")
    return first


def plan_merge(files: Sequence[TensorFile], *, unet_only: bool, save_dtype: torch.dtype) -> MergePlan:
    """Decide, from the headers only, what is merged and what is copied; refuse mismatched files."""
    kind = _check_families(files)
    first = files[0]
    keys = first.keys()
    has_prefix = any(k.startswith(DENOISER_PREFIX) for k in keys)
    if unet_only and not has_prefix:
        logger.info("%s has no '%s' keys (a denoiser-only file): --unet_only merges every tensor", first.path.name,
                    DENOISER_PREFIX)
    merged: set[str] = set()
    skipped: dict[str, str] = {}
    layout: list[TensorInfo] = []
    for info in first.infos():
        name = info.name
        others = [f for f in files[1:] if name in f]
        for f in others:
            other = f.info(name)
            if other.shape != info.shape:
                raise ModelToolError(f"{name} has shape {list(other.shape)} in {f.path} but {list(info.shape)} in "
                                     f"{first.path}: the models are different architectures (or variants, e.g. "
                                     f"SD 2.x 512 vs 768 heads, inpainting vs base) and cannot be merged")
        if len(others) != len(files) - 1:
            missing = [str(f.path.name) for f in files[1:] if name not in f]
            skipped[name] = f"not in {', '.join(missing)}"
        elif not info.dtype.is_floating_point or any(not f.info(name).dtype.is_floating_point for f in others):
            skipped[name] = f"not a floating tensor ({str(info.dtype).replace('torch.', '')})"
        elif unet_only and has_prefix and not name.startswith(DENOISER_PREFIX):
            skipped[name] = "not in the U-Net (--unet_only)"
        else:
            merged.add(name)
        dtype = save_dtype if info.dtype.is_floating_point else info.dtype
        layout.append(TensorInfo(name, dtype, info.shape))
    own = set(keys)
    dropped = sorted({k for f in files[1:] for k in f.keys() if k not in own})
    if not merged:
        raise ModelToolError(f"the models share no floating tensor to merge ({KIND_NAMES.get(kind, kind)} files)")
    return MergePlan(layout, merged, skipped, dropped)


def merge_models(models: Sequence[str], output: str, *, ratios: Sequence[float] | None = None,
                 unet_only: bool = False, device: str = "cpu", precision: str = "float",
                 saving_precision: str = "float", show_skipped: bool = False) -> None:
    if len(models) < 2:
        raise ModelToolError("--models needs at least two checkpoints to merge")
    out = Path(output)
    if out.suffix.lower() not in (".safetensors", ".ckpt", ".pt"):
        raise ModelToolError(f"--output {output}: give a .safetensors (or .ckpt) file name")
    for source in models:
        if not Path(source).is_file():
            raise FileNotFoundError(f"--models {source}: no such file (full checkpoints: .safetensors or .ckpt)")
        if out.exists() and out.resolve() == Path(source).resolve():
            raise ModelToolError(f"--output {output} is one of the input models; choose another output path")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelToolError(f"--device {device}: CUDA is not available here; use --device cpu")
    weights = resolve_ratios(len(models), ratios)
    if not math.isclose(sum(weights), 1.0, rel_tol=0, abs_tol=1e-6):
        logger.warning("the ratios sum to %g, not 1: the merged weights are scaled by that much", sum(weights))
    dtype, save_dtype = PRECISIONS[precision], PRECISIONS[saving_precision]

    with ExitStack() as stack:
        files = [stack.enter_context(open_tensor_file(p)) for p in models]
        plan = plan_merge(files, unet_only=unet_only, save_dtype=save_dtype)
        logger.info("merging %d tensors of %d models (ratios %s); %d copied from %s", len(plan.merged), len(files),
                    ", ".join(f"{w:g}" for w in weights), len(plan.skipped), files[0].path.name)
        if show_skipped:
            for name, why in plan.skipped.items():
                logger.info("skipped %s: %s", name, why)
            for name in plan.dropped:
                logger.info("skipped %s: not in %s (left out)", name, files[0].path.name)
        elif plan.skipped or plan.dropped:
            logger.info("%d tensors copied from the first model, %d left out (--show_skipped lists them)",
                        len(plan.skipped), len(plan.dropped))

        def tensor(info: TensorInfo) -> torch.Tensor:
            if info.name not in plan.merged:
                return files[0].get(info.name).to(info.dtype)
            total = None
            for f, w in zip(files, weights):
                term = f.get(info.name).to(device=device, dtype=dtype) * w
                total = term if total is None else total.add_(term)
            return total.to(device="cpu", dtype=info.dtype)

        bar = tqdm(plan.layout, desc="merging", unit="tensor", disable=None, leave=False)
        if out.suffix.lower() == ".safetensors":
            with SafetensorsWriter(out, plan.layout) as writer:
                for info in bar:
                    writer.write(info.name, tensor(info))
        else:
            from library.io_utils import save_torch

            save_torch({"state_dict": {info.name: tensor(info) for info in bar}}, out)
    logger.info("saved %s (%s)", out, saving_precision)


def run(args) -> None:
    merge_models(args.models, args.output, ratios=args.ratios, unet_only=args.unet_only, device=args.device,
                 precision=args.precision, saving_precision=args.saving_precision, show_skipped=args.show_skipped)
