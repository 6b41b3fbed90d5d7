"""Extract a LoRA from a fine-tuned model: the truncated SVD of (tuned − original), layer by layer.

    python networks/extract_lora_from_models.py --model_org base.safetensors \
        --model_tuned tuned.safetensors --save_to extracted.safetensors --dim 8 [--conv_dim 4] [--sdxl | --v2]

Same flags as kohya-ss/sd-scripts' ``networks/extract_lora_from_models.py`` (docs/lora_tools.md).
The layers, and their names in the file, are those ``networks.lora.create_network`` adapts on the
original model (attention and feed-forward layers of the U-Net and the text encoder(s); with
``--conv_dim`` also the ResNet blocks and down/upsamplers). For each, ``D = W_tuned − W_org`` and
``up @ down`` is its best rank-``dim`` approximation (rank ``conv_dim`` for 3x3 convs;
``sqrt(S)`` in each factor), written with ``alpha = rank``, so the LoRA's update is exactly the
truncated SVD of ``D`` (before ``--clamp_quantile`` clips outliers of the factors). Layers whose
largest ``|D|`` is below ``--min_diff`` get no module; when that is every text-encoder layer, the
LoRA has no text-encoder part.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from library.args import add_logging_arguments  # noqa: E402  (no torch: --help stays instant)
from library.log import setup_logging  # noqa: E402

if TYPE_CHECKING:
    import torch
    from torch import nn

    from networks.lora_file import LoRAWeights

logger = logging.getLogger(__name__)

PRECISIONS = ("float", "fp16", "bf16")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Extract a LoRA as the SVD of the difference of two models.")
    parser.add_argument("--v2", action="store_true", help="the models are Stable Diffusion 2.x")
    parser.add_argument("--v_parameterization", action="store_true",
                        help="the tuned model predicts v (written to the metadata only)")
    parser.add_argument("--sdxl", action="store_true", help="the models are SDXL")
    parser.add_argument("--load_precision", type=str, default="float", choices=PRECISIONS,
                        help="dtype the models are loaded in (default float)")
    parser.add_argument("--save_precision", type=str, default="float", choices=PRECISIONS,
                        help="dtype of the saved LoRA (default float)")
    parser.add_argument("--model_org", type=str, required=True,
                        help="original model: .safetensors/.ckpt single file or Diffusers folder")
    parser.add_argument("--model_tuned", type=str, required=True,
                        help="tuned model (same architecture): the LoRA is (tuned - original)")
    parser.add_argument("--save_to", type=str, required=True, help="output LoRA (.safetensors, or .pt/.ckpt)")
    parser.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    parser.add_argument("--conv_dim", type=int, default=None,
                        help="rank of the 3x3-conv modules (ResNet blocks, down/upsamplers); default: none extracted")
    parser.add_argument("--device", type=str, default=None, help="device for the SVD, e.g. cuda (default cpu)")
    parser.add_argument("--clamp_quantile", type=float, default=0.99,
                        help="clamp the factors to this quantile of their absolute values (1.0: no clamping); "
                             "default 0.99")
    parser.add_argument("--min_diff", type=float, default=0.01,
                        help="layers whose largest absolute difference is below this get no module; default 0.01")
    parser.add_argument("--no_metadata", action="store_true",
                        help="write only the minimal ss_* metadata (no modelspec.*)")
    parser.add_argument("--load_original_model_to", type=str, default=None,
                        help="device the original model is loaded to (default cpu)")
    parser.add_argument("--load_tuned_model_to", type=str, default=None,
                        help="device the tuned model is loaded to (default cpu)")
    add_logging_arguments(parser)
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` for flag values that cannot work."""
    if args.sdxl and args.v2:
        raise ValueError("--sdxl and --v2 exclude each other")
    if args.dim < 1:
        raise ValueError(f"--dim must be at least 1, got {args.dim}")
    if args.conv_dim is not None and args.conv_dim < 1:
        raise ValueError(f"--conv_dim must be at least 1 (leave it out for no conv modules), got {args.conv_dim}")
    if not 0 < args.clamp_quantile <= 1:
        raise ValueError(f"--clamp_quantile must be in (0, 1], got {args.clamp_quantile}")
    if args.min_diff < 0:
        raise ValueError(f"--min_diff must be >= 0, got {args.min_diff}")


