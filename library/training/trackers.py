"""Experiment trackers (TensorBoard, wandb): when they are used, how they start, what they receive.

Pure functions of the parsed arguments, so they are testable without a tracker installed:

- :func:`uses_trackers`: ``--logging_dir`` (TensorBoard) or any ``--log_with``.
- :func:`tracker_init_kwargs`: ``accelerator.init_trackers(..., init_kwargs=...)`` from the
  ``--log_tracker_config`` TOML (tables named after trackers, e.g. ``[wandb]``), with
  ``--wandb_run_name`` as ``{"wandb": {"name": ...}}`` (the flag wins over the file).
- :func:`sanitized_config`: what ``--log_config`` sends: no secrets (API keys, tokens, passwords),
  absolute paths reduced to their base names, every value a None/bool/int/float/str (TensorBoard
  hparams accept nothing else).
- :func:`login_wandb`: ``wandb.login(key=--wandb_api_key)`` when wandb is used; the key is never
  logged or stored in the config.
"""

from __future__ import annotations

import logging
import os
from pathlib import PurePath
from typing import Any

from library import toml_text
from library.args import ArgumentError

logger = logging.getLogger(__name__)

#: argument names containing one of these are never sent to a tracker
SECRET_MARKERS = ("api_key", "apikey", "token", "password", "secret")


def uses_wandb(args) -> bool:
    return getattr(args, "log_with", None) in ("wandb", "all")


def uses_trackers(args) -> bool:
    """Whether the run logs to any tracker (``--logging_dir`` alone means TensorBoard)."""
    return bool(getattr(args, "logging_dir", None)) or getattr(args, "log_with", None) is not None


def tracker_init_kwargs(args) -> dict[str, dict[str, Any]]:
    """Per-tracker init kwargs from ``--log_tracker_config`` and ``--wandb_run_name``.

    The TOML's top-level tables are tracker names (``[wandb]``, ``[tensorboard]``); a missing or
    unreadable file raises :class:`ArgumentError` naming the flag.
    """
    kwargs: dict[str, dict[str, Any]] = {}
    path = getattr(args, "log_tracker_config", None)
    if path:
        if not os.path.isfile(path):
            raise ArgumentError(f"--log_tracker_config {path}: no such file (a .toml of tracker init kwargs)")
        try:
            with open(path, encoding="utf-8") as f:
                loaded = toml_text.loads(f.read())
        except UnicodeDecodeError as e:
            raise ArgumentError(f"--log_tracker_config {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (toml_text.TomlDecodeError, OSError) as e:
            raise ArgumentError(f"--log_tracker_config {path}: not valid TOML ({e})") from None
        for name, value in loaded.items():
            if not isinstance(value, dict):
                raise ArgumentError(f"--log_tracker_config {path}: '{name}' must be a table of init kwargs, "
                                    f"e.g. [wandb] then entity = \"me\"")
            kwargs[name] = dict(value)
    run_name = getattr(args, "wandb_run_name", None)
    if run_name:
        kwargs.setdefault("wandb", {})["name"] = run_name
    return kwargs


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(marker in lowered for marker in SECRET_MARKERS)


def _scrub(value: Any) -> Any:
    """Absolute paths -> base names; containers scrubbed item by item."""
    if isinstance(value, PurePath):
        value = str(value)
    if isinstance(value, str):
        expanded = os.path.expanduser(value)
        if os.path.isabs(expanded) or expanded != value:
            return os.path.basename(os.path.normpath(expanded))
        return value
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if not _is_secret(str(k))}
    return value


def sanitized_config(args) -> dict[str, Any]:
    """The arguments as a tracker config: secrets dropped, paths shortened, values hparams-safe.

    Lists, tuples and dicts become their ``str`` (after scrubbing their items); other objects too.
    """
    config: dict[str, Any] = {}
    for key, value in vars(args).items():
        if _is_secret(key):
            continue
        value = _scrub(value)
        if value is not None and not isinstance(value, (bool, int, float, str)):
            value = str(value)
        config[key] = value
    return config


def login_wandb(args) -> None:
    """Log in to wandb with ``--wandb_api_key`` when wandb is used and a key is given."""
    if not uses_wandb(args) or not getattr(args, "wandb_api_key", None):
        return
    try:
        import wandb
    except ImportError as e:
        raise ArgumentError("--log_with wandb: the wandb package is not installed (pip install wandb)") from e
    wandb.login(key=args.wandb_api_key)
