"""The accelerate set-up of a training run: precision, trackers, distributed options."""

from __future__ import annotations

import datetime
import importlib.util
import logging
import os
import time
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import (DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs,
                              ProjectConfiguration)

logger = logging.getLogger(__name__)


def make_accelerator(args) -> Accelerator:
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and not torch.cuda.is_available():
        from library.args import ArgumentError

        raise ArgumentError("FSDP (accelerate launch --use_fsdp) needs GPUs and none is visible; on the CPU start "
                            "plain data-parallel processes with accelerate launch --multi_gpu --num_processes N")
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
        cpu=_cpu_processes(),
        deepspeed_plugin=deepspeed_plugin(args),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if log_with is None else (["tensorboard", "wandb"] if log_with == "all" else log_with),
        project_config=project_config,
        kwargs_handlers=handlers or None,
    )


def deepspeed_plugin(args):
    """accelerate's DeepSpeed plug-in for ``--deepspeed`` (None without the flag).

    The flag fails here, before any model is loaded, when the optional package is missing.
    """
    if not getattr(args, "deepspeed", False):
        return None
    from library.args import ArgumentError

    if importlib.util.find_spec("deepspeed") is None:
        raise ArgumentError("--deepspeed needs the optional deepspeed package, which is not installed: "
                            "pip install deepspeed (or drop --deepspeed)")
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(
        zero_stage=args.zero_stage, gradient_accumulation_steps=args.gradient_accumulation_steps,
        gradient_clipping=args.max_grad_norm or None,
        offload_optimizer_device=args.offload_optimizer_device, offload_optimizer_nvme_path=args.offload_optimizer_nvme_path,
        offload_param_device=args.offload_param_device, offload_param_nvme_path=args.offload_param_nvme_path,
        zero3_init_flag=args.zero3_init_flag, zero3_save_16bit_model=args.zero3_save_16bit_model)
    if args.mixed_precision == "fp16":
        plugin.deepspeed_config["fp16"]["initial_scale_power"] = 0  # the loss scale starts at 1, as the reference
    if args.fp16_master_weights_and_gradients:
        plugin.deepspeed_config["fp16_master_weights_and_gradients"] = True
    return plugin


def prepare_trained(accelerator: Accelerator, modules: list[torch.nn.Module], *others):
    """``accelerator.prepare`` the trained modules with the optimizer, data loader, scheduler.

    Returns ``(prepared modules, prepared others)``. DeepSpeed's engine wraps exactly one model:
    several trained modules (a U-Net and text encoders) go in as one container, and the target
    keeps calling its own modules, whose parameters the engine now owns.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED and len(modules) > 1:
        _, *rest = accelerator.prepare(torch.nn.ModuleList(modules), *others)
        return list(modules), rest
    prepared = accelerator.prepare(*modules, *others)
    if not isinstance(prepared, tuple):
        prepared = (prepared,)
    return list(prepared[:len(modules)]), list(prepared[len(modules):])


def _cpu_processes() -> bool:
    """True when several processes were launched on a machine without a GPU.

    accelerate joins such processes into one gloo group only when asked for the CPU; otherwise
    each process would train alone on the whole dataset and they would all write the same files.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        return False
    if world_size > 1:
        return True
    if "MASTER_ADDR" in os.environ and "LOCAL_RANK" not in os.environ:
        # `accelerate launch --num_processes N` starts one process when there is no GPU to spread over
        logger.warning("accelerate launch started a single process: on a machine without GPUs start several "
                       "CPU processes with `accelerate launch --multi_gpu --num_processes N` (torchrun, gloo)")
    return False


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
