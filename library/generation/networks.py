"""Networks for ``gen_img.py``: load several (LoRA) network files, apply or merge them, show metadata.

Each network ``i`` is ``--network_module[i]`` (a module with the kohya plug-in function
``create_network_from_weights``) with ``--network_weights[i]``, multiplier ``--network_mul[i]``
(default 1.0) and ``--network_args[i]`` (``"key=value;key=value"``).

* Applied (default): the network hooks into the text encoder and U-Net; multipliers can change
  per prompt (``--am``) through :meth:`LoadedNetworks.set_multipliers`.
* ``--network_merge``: the weights are added into the model (float32 on CPU, before any cast), so
  generation costs nothing extra; multipliers are then fixed.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)


class NetworkError(ValueError):
    """A network flag or file cannot be used; the message names it and the fix."""


def parse_network_args(text: str | None, index: int) -> dict[str, str]:
    """``"conv_dim=4;conv_alpha=1"`` -> ``{"conv_dim": "4", "conv_alpha": "1"}``."""
    kwargs: dict[str, str] = {}
    for part in (text or "").split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise NetworkError(f"--network_args value {index + 1} ({text!r}): expected 'key=value' pairs separated "
                               f"by ';', got {part!r}")
        kwargs[key.strip()] = value.strip()
    return kwargs


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file ({} for other files or none)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def format_metadata(path: str | Path, metadata: dict[str, str]) -> str:
    if not metadata:
        return f"{path}: no metadata"
    lines = [f"{path}: metadata"]
    for key in sorted(metadata):
        value = metadata[key]
        try:  # pretty-print the JSON values (ss_tag_frequency, ss_datasets, ...)
            parsed = json.loads(value)
            if isinstance(parsed, (dict, list)):
                value = json.dumps(parsed, ensure_ascii=False)
        except ValueError:
            pass
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


@dataclass
class LoadedNetworks:
    """The networks of one run, in command-line order."""

    networks: list[Any] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    merged: bool = False

    def __len__(self) -> int:
        return len(self.networks)

    def set_multipliers(self, multipliers: Sequence[float] | None) -> None:
        """Per-prompt multipliers (``--am``); ``None`` restores the ``--network_mul`` values."""
        wanted = list(self.multipliers if multipliers is None else multipliers)
        if multipliers is not None:
            if self.merged:
                raise NetworkError("--am (per-prompt network multipliers) cannot change merged networks: "
                                   "drop --network_merge to use --am")
            if len(wanted) != len(self.networks):
                raise NetworkError(f"--am has {len(wanted)} multiplier(s) but {len(self.networks)} network(s) are "
                                   "loaded: give one per --network_weights file, comma-separated")
        if self.merged:
            return
        for network, mul in zip(self.networks, wanted):
            if getattr(network, "multiplier", None) != mul:
                network.set_multiplier(mul)

    def to(self, device, dtype) -> None:
        if not self.merged:
            for network in self.networks:
                network.to(device=device, dtype=dtype)


def load_networks(args, *, text_encoder, unet, vae) -> LoadedNetworks:
    """Load, then apply (or with ``args.network_merge`` merge) every network of the command line."""
    loaded = LoadedNetworks(merged=bool(args.network_merge))
    modules = args.network_module or []
    for i, (module_name, weights) in enumerate(zip(modules, args.network_weights or [])):
        path = Path(weights)
        if not path.is_file():
            raise NetworkError(f"--network_weights {weights}: file not found")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise NetworkError(f"--network_module {module_name}: cannot import it ({e}); e.g. networks.lora") from None
        if not hasattr(module, "create_network_from_weights"):
            raise NetworkError(f"--network_module {module_name}: has no create_network_from_weights(); not a network module")
        mul = float(args.network_mul[i]) if args.network_mul and i < len(args.network_mul) else 1.0
        kwargs = parse_network_args(args.network_args[i] if args.network_args and i < len(args.network_args) else None, i)
        if args.network_show_meta:
            print(format_metadata(path, read_metadata(path)), flush=True)
        create = module.create_network_from_weights
        if "for_inference" in inspect.signature(create).parameters:
            kwargs["for_inference"] = True
        try:
            network, weights_sd = create(mul, str(path), vae, text_encoder, unet, **kwargs)
        except (ValueError, KeyError, RuntimeError) as e:
            raise NetworkError(f"--network_weights {weights}: cannot load it with {module_name} ({e})") from None
        if network is None:
            raise NetworkError(f"--network_weights {weights}: {module_name} returned no network")
        network.eval()
        network.requires_grad_(False)
        if args.network_merge:
            if not getattr(network, "is_mergeable", lambda: False)():
                raise NetworkError(f"--network_merge: {module_name} ({weights}) cannot be merged; drop --network_merge")
            network.merge_to(text_encoder, unet, weights_sd)
            logger.info("network %d: %s merged (multiplier %g)", i + 1, path.name, mul)
        else:
            network.apply_to(text_encoder, unet, True, True)
            logger.info("network %d: %s applied (multiplier %g)", i + 1, path.name, mul)
        loaded.networks.append(network)
        loaded.names.append(path.name)
        loaded.multipliers.append(mul)
    return loaded
