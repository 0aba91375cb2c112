"""Every `python train.py ...` / `python eval.py ...` command (or `natzoo-train ...` / `natzoo-eval ...`, the same
commands from an install) in README.md and docs/ composes with the real configs.

The command line is taken from the bash blocks as written (continuation lines joined, `torchrun`/`srun` prefixes
dropped, `<placeholder>` paths replaced by a dummy path), composed with Hydra and checked against the value rules of
the run's task. Nothing is trained: files and datasets named in the commands need not exist here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from helpers import REPO, fenced_blocks

from natzoo.config import COMMON_RULES, check_config
from natzoo.run.tasks import get_task
from natzoo.testing import compose_config

ENTRY = re.compile(r"(?:^|\s)(?:natzoo-(?P<installed>train|eval)|(?P<script>train|eval)\.py)(?:\s|$)")


def documented_commands() -> list:
    params = []
    for path, start, code, _ in fenced_blocks("bash|sh|shell"):
        for offset, line in enumerate(code.replace("\\\n", " ").split("\n")):
            command = line.split("#", 1)[0].strip()
            match = ENTRY.search(command)
            if match is None or "pip install" in command:
                continue
            words = shlex.split(command.replace("<", "PLACEHOLDER_").replace(">", ""))
            kind = match.group("installed") or match.group("script")
            entry = words.index(f"natzoo-{kind}" if match.group("installed") else f"{kind}.py")
            overrides = [w for w in words[entry + 1:] if "=" in w and not w.startswith("-")]
            params.append(pytest.param(kind, overrides, id=f"{path.relative_to(REPO)}:{start + offset}"))
    return params


COMMANDS = documented_commands()


def test_docs_show_train_and_eval_commands():
    kinds = {p.values[0] for p in COMMANDS}
    assert kinds == {"train", "eval"} and len(COMMANDS) >= 10, [p.id for p in COMMANDS]


@pytest.mark.parametrize("entry,overrides", COMMANDS)
def test_documented_command_composes(entry: str, overrides: list[str], tmp_path: Path):
    cfg = compose_config(entry, overrides, output_dir=tmp_path)
    task = get_task(str(cfg.get("task", "classification")))
    check_config(cfg, {**COMMON_RULES, **task.config_rules})
