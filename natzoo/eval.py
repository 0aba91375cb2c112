"""``natzoo-eval`` / ``python -m natzoo.eval``: evaluates as configured, exactly like the repository's ``eval.py``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from natzoo.cli import CONFIG_DIR, set_program

__all__ = ["main"]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def _run(cfg: DictConfig) -> None:
    from natzoo import evaluate
    from natzoo.console import exit_on_config_error

    exit_on_config_error(lambda: evaluate(cfg))


def main(style: str = "console") -> None:
    """Entry point: composes ``eval.yaml`` with the command-line overrides, evaluates and writes the JSON result.
    ``style`` names how the user started it (``natzoo.cli.set_program``)."""
    from natzoo.hydra_setup import register_with_hydra

    set_program(style)
    register_with_hydra()
    _run()


if __name__ == "__main__":
    main("module")
