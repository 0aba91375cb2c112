"""Evaluate a model: `python eval.py ckpt_path=...` or `python eval.py model=nat_tiny checkpoint=nat_tiny.pth ...`.

The same command as `natzoo-eval` (natzoo/cli.py); see docs/training.md.
"""

from natzoo.cli import eval_main

if __name__ == "__main__":
    eval_main("script")
