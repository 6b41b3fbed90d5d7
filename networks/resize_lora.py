"""Re-rank a LoRA: the best lower-rank approximation of every module's update, by SVD.

    python networks/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 8
    python networks/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 32 \
        --dynamic_method sv_fro --dynamic_param 0.9 --verbose

Same flags as kohya-ss/sd-scripts' ``networks/resize_lora.py`` (docs/lora_tools.md). For each
module with update ``ΔW = alpha/r · up @ down`` the new factors are the rank-``k`` truncated SVD of
``up @ down`` (singular values split evenly, ``sqrt(S)`` into each factor) and the new alpha is
``alpha/r · k``: the alpha-to-rank scale is kept, so ``new_alpha/k · new_up @ new_down`` is exactly
the truncated SVD of ``ΔW``. ``k`` is ``--new_rank`` (``--new_conv_rank`` for 3x3 convs), or chosen
per module by ``--dynamic_method`` and capped by it; never more than the module's old rank, never
below 1.

The SVD is taken of the factors, not of the full matrix (QR of ``up`` and ``downᵀ``, then the SVD
of the small ``r × r`` core), so it costs ``O((out + in) · r²)`` per module and is exact.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

if __package__ in (None, ""):  # run as a script (python networks/resize_lora.py): make the repo importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from library.args import add_logging_arguments  # noqa: E402  (no torch: --help stays instant)
from library.log import setup_logging  # noqa: E402

if TYPE_CHECKING:
    import torch

    from networks.lora_file import LoRAWeights

logger = logging.getLogger(__name__)

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
PRECISIONS = ("float", "fp16", "bf16")
#: relative slack on the dynamic thresholds, so a singular value equal to the threshold in exact
#: arithmetic is counted whatever the float rounding of the SVD
_THRESHOLD_SLACK = 1e-6


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Resize (re-rank) a LoRA by SVD of each module's update.")
    parser.add_argument("--model", type=str, required=True, help="LoRA to resize (.safetensors, .pt or .ckpt)")
    parser.add_argument("--save_to", type=str, required=True,
                        help="output file (.safetensors keeps the metadata; other extensions are torch files)")
    parser.add_argument("--new_rank", type=int, default=4,
                        help="rank of the output (with --dynamic_method: the largest rank allowed); default 4")
    parser.add_argument("--new_conv_rank", type=int, default=None,
                        help="rank of the 3x3-conv modules (default: --new_rank)")
    parser.add_argument("--save_precision", type=str, default="float", choices=PRECISIONS,
                        help="dtype of the saved weights (default float)")
    parser.add_argument("--device", type=str, default=None, help="device for the SVD, e.g. cuda (default cpu)")
    parser.add_argument("--dynamic_method", type=str, default=None, choices=DYNAMIC_METHODS,
                        help="choose each module's rank from its singular values: sv_ratio (keep S >= max(S)/param), "
                             "sv_fro (smallest rank keeping param of the Frobenius norm), sv_cumulative (smallest "
                             "rank keeping param of the sum of singular values); capped by --new_rank")
    parser.add_argument("--dynamic_param", type=float, default=None,
                        help="the target of --dynamic_method (sv_ratio: >= 1, e.g. 2; sv_fro and sv_cumulative: "
                             "in (0, 1], e.g. 0.9)")
    parser.add_argument("--verbose", action="store_true",
                        help="log each module's new rank, retained norm and singular-value ratio, and a summary")
    add_logging_arguments(parser)
    return parser


# --- rank selection ----------------------------------------------------------------------------

def validate_dynamic(method: str | None, param: float | None) -> None:
    """Raise ``ValueError`` for a dynamic method without a usable parameter."""
    if method is None:
        if param is not None:
            logger.warning("--dynamic_param %s is ignored without --dynamic_method", param)
        return
    if method not in DYNAMIC_METHODS:
        raise ValueError(f"--dynamic_method must be one of {', '.join(DYNAMIC_METHODS)}, got {method!r}")
    if param is None or not math.isfinite(param):
        raise ValueError(f"--dynamic_method {method} needs --dynamic_param")
    if method == "sv_ratio" and param < 1:
        raise ValueError(f"--dynamic_param for sv_ratio is the largest allowed max(S)/S ratio and must be >= 1, "
                         f"got {param}")
    if method in ("sv_fro", "sv_cumulative") and not 0 < param <= 1:
        raise ValueError(f"--dynamic_param for {method} is a fraction in (0, 1], got {param}")


def choose_rank(singular_values: "torch.Tensor", max_rank: int, method: str | None = None,
                param: float | None = None) -> int:
    """The rank to keep for singular values ``S`` (descending), between 1 and ``max_rank``.

    * no method: ``max_rank``;
    * ``sv_ratio``: the number of ``S_i >= S_0 / param``;
    * ``sv_fro``: the smallest ``k`` with ``sqrt(sum_{i<k} S_i²) >= param · sqrt(sum S_i²)`` (the
      kept part holds ``param`` of the Frobenius norm of the update);
    * ``sv_cumulative``: the smallest ``k`` with ``sum_{i<k} S_i >= param · sum S_i``.

    An all-zero update (an untrained module) gets rank 1.
    """
    s = singular_values.double().flatten()
    if max_rank < 1:
        raise ValueError(f"the rank must be at least 1, got {max_rank}")
    if method is None:
        return max(1, min(max_rank, s.numel()))
    if s.numel() == 0 or float(s[0]) <= 0:
        return 1
    slack = 1 - _THRESHOLD_SLACK
    if method == "sv_ratio":
        rank = int((s >= s[0] / param * slack).sum())
    elif method == "sv_fro":
        kept = (s.square().cumsum(0) / s.square().sum()).sqrt()
        rank = int((kept < param * slack).sum()) + 1
    elif method == "sv_cumulative":
        kept = s.cumsum(0) / s.sum()
        rank = int((kept < param * slack).sum()) + 1
    else:
        raise ValueError(f"unknown dynamic method {method!r}; use one of {', '.join(DYNAMIC_METHODS)}")
    return max(1, min(rank, max_rank, s.numel()))


# --- per module --------------------------------------------------------------------------------

def factored_svd(up: "torch.Tensor", down: "torch.Tensor", dtype: "torch.dtype | None" = None
                 ) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """``U, S, Vh`` of ``up @ down`` (flattened to 2-D) without forming the product.

    ``up = Q_u R_u`` and ``downᵀ = Q_d R_d`` (reduced QR), so ``up @ down = Q_u (R_u R_dᵀ) Q_dᵀ``
    and the SVD of the small core gives that of the product. Computed in ``dtype`` (default
    float64; float32 where the device has no float64).
    """
    import torch

    if dtype is None:
        dtype = torch.float32 if up.device.type == "mps" else torch.float64
    a = up.flatten(1).to(dtype)
    b = down.flatten(1).to(dtype)
    q_u, r_u = torch.linalg.qr(a)
    q_d, r_d = torch.linalg.qr(b.T)
    u, s, vh = torch.linalg.svd(r_u @ r_d.T, full_matrices=False)
    return q_u @ u, s, vh @ q_d.T


@dataclass
class ResizeStats:
    """What resizing did to one module (``verbose`` logs these)."""

    name: str
    old_rank: int
    new_rank: int
    old_alpha: float
    new_alpha: float
    sum_retained: float  # sum of kept singular values / sum of all
    fro_retained: float  # Frobenius norm of the kept part / of the whole update
    max_ratio: float  # largest / smallest kept singular value
    spatial_conv: bool


def resize_module(module: "LoRAWeights", max_rank: int, method: str | None = None, param: float | None = None,
                  device: "torch.device | str | None" = None) -> tuple["LoRAWeights", ResizeStats]:
    """The module at its new rank (factors on the CPU, float32) and what changed.

    The new factors are the truncated SVD of ``up @ down`` with ``sqrt(S)`` on each side, and
    ``new_alpha = alpha / old_rank * new_rank``, so the update ``new_alpha / new_rank · up @ down``
    is the best rank-``new_rank`` approximation of the old update.
    """
    from networks.lora_file import LoRAWeights

    u, s, vh = factored_svd(module.up.to(device), module.down.to(device))
    rank = choose_rank(s, min(max_rank, module.rank), method, param)
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).float().cpu()
    down = (root[:, None] * vh[:rank]).float().cpu()
    if module.up.ndim == 4:
        up = up.reshape(up.shape[0], rank, 1, 1)
        down = down.reshape(rank, *module.down.shape[1:])
    new_alpha = module.scale * rank
    s = s.double().cpu()
    total, total_sq = float(s.sum()), float(s.square().sum())
    kept_sq = float(s[:rank].square().sum())
    stats = ResizeStats(
        name=module.name, old_rank=module.rank, new_rank=rank, old_alpha=module.alpha, new_alpha=new_alpha,
        sum_retained=float(s[:rank].sum()) / total if total > 0 else 1.0,
        fro_retained=math.sqrt(kept_sq / total_sq) if total_sq > 0 else 1.0,
        max_ratio=float(s[0] / s[rank - 1]) if float(s[rank - 1]) > 0 else math.inf,
        spatial_conv=module.is_spatial_conv,
    )
    return LoRAWeights(module.name, down.contiguous(), up.contiguous(), new_alpha), stats


def resize_modules(modules: Mapping[str, "LoRAWeights"], new_rank: int, new_conv_rank: int | None = None,
                   method: str | None = None, param: float | None = None, device: "torch.device | str | None" = None,
                   progress: bool = True) -> tuple[dict[str, "LoRAWeights"], list[ResizeStats]]:
    """Resize every module: 3x3 (and larger) convs to ``new_conv_rank`` (default ``new_rank``), the
    others to ``new_rank``."""
    from tqdm import tqdm

    if new_rank < 1 or (new_conv_rank is not None and new_conv_rank < 1):
        raise ValueError(f"--new_rank/--new_conv_rank must be at least 1, got {new_rank}/{new_conv_rank}")
    validate_dynamic(method, param)
    conv_rank = new_rank if new_conv_rank is None else new_conv_rank
    resized: dict[str, LoRAWeights] = {}
    stats: list[ResizeStats] = []
    for name, module in tqdm(modules.items(), desc="resizing", unit="module", disable=not progress):
        new, stat = resize_module(module, conv_rank if module.is_spatial_conv else new_rank, method, param, device)
        resized[name] = new
        stats.append(stat)
    return resized, stats


# --- metadata ----------------------------------------------------------------------------------

def _uniform(values: Sequence[float]) -> float | None:
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def _alpha_text(alpha: float) -> str:
    return str(float(alpha))


def resize_metadata(metadata: Mapping[str, str], stats: Sequence[ResizeStats], *, new_rank: int,
                    new_conv_rank: int | None, method: str | None, param: float | None) -> dict[str, str]:
    """The input's metadata with the new ``ss_network_dim``/``ss_network_alpha`` (``"Dynamic"`` when
    they differ between modules), ``conv_dim``/``conv_alpha`` in ``ss_network_args`` likewise, and
    a note on the resize appended to ``ss_training_comment``. (``write_lora`` recomputes the
    ``sshs_*`` hashes.)"""
    md = dict(metadata)
    old_dim = md.get("ss_network_dim")
    if old_dim in (None, "", "None"):
        old_dim = str(max((s.old_rank for s in stats if not s.spatial_conv), default=0) or
                      max((s.old_rank for s in stats), default=0))
    linear = [s for s in stats if not s.spatial_conv]
    conv = [s for s in stats if s.spatial_conv]
    if linear:
        dim, alpha = _uniform([s.new_rank for s in linear]), _uniform([s.new_alpha for s in linear])
        md["ss_network_dim"] = "Dynamic" if dim is None else str(dim)
        md["ss_network_alpha"] = "Dynamic" if alpha is None else _alpha_text(alpha)
    if conv:
        raw = md.get("ss_network_args")
        try:
            network_args = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            network_args = None  # not ours to rewrite
        if isinstance(network_args, dict):
            dim, alpha = _uniform([s.new_rank for s in conv]), _uniform([s.new_alpha for s in conv])
            network_args["conv_dim"] = "Dynamic" if dim is None else str(dim)
            network_args["conv_alpha"] = "Dynamic" if alpha is None else _alpha_text(alpha)
            md["ss_network_args"] = json.dumps(network_args)
    if method:
        note = f"dynamic resize with {method}: {param} from {old_dim}"
    else:
        conv_note = f" (conv: {new_conv_rank})" if new_conv_rank is not None and new_conv_rank != new_rank else ""
        note = f"dimension is resized from {old_dim} to {new_rank}{conv_note}"
    comment = md.get("ss_training_comment")
    md["ss_training_comment"] = note if comment in (None, "", "None") else f"{comment}; {note}"
    return md


# --- the tool ----------------------------------------------------------------------------------

def log_stats(stats: Sequence[ResizeStats], verbose: bool) -> None:
    if verbose:
        for s in stats:
            logger.info("%s: rank %d -> %d, alpha %g -> %g, sum(S) retained %.1f%%, Frobenius norm retained %.1f%%, "
                        "max(S) ratio %.1f", s.name, s.old_rank, s.new_rank, s.old_alpha, s.new_alpha,
                        100 * s.sum_retained, 100 * s.fro_retained, s.max_ratio)
    if not stats:
        return
    ranks = [s.new_rank for s in stats]
    fro = [s.fro_retained for s in stats]
    mean = sum(fro) / len(fro)
    std = math.sqrt(sum((f - mean) ** 2 for f in fro) / len(fro))
    logger.info("%d modules resized: rank %d..%d (mean %.1f, was %d..%d); Frobenius norm retained: mean %.1f%%, "
                "std %.1f%%, min %.1f%%", len(stats), min(ranks), max(ranks), sum(ranks) / len(ranks),
                min(s.old_rank for s in stats), max(s.old_rank for s in stats), 100 * mean, 100 * std, 100 * min(fro))


def resize_lora(model: str, save_to: str, new_rank: int = 4, new_conv_rank: int | None = None,
                save_precision: str | None = None, device: str | None = None, dynamic_method: str | None = None,
                dynamic_param: float | None = None, verbose: bool = False) -> list[ResizeStats]:
    """Resize the LoRA file ``model`` into ``save_to``; returns the per-module statistics."""
    import torch

    from networks.lora_file import lora_modules, modules_to_state_dict, read_lora, write_lora

    validate_dynamic(dynamic_method, dynamic_param)
    dtype = {None: torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[save_precision]
    state_dict, metadata = read_lora(model)
    modules = lora_modules(state_dict, model)
    if not modules:
        raise ValueError(f"{model}: no LoRA modules in the file")
    logger.info("%s: %d modules, ranks %d..%d", model, len(modules), min(m.rank for m in modules.values()),
                max(m.rank for m in modules.values()))
    resized, stats = resize_modules(modules, new_rank, new_conv_rank, dynamic_method, dynamic_param,
                                    device or "cpu")
    if dynamic_method is None:
        asked = {True: new_conv_rank or new_rank, False: new_rank}
        below = [s for s in stats if s.new_rank < asked[s.spatial_conv]]
        if below:
            logger.info("%d modules already have a lower rank than asked and keep it (e.g. %s: %d)", len(below),
                        below[0].name, below[0].old_rank)
    log_stats(stats, verbose)
    md = resize_metadata(metadata, stats, new_rank=new_rank, new_conv_rank=new_conv_rank, method=dynamic_method,
                         param=dynamic_param)
    write_lora(save_to, modules_to_state_dict(resized, dtype), md, inputs=(model,))
    logger.info("saved %s", save_to)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = setup_parser()
    args = parser.parse_args(argv)
    setup_logging(args)
    try:
        validate_dynamic(args.dynamic_method, args.dynamic_param)
    except ValueError as e:
        parser.error(str(e))
    from library.io_utils import WriteError
    from networks.lora_file import LoRAFileError

    try:
        resize_lora(args.model, args.save_to, args.new_rank, args.new_conv_rank, args.save_precision, args.device,
                    args.dynamic_method, args.dynamic_param, args.verbose)
    except (FileNotFoundError, LoRAFileError, ValueError, WriteError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
