"""``python -m natzoo train|eval [overrides...]``: the same commands as ``natzoo-train`` / ``natzoo-eval``."""

from natzoo.cli import main

if __name__ == "__main__":
    main()
