"""The command lines: ``natzoo-train`` / ``natzoo-eval`` (:func:`train_main` / :func:`eval_main`), also reached as
``python -m natzoo train|eval`` and through the repository's ``train.py`` / ``eval.py``. One ``@hydra.main`` per
command, on the configs installed with the package.

The configs live in the repository's top-level ``configs/`` folder; ``natzoo/configs`` is a relative link to it in a
source checkout and a copy of it in an installed wheel, so every entry point composes the same files. Runs write
``data/`` and ``logs/`` under the working directory (``configs/paths/default.yaml``), never next to the package. A
user project adds its own config folder in front of natzoo's with Hydra's ``--config-dir <folder>``. The library
functions behind the commands are ``natzoo.train(cfg)`` and ``natzoo.evaluate(cfg)``.

The messages that print a command (the resume hint, the ``Evaluate with:`` line) name the program the user ran:
:func:`command` returns it.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig

__all__ = ["CONFIG_DIR", "command", "eval_main", "main", "set_program", "train_main"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

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
        for source in HydraConfig.get().runtime.config_sources:
            if source.provider == "command-line" and source.schema == "file":
                words += ["--config-dir", shlex.quote(str(source.path))]
    return words


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _train(cfg: DictConfig) -> float:
    from natzoo import train
    from natzoo.run.console import exit_on_config_error

    result = exit_on_config_error(lambda: train(cfg))
    return result["best_score"] if result["best_score"] is not None else float("nan")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def _eval(cfg: DictConfig) -> None:
    from natzoo import evaluate
    from natzoo.run.console import exit_on_config_error

    exit_on_config_error(lambda: evaluate(cfg))


def train_main(style: str = "console") -> None:
    """``natzoo-train``: composes ``train.yaml`` with the command-line overrides and trains. ``style`` names how the
    user started it (:func:`set_program`) for the commands the run prints."""
    from natzoo.run.hydra_setup import register_with_hydra

    set_program(style)
    register_with_hydra()  # `model=<variant>` configs for every registered NAT-family variant, resolvers
    _train()


def eval_main(style: str = "console") -> None:
    """``natzoo-eval``: composes ``eval.yaml`` with the command-line overrides, evaluates and writes the JSON result.
    ``style`` names how the user started it (:func:`set_program`)."""
    from natzoo.run.hydra_setup import register_with_hydra

    set_program(style)
    register_with_hydra()
    _eval()


_COMMANDS = {"train": train_main, "eval": eval_main}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m natzoo train|eval [overrides...]``: the first word picks the command, the rest go to Hydra."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in _COMMANDS:
        sys.exit(f"usage: python -m natzoo {{{'|'.join(_COMMANDS)}}} [Hydra overrides ...], e.g. python -m natzoo train "
                 "model=nat_mini")
    sys.argv = [sys.argv[0], *args[1:]]
    _COMMANDS[args[0]]("module")
