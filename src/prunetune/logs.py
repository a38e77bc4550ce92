"""The `prunetune` logger: messages go through `logging` (levels, handlers), printed on rank 0 only.

By default the logger has one handler writing the bare message to stdout (what the CLI always printed), level
INFO, and does not propagate to the root logger (so an application's own logging setup does not print every
line twice). $PRUNETUNE_VERBOSITY (debug | info | warning | error) or `set_verbosity()` change the level; add
handlers to `logging.getLogger("prunetune")` as with any library. `prunetune.dist.log(message)` is the short
form every call site uses.

>>> import logging
>>> set_verbosity(logging.WARNING)
>>> get_logger().info("not shown")
>>> set_verbosity(logging.INFO)
"""
from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "prunetune"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_configured = False


def _rank() -> int:
    """This process's rank (0 without torch.distributed); read here directly so logs needs nothing from dist."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank()
    return 0


class RankZeroFilter(logging.Filter):
    """Lets records through on rank 0 only (every rank runs the same code and would print the same lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _rank() == 0


class _StdoutHandler(logging.StreamHandler):
    """Writes to the current sys.stdout (looked up per record: test capture and redirection swap it)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass

    def flush(self) -> None:
        try:
            sys.stdout.flush()
        except (AttributeError, ValueError):
            pass


def get_logger() -> logging.Logger:
    """The `prunetune` logger, configured on first use."""
    global _configured
    logger = logging.getLogger(LOGGER_NAME)
    if not _configured:
        _configured = True
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(RankZeroFilter())
        logger.addHandler(handler)
        logger.propagate = False
        level = os.environ.get("PRUNETUNE_VERBOSITY", "info").strip().lower()
        logger.setLevel(_LEVELS.get(level, logging.INFO))
    return logger


def set_verbosity(level: int | str) -> None:
    """Level of the `prunetune` logger: a logging level or one of debug / info / warning / error."""
    get_logger().setLevel(_LEVELS[level.lower()] if isinstance(level, str) else level)


def log(message: str, level: int | None = None) -> None:
    """Log on the `prunetune` logger: INFO, or WARNING for a message starting with "warning:"."""
    if level is None:
        level = logging.WARNING if message.lower().startswith("warning:") else logging.INFO
    get_logger().log(level, message)
