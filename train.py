"""Train a model: `python train.py` (CPU demo) or `python train.py experiment=nat_tiny_in1k data.root=...`.

A thin Hydra entry point around :func:`natzoo.train`; see docs/training.md for every option.
"""

import hydra
from omegaconf import DictConfig

from natzoo.hydra_setup import register_with_hydra

register_with_hydra()  # `model=<variant>` configs for every registered NAT-family variant, resolvers


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    """Runs training; returns the best monitored metric (for Hydra sweepers)."""
    from natzoo import train
    from natzoo.console import exit_on_config_error

    result = exit_on_config_error(lambda: train(cfg))
    return result["best_score"] if result["best_score"] is not None else float("nan")


if __name__ == "__main__":
    main()
