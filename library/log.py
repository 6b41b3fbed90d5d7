"""Logging setup: a rich console handler by default, plain lines with ``--console_log_simple``."""

from __future__ import annotations

import logging
import os
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

    # With several processes (accelerate launch) only the first reports progress; the others
    # speak up for warnings and errors, marked with their rank, and never write the log file.
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank > 0:
        level_name = max(logging.getLevelName(level_name.upper()), logging.WARNING)
        log_file = None
        simple = True

    file_handler = None
    if log_file:  # opened first: a path that cannot be written stops here, with logging left as it was
        try:
            file_handler = logging.FileHandler(log_file, mode="w", encoding="utf-8")
        except OSError as e:
            raise SystemExit(f"error: --console_log_file {log_file}: cannot write it ({e.strerror or e}); give a "
                             "file in an existing folder you can write to") from None

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level_name)

    if file_handler is not None:
        handler: logging.Handler = file_handler
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    elif simple or not sys.stderr.isatty():
        handler = logging.StreamHandler(sys.stderr)
        prefix = f"[rank {rank}] " if rank > 0 else ""
        handler.setFormatter(logging.Formatter(prefix + "%(levelname)s %(name)s: %(message)s"))
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
