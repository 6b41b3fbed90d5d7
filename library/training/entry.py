"""The body of every network-training entry script: parse, log, train, and report input errors in one line.

    main(setup_flux_network_parser, "library.families.flux.family:FluxFamily", argv)
    main(setup_fine_tune_parser, "library.families.sd.family:StableDiffusionFamily", argv,
         target="library.training.fine_tune:ModelTarget")

The family is named as ``"module:Class"`` and imported only after the flags parsed, so ``--help``
and flag errors never load torch. Errors about the user's files that are found while loading
(a checkpoint of another family, a missing text encoder, a bad image or caption, a bad sample-prompt
file) and a NaN/inf loss (stopped before anything is saved from the broken weights) end the run with
``error: <message>`` and exit status 1 instead of a traceback; ``--console_log_level DEBUG``
logs the traceback too. Ctrl-C/SIGTERM stops at the next step boundary (saving a state with
``--save_state`` or ``--save_state_on_interrupt``) and exits with status 130.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Callable

from library.config_file import parse_args_with_config
from library.log import setup_logging

logger = logging.getLogger(__name__)

INTERRUPTED = 130  # the shell's status for a run ended by Ctrl-C


def main(setup_parser: Callable, family: str | Callable[[object], str], argv: list[str] | None = None, *,
         target: str = "library.training.targets:NetworkTarget") -> None:
    """``target`` names the :class:`~library.training.targets.TrainingTarget` class as ``"module:Class"``;
    ``family`` may also be a function of the parsed flags giving that name (``--model_type``)."""
    parser = setup_parser()
    args = parse_args_with_config(parser, argv)
    setup_logging(args)
    # torch/diffusers load only once the flags are known to be good: `--help` and flag errors are instant.
    from library.data.errors import DatasetError
    from library.families.script_hints import running_tool
    from library.families.sd.checkpoint.common import CheckpointError
    from library.io_utils import WriteError
    from library.sampling.prompts import PromptFileError
    from library.training.interrupt import TrainingInterrupted
    from library.training.loss_log import NonFiniteLossError
    from library.training.trainer import Trainer

    try:
        family_name = family(args) if callable(family) else family
        training_target = _load(target)()
        with running_tool(training_target.tool_kind):  # a model of another family names this tool's sibling
            Trainer(_load(family_name)(), training_target).train(args)
    except (CheckpointError, DatasetError, PromptFileError, NonFiniteLossError, WriteError, FileNotFoundError) as e:
        # FileNotFoundError: the loaders' "not found" errors name the file and the flag to fix
        logger.debug("input error", exc_info=True)
        raise SystemExit(f"error: {one_line(e)}") from None
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    except KeyboardInterrupt:  # before the training loop (loading, caching): nothing of value yet
        print("interrupted before training started; nothing saved", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None


def one_line(error: BaseException) -> str:
    """The user's message of ``error``. An error raised in a DataLoader worker comes back wrapped in
    the worker's traceback ("Caught DatasetError in DataLoader worker process 0. Original Traceback
    ..."); its last line is the original message."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    name = type(error).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last


def _load(name: str):
    module_name, _, class_name = name.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
