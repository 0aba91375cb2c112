"""The command lines: ``natzoo-train`` / ``natzoo-eval`` (:func:`train_main` / :func:`eval_main`), also reached as
``python -m natzoo train|eval`` and through the repository's ``train.py`` / ``eval.py``. One ``@hydra.main`` per
command, on the configs installed with the package.

The configs live in the repository's top-level ``configs/`` folder; ``natzoo/configs`` is a relative link to it in a
source checkout and a copy of it in an installed wheel, so every entry point composes the same files. Runs write
``data/`` and ``logs/`` under the working directory (``configs/paths/default.yaml``), never next to the package. A
user project adds its own config folder in front of natzoo's with Hydra's ``--config-dir <folder>``: its files win
over natzoo's of the same name (:func:`natzoo.run.hydra_setup.user_configs_first`). The library functions behind the
commands are ``natzoo.train(cfg)`` and ``natzoo.evaluate(cfg)``.

The messages that print a command (the resume hint, the ``Evaluate with:`` line) name the program the user ran
(:func:`natzoo.run.console.set_program`, :func:`natzoo.run.console.command`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig

__all__ = ["CONFIG_DIR", "eval_main", "main", "train_main"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

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
    user started it (:func:`natzoo.run.console.set_program`) for the commands the run prints."""
    from natzoo.run.console import set_program
    from natzoo.run.hydra_setup import register_with_hydra, user_configs_first

    set_program(style)
    register_with_hydra()  # `model=<variant>` configs for every registered NAT-family variant, resolvers
    sys.argv = [sys.argv[0], *user_configs_first(sys.argv[1:], CONFIG_DIR)]  # a user's --config-dir before natzoo's
    _train()


def eval_main(style: str = "console") -> None:
    """``natzoo-eval``: composes ``eval.yaml`` with the command-line overrides, evaluates and writes the JSON result.
    ``style`` names how the user started it (:func:`natzoo.run.console.set_program`)."""
    from natzoo.run.console import set_program
    from natzoo.run.hydra_setup import register_with_hydra, user_configs_first

    set_program(style)
    register_with_hydra()
    sys.argv = [sys.argv[0], *user_configs_first(sys.argv[1:], CONFIG_DIR)]  # a user's --config-dir before natzoo's
    _eval()


_COMMANDS = {"train": train_main, "eval": eval_main}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m natzoo train|eval [overrides...]``: the first word picks the command, the rest go to Hydra."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in _COMMANDS:
        sys.exit(f"usage: python -m natzoo {{{'|'.join(_COMMANDS)}}} [Hydra overrides ...], e.g. "
                 "python -m natzoo train model=nat_mini")
    sys.argv = [sys.argv[0], *args[1:]]
    _COMMANDS[args[0]]("module")
