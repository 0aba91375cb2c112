"""Train a model: `python train.py` (CPU demo) or `python train.py experiment=nat_tiny_in1k data.root=...`.

The same command as `natzoo-train` (natzoo/cli.py); see docs/training.md for every option.
"""

from natzoo.cli import train_main

if __name__ == "__main__":
    train_main("script")
