"""The body of every network-training entry script: parse, log, train, and report input errors in one line.

    main(setup_flux_network_parser, "library.families.flux.family:FluxFamily", argv)
    main(setup_fine_tune_parser, "library.families.sd.family:StableDiffusionFamily", argv,
         target="library.training.fine_tune:ModelTarget")

The family is named as ``"module:Class"`` and imported only after the flags parsed, so ``--help``
and flag errors never load torch. Errors about the user's files that are found while loading
(a checkpoint of another family, a missing text encoder, a bad image or caption, a bad sample-prompt
file) and a NaN/inf loss (stopped before anything is saved from the broken weights) end the run with
``error: <message>`` and exit status 1 instead of a traceback; ``--console_log_level DEBUG``
logs the traceback too.
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable

from library.config_file import parse_args_with_config
from library.log import setup_logging

logger = logging.getLogger(__name__)


def main(setup_parser: Callable, family: str, argv: list[str] | None = None, *,
         target: str = "library.training.targets:NetworkTarget") -> None:
    """``target`` names the :class:`~library.training.targets.TrainingTarget` class as ``"module:Class"``."""
    parser = setup_parser()
    args = parse_args_with_config(parser, argv)
    setup_logging(args)
    # torch/diffusers load only once the flags are known to be good: `--help` and flag errors are instant.
    from library.data.errors import DatasetError
    from library.families.sd.checkpoint.common import CheckpointError
    from library.sampling.prompts import PromptFileError
    from library.training.loss_log import NonFiniteLossError
    from library.training.trainer import Trainer

    try:
        Trainer(_load(family)(), _load(target)()).train(args)
    except (CheckpointError, DatasetError, PromptFileError, NonFiniteLossError) as e:
        logger.debug("input error", exc_info=True)
        raise SystemExit(f"error: {e}") from None


def _load(name: str):
    module_name, _, class_name = name.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
