"""Evaluate a model: `python eval.py ckpt_path=...` or `python eval.py model=nat_tiny checkpoint=nat_tiny.pth ...`.

A thin Hydra entry point around :func:`natzoo.evaluate`; see docs/training.md.
"""

import hydra
from omegaconf import DictConfig

from natzoo.hydra_setup import register_with_hydra

register_with_hydra()  # `model=<variant>` configs for every registered NAT-family variant, resolvers


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Runs evaluation and writes the JSON result."""
    from natzoo import evaluate
    from natzoo.console import exit_on_config_error

    exit_on_config_error(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
