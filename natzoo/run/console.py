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
* Lightning warns, on every dataset with fewer batches than ``trainer.log_every_n_steps``, that step rows will not
  be logged "if you want to see logs for the training epoch". natzoo logs the training metrics per epoch too (and
  prints them, :class:`natzoo.run.callbacks.EpochSummary`), so the warning is ignored (message and module).
* Lightning warns, once per loader, that an ``IterableDataset`` with ``__len__`` may be miscounted by multi-process
  loading "if each worker is not configured independently". natzoo's only such dataset, the WebDataset reader
  (``data=wds``), splits its shards by node and worker and sets its own epoch length, so that warning is ignored.

The commands a run prints (the resume hint, the ``Evaluate with:`` line) name the program the user ran
(:func:`set_program`, :func:`command`). Other behaviour of the console lives where it is made: the progress bar
appears only on a terminal (:func:`natzoo.run.callbacks.progress_bar`), and a model summary among the callbacks keeps
Lightning from adding, and announcing, its default (:func:`natzoo.run.training.build_trainer`).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")

__all__ = ["ConsoleFormatter", "command", "configure_console", "exit_on_config_error", "set_program"]

# Program words per command, as the user typed them; the repository's scripts are the default (library callers).
_PROGRAMS: dict[str, list[str]] = {"train": ["python", "train.py"], "eval": ["python", "eval.py"]}

_STYLES: dict[str, dict[str, list[str]]] = {
    "script": {"train": ["python", "train.py"], "eval": ["python", "eval.py"]},
    "console": {"train": ["natzoo-train"], "eval": ["natzoo-eval"]},
    "module": {"train": ["python", "-m", "natzoo", "train"], "eval": ["python", "-m", "natzoo", "eval"]},
}


def set_program(style: str) -> None:
    """Names the entry point the user ran: ``"script"`` (``python train.py``), ``"console"`` (``natzoo-train``) or
    ``"module"`` (``python -m natzoo train``); later messages print commands in the same style.

    Raises:
        ValueError: an unknown style.
    """
    if style not in _STYLES:
        raise ValueError(f"style must be one of {sorted(_STYLES)}, got {style!r}")
    _PROGRAMS.update({kind: list(words) for kind, words in _STYLES[style].items()})


def command(kind: str) -> list[str]:
    """The words (shell-quoted) that start a ``kind`` (``"train"`` or ``"eval"``) command the way the user started
    this run, with the run's ``--config-dir`` folders so that its own config names resolve again."""
    from hydra.core.hydra_config import HydraConfig

    words = list(_PROGRAMS[kind])
    if HydraConfig.initialized():
        sources = HydraConfig.get().runtime.config_sources
        main = next((s for s in sources if s.provider == "main" and s.schema == "file"), None)
        for source in sources:
            if source.provider == "command-line" and source.schema == "file":
                # natzoo's configs after a user folder made primary (natzoo.run.hydra_setup.user_configs_first):
                # the user typed --config-dir <that folder>
                if _is_natzoo_configs(source.path) and main is not None and not _is_natzoo_configs(main.path):
                    source = main
                words += ["--config-dir", shlex.quote(str(source.path))]
    return words


def _is_natzoo_configs(path: str) -> bool:
    from natzoo.run.hydra_setup import PACKAGED_CONFIGS

    return os.path.realpath(path) == os.path.realpath(PACKAGED_CONFIGS)


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
    """Applies the fixes above (idempotent). Called by ``natzoo.train`` and ``natzoo.evaluate``."""
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
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging "
                            r"interval", module=r"lightning\.pytorch\.loops\.fit_loop")
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined",
                            module=r"lightning\.pytorch\.utilities\.data")


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
