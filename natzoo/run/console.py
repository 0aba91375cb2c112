"""Console output of ``train.py`` / ``eval.py``: every message once, no advertisement, no known dependency noise.

Fixed at the source, each for one known cause (nothing else is filtered):

* Lightning adds its own console handler to the ``lightning`` logger on import. Under Hydra the root logger already
  has a console handler (and the run's log file), so every Lightning INFO line was printed twice. When the root logger
  has handlers, Lightning's own handlers are removed and its records go to the root's handlers once (and into the
  run's log file).
* Lightning logs "💡 Tip: ..." advertisements for its cloud products; a filter on Lightning's rank-zero logger drops
  records starting with that marker.
* Lightning 2.6 calls a PyTorch ``_pytree`` API that PyTorch 2.14 deprecated, raising a ``FutureWarning`` about
  ``LeafSpec`` from Lightning's own module on every run; that one warning (message and module) is ignored.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")

__all__ = ["ConsoleFormatter", "configure_console", "exit_on_config_error"]

_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
_ADVERTISEMENT = "💡 Tip:"


class ConsoleFormatter(logging.Formatter):
    """``message`` for INFO records, ``LEVEL: message`` for the others (used by ``configs/hydra/default.yaml``)."""

    def format(self, record: logging.LogRecord) -> str:
        """Formats ``record`` (exception text included)."""
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname}: {message}"


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ADVERTISEMENT)


def configure_console() -> None:
    """Applies the three fixes above (idempotent). Called by ``natzoo.train`` and ``natzoo.evaluate``."""
    if logging.getLogger().handlers:
        for name in _LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:  # the console handlers Lightning adds on import
                    logger.removeHandler(handler)
            logger.propagate = True
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvertisements) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdvertisements())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


def exit_on_config_error(run: Callable[[], _T]) -> _T:
    """Runs ``run``; a failed config check (an exception marked ``natzoo_config_error``) is printed as one
    ``Error: <message>`` line without a traceback and ends the process with status 2. Other exceptions propagate."""
    try:
        return run()
    except Exception as err:
        if not getattr(err, "natzoo_config_error", False):
            raise
        print(f"Error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
