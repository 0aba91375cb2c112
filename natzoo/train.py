"""``natzoo-train`` / ``python -m natzoo.train``: trains as configured, exactly like the repository's ``train.py``.

``natzoo.train(cfg)`` stays the library function of the package: importing this module rebinds the name
``natzoo.train`` to the module, so the module is itself callable with the same signature (:class:`_CallableModule`)
and ``natzoo.train(cfg)`` works whether or not the module was imported.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import hydra
from omegaconf import DictConfig

from natzoo.cli import CONFIG_DIR, set_program

__all__ = ["main", "train"]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Trains the task named by ``cfg.task``; see :func:`natzoo.training.train`."""
    from natzoo.training import train as _train

    return _train(cfg)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _run(cfg: DictConfig) -> float:
    from natzoo.console import exit_on_config_error

    result = exit_on_config_error(lambda: train(cfg))
    return result["best_score"] if result["best_score"] is not None else float("nan")


def main(style: str = "console") -> None:
    """Entry point: composes ``train.yaml`` with the command-line overrides and trains. ``style`` names how the user
    started it (``natzoo.cli.set_program``) for the commands the run prints."""
    from natzoo.hydra_setup import register_with_hydra

    set_program(style)
    register_with_hydra()  # `model=<variant>` configs for every registered NAT-family variant, resolvers
    _run()


class _CallableModule(types.ModuleType):
    """This module, callable as ``natzoo.train(cfg)`` (the package function the module's name shadows)."""

    def __call__(self, cfg: DictConfig) -> dict[str, Any]:
        return train(cfg)


if __name__ == "__main__":
    main("module")
else:
    sys.modules[__name__].__class__ = _CallableModule
