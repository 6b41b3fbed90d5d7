"""The accelerate set-up of a training run: precision, trackers, distributed options."""

from __future__ import annotations

import datetime
import logging
import os
import time
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

logger = logging.getLogger(__name__)


def make_accelerator(args) -> Accelerator:
    log_with = args.log_with
    if args.logging_dir and log_with is None:
        log_with = "tensorboard"  # --logging_dir alone means TensorBoard, as users expect
    project_config = None
    if args.logging_dir:
        run_dir = os.path.join(args.logging_dir, (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S", time.localtime()))
        project_config = ProjectConfiguration(project_dir=run_dir, logging_dir=run_dir)

    handlers = []
    if args.ddp_timeout:
        handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.ddp_timeout)))
    if args.ddp_gradient_as_bucket_view or args.ddp_static_graph:
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=args.ddp_gradient_as_bucket_view,
                                                      static_graph=args.ddp_static_graph))
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if log_with is None else (["tensorboard", "wandb"] if log_with == "all" else log_with),
        project_config=project_config,
        kwargs_handlers=handlers or None,
    )


def weight_dtypes(args) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype of the frozen base weights, dtype of saved files or None = as trained)."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    save_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(args.save_precision)
    return weight_dtype, save_dtype


def allow_fp16_gradients(accelerator: Accelerator) -> None:
    """With ``--full_fp16`` the trainable weights themselves are fp16; torch's GradScaler refuses
    to unscale fp16 gradients by default, so let it (the loss scale still prevents underflow)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    original = scaler._unscale_grads_

    def unscale(optimizer, inv_scale, found_inf, allow_fp16):  # noqa: ARG001 - signature of torch
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale


def store_in_fp8(model: torch.nn.Module, skip: Callable[[str], bool] | None = None) -> int:
    """Store the weights of ``model``'s Linear and Conv2d layers as float8_e4m3fn (``--fp8_base``).

    Those layers hold nearly all the parameters; under autocast their matmuls/convolutions read the
    fp8 weights in the compute dtype. Norms and embeddings stay in the compute dtype because their
    kernels (group_norm on CPU, embedding lookups) do not accept fp8 parameters. ``skip(path)``
    keeps a layer as it is (T5's ``wo``: transformers casts its input to the weight's dtype).
    Returns the number of layers converted.
    """
    count = 0
    for path, module in model.named_modules():
        if skip is not None and skip(path):
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.to(dtype=torch.float8_e4m3fn)
            count += 1
    return count
