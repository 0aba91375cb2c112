"""The command lines ``natzoo-train`` / ``natzoo-eval`` (also ``python -m natzoo.train`` / ``python -m natzoo.eval``
and the repository's ``train.py`` / ``eval.py``): one ``@hydra.main`` per command, on the configs installed with
the package.

The configs live in the repository's top-level ``configs/`` folder; ``natzoo/configs`` is a relative link to it in a
source checkout and a copy of it in an installed wheel, so every entry point composes the same files. Runs write
``data/`` and ``logs/`` under the working directory (``configs/paths/default.yaml``), never next to the package. A
user project adds its own config folder in front of natzoo's with Hydra's ``--config-dir <folder>``.

The messages that print a command (the resume hint, the ``Evaluate with:`` line) name the program the user ran:
:func:`command` returns it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

__all__ = ["CONFIG_DIR", "command", "set_program"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Program words per command, as the user typed them; the repository's scripts are the default (library callers).
_PROGRAMS: dict[str, list[str]] = {"train": ["python", "train.py"], "eval": ["python", "eval.py"]}

_STYLES: dict[str, dict[str, list[str]]] = {
    "script": {"train": ["python", "train.py"], "eval": ["python", "eval.py"]},
    "console": {"train": ["natzoo-train"], "eval": ["natzoo-eval"]},
    "module": {"train": ["python", "-m", "natzoo.train"], "eval": ["python", "-m", "natzoo.eval"]},
}


def set_program(style: str) -> None:
    """Names the entry point the user ran: ``"script"`` (``python train.py``), ``"console"`` (``natzoo-train``) or
    ``"module"`` (``python -m natzoo.train``); later messages print commands in the same style.

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
        for source in HydraConfig.get().runtime.config_sources:
            if source.provider == "command-line" and source.schema == "file":
                words += ["--config-dir", shlex.quote(str(source.path))]
    return words
