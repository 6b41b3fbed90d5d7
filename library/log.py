"""Logging setup: a rich console handler by default, plain lines with ``--console_log_simple``."""

from __future__ import annotations

import logging
import sys

_configured = False


def setup_logging(args=None, *, reset: bool = False) -> None:
    """Configure the root logger once from ``--console_log_level/_file/_simple``.

    Library modules only ever call ``logging.getLogger(__name__)``; this is called by entry
    scripts so that importing the library never changes a host application's logging.
    """
    global _configured
    if _configured and not reset:
        return
    level_name = getattr(args, "console_log_level", None) or "INFO"
    log_file = getattr(args, "console_log_file", None)
    simple = bool(getattr(args, "console_log_simple", False))

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level_name)

    if log_file:
        handler: logging.Handler = logging.FileHandler(log_file, mode="w", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    elif simple or not sys.stderr.isatty():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        try:
            from rich.console import Console
            from rich.logging import RichHandler

            handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:  # rich is a dependency, but never fail to log because of it
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    for noisy in ("PIL", "urllib3", "httpx", "filelock", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _configured = True
