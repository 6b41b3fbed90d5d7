"""Check a LoRA file for modules that did not train: mean |value| of each module's weights.

    python networks/check_lora_weights.py my_lora.safetensors        # problems and a summary
    python networks/check_lora_weights.py my_lora.safetensors -s     # every module

A module whose ``lora_up`` is all zeros is untrained: ``up`` starts at zero, so it never received
an update (wrong learning rate for that part, a frozen block, a text encoder that was not trained,
...). Also flagged: an all-zero ``lora_down`` and NaN/Inf values. Keys that are not
``lora_down``/``lora_up``/``alpha`` keys (other network types) are listed with their mean |value|.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from library.args import add_logging_arguments  # noqa: E402  (no torch: --help stays instant)
from library.log import setup_logging  # noqa: E402

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Show mean |value| of a LoRA's weights and flag untrained modules.")
    parser.add_argument("file", type=str, help="LoRA file (.safetensors, .pt or .ckpt)")
    parser.add_argument("-s", "--show_all", action="store_true", help="show every module, not only the problems")
    add_logging_arguments(parser)
    return parser


@dataclass
class ModuleCheck:
    """One module: mean |value| of ``lora_down``/``lora_up`` (None: key missing), rank, alpha, problems."""

    name: str
    down_mean: float | None
    up_mean: float | None
    rank: int | None
    alpha: float | None
    problems: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    modules: list[ModuleCheck]
    other_keys: dict[str, float]  # key -> mean |value| for keys that are not LoRA keys

    @property
    def problems(self) -> list[ModuleCheck]:
        return [m for m in self.modules if m.problems]


def _mean_abs(t: "torch.Tensor") -> float:
    return float(t.float().abs().mean()) if t.numel() else 0.0


def check_state_dict(state_dict: Mapping[str, "torch.Tensor"]) -> CheckReport:
    """Check every module of a LoRA state dict."""
    import torch

    names: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, float] = {}
    for key, value in state_dict.items():
        name, _, suffix = key.partition(".")
        if suffix in _SUFFIXES:
            names.setdefault(name, {})[suffix] = value
        elif isinstance(value, torch.Tensor):
            other[key] = _mean_abs(value)
    modules = []
    for name in sorted(names):
        parts = names[name]
        down, up, alpha = parts.get("lora_down.weight"), parts.get("lora_up.weight"), parts.get("alpha")
        check = ModuleCheck(name, None if down is None else _mean_abs(down), None if up is None else _mean_abs(up),
                            None if down is None else int(down.shape[0]),
                            None if alpha is None or not alpha.numel() else float(alpha.float().reshape(-1)[0]))
        for what, t in (("lora_down", down), ("lora_up", up)):
            if t is None:
                check.problems.append(f"no {what}.weight")
            elif not bool(torch.isfinite(t.float()).all()):
                check.problems.append(f"{what} has NaN/Inf values")
        if up is not None and not bool(up.float().any()):
            check.problems.append("untrained: lora_up is all zeros")
        if down is not None and not bool(down.float().any()):
            check.problems.append("lora_down is all zeros")
        modules.append(check)
    return CheckReport(modules, other)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"


def format_report(report: CheckReport, show_all: bool) -> list[str]:
    """The lines the tool prints: a table of modules (all, or only those with problems) and a summary."""
    shown = report.modules if show_all else report.problems
    lines = []
    if shown:
        width = max(len(m.name) for m in shown)
        lines.append(f"{'module':<{width}}  {'rank':>4}  {'alpha':>7}  {'mean|down|':>10}  {'mean|up|':>10}  problems")
        for m in shown:
            rank = "-" if m.rank is None else str(m.rank)
            alpha = "-" if m.alpha is None else f"{m.alpha:g}"
            lines.append(f"{m.name:<{width}}  {rank:>4}  {alpha:>7}  {_number(m.down_mean):>10}  "
                         f"{_number(m.up_mean):>10}  {'; '.join(m.problems)}")
    if report.other_keys and show_all:
        lines.append("keys that are not lora_down/lora_up/alpha keys:")
        lines += [f"  {key}  mean|value| {_number(mean)}" for key, mean in sorted(report.other_keys.items())]
    untrained = [m for m in report.modules if any(p.startswith("untrained") for p in m.problems)]
    te = [m for m in report.modules if m.name.startswith("lora_te")]
    summary = (f"{len(report.modules)} modules ({len(te)} text encoder, {len(report.modules) - len(te)} other): "
               f"{len(report.problems)} with problems, {len(untrained)} untrained (lora_up all zeros)")
    if report.other_keys:
        summary += f"; {len(report.other_keys)} other keys"
    if not show_all and not report.problems:
        summary += "; run with -s to see every module"
    lines.append(summary)
    return lines


def main(argv: Sequence[str] | None = None) -> CheckReport:
    parser = setup_parser()
    args = parser.parse_args(argv)
    setup_logging(args)
    from networks.lora_file import LoRAFileError, read_lora

    try:
        state_dict, _ = read_lora(args.file)
    except (FileNotFoundError, LoRAFileError) as e:
        raise SystemExit(f"error: {e}") from None
    report = check_state_dict(state_dict)
    if not report.modules:
        raise SystemExit(f"error: {not_a_lora_message(args.file, state_dict)}")
    for line in format_report(report, args.show_all):
        print(line)
    return report


def not_a_lora_message(path: str, state_dict: Mapping[str, torch.Tensor]) -> str:
    """Why a file without a single lora_down/lora_up module is not checked (a model, another network)."""
    from networks.lora_diagnostics import guess_lora_kind

    keys = sorted(state_dict)
    if any(k.startswith(("model.diffusion_model.", "cond_stage_model.", "conditioner.", "first_stage_model.",
                         "double_blocks.", "joint_blocks.")) for k in keys):
        what = "a model checkpoint"
    else:
        what = guess_lora_kind(state_dict)
    shown = ", ".join(keys[:2]) + (", ..." if len(keys) > 2 else "")
    return (f"{path}: not a LoRA file: no lora_down/lora_up modules among its {len(keys)} keys ({shown}); it looks "
            f"like {what}. Give a kohya-format LoRA file")


if __name__ == "__main__":
    main(sys.argv[1:])