def _dtype(precision: str | None) -> "torch.dtype":
    import torch

    return {None: torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


# --- models and layers ---------------------------------------------------------------------------

def load_models(path: str, *, sdxl: bool, v2: bool, dtype: "torch.dtype", device: str
                ) -> tuple["nn.Module | list[nn.Module]", "nn.Module"]:
    """``(text encoder or [te1, te2], U-Net)`` of a checkpoint, loaded with the family's loader."""
    if sdxl:
        from library.families.sdxl.loading import load_sdxl_models

        models = load_sdxl_models(path, dtype=dtype, device=device, keep_extras=False)
        return [models.text_encoder1, models.text_encoder2], models.unet
    from library.families.sd.loading import load_sd_models

    models = load_sd_models(path, v2=v2, dtype=dtype, device=device)
    return models.text_encoder, models.unet


def adapted_layers(text_encoder, unet, conv_dim: int | None) -> dict[str, tuple["nn.Module", bool]]:
    """``{lora_name: (layer, is_text_encoder)}`` for every layer a LoRA of these models adapts.

    The names and the set of layers are ``networks.lora.create_network``'s (so a file extracted
    here loads wherever a trained LoRA does); the network itself is thrown away.
    """
    from networks.lora import create_network

    kwargs = {"conv_dim": conv_dim, "conv_alpha": conv_dim} if conv_dim else {}
    network = create_network(1.0, 1, 1.0, None, text_encoder, unet, **kwargs)
    layers = {lora.lora_name: (lora.org_module, True) for lora in network.text_encoder_loras}
    layers.update({lora.lora_name: (lora.org_module, False) for lora in network.unet_loras})
    return layers


def extract_modules(org_layers: dict[str, tuple["nn.Module", bool]], tuned_layers: dict[str, tuple["nn.Module", bool]],
                    *, dim: int, conv_dim: int | None, clamp_quantile: float | None, min_diff: float,
                    device: "torch.device | str" = "cpu", progress: bool = True) -> dict[str, "LoRAWeights"]:
    """The LoRA modules of ``tuned − org`` (CPU, float32), layers below ``min_diff`` left out."""
    import torch
    from tqdm import tqdm

    from networks.lora_file import LoRAWeights, low_rank

    missing = sorted(org_layers.keys() ^ tuned_layers.keys())
    if missing:
        raise ValueError(f"the models differ in architecture: {len(missing)} layers are in only one of them, e.g. "
                         f"{', '.join(missing[:3])}")
    quantile = None if clamp_quantile is None or clamp_quantile >= 1 else clamp_quantile
    modules: dict[str, LoRAWeights] = {}
    skipped = {True: 0, False: 0}
    with torch.no_grad():
        for name, (layer, is_te) in tqdm(org_layers.items(), desc="extracting", unit="module", disable=not progress):
            w_org, w_tuned = layer.weight, tuned_layers[name][0].weight
            if w_org.shape != w_tuned.shape:
                raise ValueError(f"{name}: the models differ in architecture (weight {tuple(w_org.shape)} vs "
                                 f"{tuple(w_tuned.shape)})")
            diff = w_tuned.to(device=device, dtype=torch.float32) - w_org.to(device=device, dtype=torch.float32)
            if float(diff.abs().max()) < min_diff:
                skipped[is_te] += 1
                continue
            spatial = diff.ndim == 4 and tuple(diff.shape[2:]) != (1, 1)
            if spatial and not conv_dim:
                continue  # create_network plans 3x3 convs only with conv_dim; kept as a guard
            up, down, _ = low_rank(diff, conv_dim if spatial else dim, clamp_quantile=quantile)
            # alpha = rank (scale 1): the update is exactly up @ down, also where the layer is
            # smaller than the rank asked for and low_rank capped it
            modules[name] = LoRAWeights(name, down.float().cpu(), up.float().cpu(), float(down.shape[0]))
    te_total = sum(1 for _, is_te in org_layers.values() if is_te)
    if te_total and skipped[True] == te_total:
        logger.info("text encoder: no layer differs by %g or more; the LoRA has no text-encoder part", min_diff)
    elif skipped[True]:
        logger.info("text encoder: %d of %d layers differ by less than %g and are left out", skipped[True], te_total,
                    min_diff)
    if skipped[False]:
        logger.info("U-Net: %d of %d layers differ by less than %g and are left out", skipped[False],
                    len(org_layers) - te_total, min_diff)
    return modules


# --- metadata --------------------------------------------------------------------------------------

def extraction_metadata(args: argparse.Namespace, timestamp: float | None = None) -> dict[str, str]:
    """The ``ss_*`` keys a trained LoRA of the family carries that apply here, and ``modelspec.*``
    (only the minimal ``ss_*`` set with ``--no_metadata``)."""
    from library.families.sd.family import StableDiffusionFamily
    from library.families.sdxl.family import SDXLFamily
    from library.training.metadata import MINIMAL_KEYS

    family = SDXLFamily() if args.sdxl else StableDiffusionFamily()
    spec_args = argparse.Namespace(
        v2=bool(args.v2) and not args.sdxl, v_parameterization=bool(args.v_parameterization), resolution=None,
        clip_skip=None, output_name=None, metadata_title=Path(args.save_to).stem,
    )
    md = dict(family.metadata(spec_args))
    md["ss_network_module"] = "networks.lora"
    md["ss_network_dim"] = str(args.dim)
    md["ss_network_alpha"] = str(float(args.dim))
    if args.conv_dim:
        md["ss_network_args"] = json.dumps({"conv_dim": str(args.conv_dim), "conv_alpha": str(float(args.conv_dim))})
    if args.no_metadata:
        return {k: v for k, v in md.items() if k in MINIMAL_KEYS}
    md["ss_training_comment"] = (f"extracted from {os.path.basename(os.path.normpath(args.model_tuned))} "
                                 f"minus {os.path.basename(os.path.normpath(args.model_org))}")
    md.update(family.modelspec(spec_args, time.time() if timestamp is None else timestamp))
    return md


# --- the tool -------------------------------------------------------------------------------------

def extract_lora(args: argparse.Namespace) -> dict[str, "LoRAWeights"]:
    """Extract and save the LoRA the flags describe; returns its modules."""
    from networks.lora_file import modules_to_state_dict, write_lora

    validate_args(args)
    for path in (args.model_org, args.model_tuned):
        if not os.path.exists(path):
            raise FileNotFoundError(f"model not found: {path}")
    load_dtype = _dtype(args.load_precision)
    logger.info("loading the original model %s", args.model_org)
    te_org, unet_org = load_models(args.model_org, sdxl=args.sdxl, v2=args.v2, dtype=load_dtype,
                                   device=args.load_original_model_to or "cpu")
    logger.info("loading the tuned model %s", args.model_tuned)
    te_tuned, unet_tuned = load_models(args.model_tuned, sdxl=args.sdxl, v2=args.v2, dtype=load_dtype,
                                       device=args.load_tuned_model_to or "cpu")
    modules = extract_modules(adapted_layers(te_org, unet_org, args.conv_dim),
                              adapted_layers(te_tuned, unet_tuned, args.conv_dim), dim=args.dim,
                              conv_dim=args.conv_dim, clamp_quantile=args.clamp_quantile, min_diff=args.min_diff,
                              device=args.device or "cpu")
    if not modules:
        raise ValueError(f"no layer differs by --min_diff {args.min_diff} or more: the models are the same "
                         f"(or lower --min_diff)")
    n_te = sum(1 for name in modules if name.startswith("lora_te"))
    logger.info("%d modules: %d text encoder, %d U-Net", len(modules), n_te, len(modules) - n_te)
    write_lora(args.save_to, modules_to_state_dict(modules, _dtype(args.save_precision)), extraction_metadata(args),
               inputs=(args.model_org, args.model_tuned))
    logger.info("saved %s", args.save_to)
    return modules


def main(argv: Sequence[str] | None = None) -> None:
    parser = setup_parser()
    args = parser.parse_args(argv)
    setup_logging(args)
    try:
        validate_args(args)
    except ValueError as e:
        parser.error(str(e))
    from library.families.script_hints import running_tool
    from library.families.sd.checkpoint import CheckpointError
    from library.io_utils import WriteError
    from networks.lora_file import LoRAFileError

    try:
        with running_tool("extract"):  # a model of the other family: the fix is --sdxl, not another script
            extract_lora(args)
    except (FileNotFoundError, CheckpointError, LoRAFileError, ValueError, WriteError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
