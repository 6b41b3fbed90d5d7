"""``--config_file`` and ``--output_config``: arguments stored in a TOML file.

Every table of the file is flattened (section names are only for people), the values become the
parser's defaults, and the command line is parsed again, so a flag given on the command line
always beats the file. Keys that are not flags of the script are an error naming the key and the
closest flag, instead of being ignored.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from pathlib import Path

import toml

from library import toml_text
from library.io_utils import atomic_path

logger = logging.getLogger(__name__)

_NOT_WRITTEN = {"config_file", "output_config", "wandb_api_key"}


def _config_path(name: str) -> Path:
    path = Path(name)
    return path if path.suffix.lower() == ".toml" else path.with_name(path.name + ".toml")


def _flatten(table: dict, path: str = "") -> dict:
    flat: dict = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{path}{key}."))
        else:
            flat[key] = value
    return flat


def _dests(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def _one_value(action: argparse.Action, value):
    if action.type is None or value is None:
        return value
    name = {int: "an integer", float: "a number", str: "a string"}.get(action.type, f"a {action.type.__name__}")
    # bool is an int subclass and str() takes anything: only a value the flag could be typed as passes
    if isinstance(value, (bool, list, dict)) or (action.type is not str and not isinstance(value, (int, float, str))):
        raise ValueError(f"expected {name}")
    if action.type is int and isinstance(value, float) and not value.is_integer():
        raise ValueError("expected an integer")
    try:
        return action.type(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"expected {name}") from None


def _flag_value(action: argparse.Action, value):
    """A TOML value as the flag's value, exactly as if it had been typed on the command line (a
    number given for a str flag such as lr_warmup_steps becomes a str); ValueError says what fits."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):  # a list flag: a single value is a list of one
        return [_one_value(action, v) for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, list):
        raise ValueError("expected a single value, not a list")
    return _one_value(action, value)


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` honouring ``--config_file`` (file values first, command line wins) and
    ``--output_config`` (write the non-default values to the config file and exit)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if not args.config_file:
        if args.output_config:
            parser.error("--output_config writes to the file named by --config_file: add --config_file FILE.toml")
        return args

    path = _config_path(args.config_file)
    if args.output_config:
        write_config(parser, args, path)
        logger.info("wrote the non-default arguments to %s", path)
        raise SystemExit(0)

    if not path.is_file():
        parser.error(f"--config_file: {path} does not exist")
    try:
        values = _flatten(toml_text.loads(path.read_text(encoding="utf-8-sig")))
    except UnicodeDecodeError as e:
        parser.error(f"--config_file: {path} is not UTF-8 (invalid byte at offset {e.start}): re-save it as UTF-8")
    except toml.TomlDecodeError as e:
        parser.error(f"--config_file: {path} is not valid TOML: {e}")

    actions = _dests(parser)
    for key, value in values.items():
        if key not in actions:
            close = difflib.get_close_matches(key, actions.keys(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            parser.error(f"--config_file {path}: unknown argument '{key}'{hint}")
        action = actions[key]
        try:
            values[key] = _flag_value(action, value)
        except ValueError as e:
            parser.error(f"--config_file {path}: '{key}' = {value!r}: {e}")
        converted = values[key] if isinstance(values[key], list) else [values[key]]
        if action.choices is not None and any(v not in action.choices for v in converted):
            parser.error(f"--config_file {path}: '{key}' = {value!r} is not one of {list(c for c in action.choices if c is not None)}")
    parser.set_defaults(**values)
    args = parser.parse_args(argv)
    logger.info("loaded arguments from %s", path)
    return args


def write_config(parser: argparse.ArgumentParser, args: argparse.Namespace, path: str | os.PathLike) -> None:
    """Write the values of ``args`` that differ from the parser's defaults as a TOML file."""
    out = {}
    for dest, action in _dests(parser).items():
        if dest in _NOT_WRITTEN or dest.startswith("_"):
            continue
        value = getattr(args, dest, None)
        if value != action.default and value is not None:
            out[dest] = value
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        toml.dump(out, f)
