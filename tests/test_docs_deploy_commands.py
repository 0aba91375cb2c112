"""Every `natzoo-export ...` / `natzoo-predict ...` command in README.md and docs/ parses with the commands' real
argument parsers, and what it names as a source or output has the kind the command accepts (the end-to-end behaviour
of both commands is tested in tests/test_deploy.py)."""

from __future__ import annotations

import shlex

import pytest
from helpers import REPO, fenced_blocks

from natzoo.tools import export_cli, predict


def deploy_commands() -> list:
    params = []
    for path, start, code, _ in fenced_blocks("bash|sh|shell"):
        for offset, line in enumerate(code.replace("\\\n", " ").split("\n")):
            if " [-" in line or line.startswith(" "):
                continue  # a usage synopsis (``[--ema]`` ...) and its continuation line, not a command
            words = shlex.split(line.split("#", 1)[0].replace("<", "PLACEHOLDER_").replace(">", ""))
            for name in ("natzoo-export", "natzoo-predict"):
                if name in words:
                    params.append(pytest.param(name, words[words.index(name) + 1:],
                                               id=f"{path.relative_to(REPO)}:{start + offset}"))
    return params


COMMANDS = deploy_commands()


def test_readme_shows_both_deploy_commands():
    readme = {p.values[0] for p in COMMANDS if p.id.startswith("README.md")}
    assert readme == {"natzoo-export", "natzoo-predict"}, [p.id for p in COMMANDS]


@pytest.mark.parametrize("name,argv", COMMANDS)
def test_documented_deploy_command_parses(name: str, argv: list[str]):
    parser = export_cli.build_parser() if name == "natzoo-export" else predict.build_parser()
    args = parser.parse_args(argv)  # argparse exits (SystemExit 2) on an unknown flag or a missing argument
    if name == "natzoo-export":
        assert args.output.endswith((".onnx", ".pt2")) or args.format == "timm" or "." not in args.output.rsplit(
            "/", 1)[-1], args.output
    else:
        assert args.model and args.inputs
        assert args.output is None or args.output.endswith((".csv", ".json")), args.output
