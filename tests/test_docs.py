"""Every Python block in README.md and docs/ runs as written, each in a fresh interpreter.

A block that cannot run here (it needs a real checkpoint file, a download or a GPU) is preceded by an HTML comment
``<!-- skip: reason -->``; it is reported as skipped with that reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, fenced_blocks

SKIP = re.compile(r"<!--\s*skip:\s*(.*?)\s*-->\s*$")


def python_blocks() -> list:
    params = []
    for path, line, code, before in fenced_blocks("python"):
        skip = SKIP.search(before)
        marks = [pytest.mark.skip(reason=f"{path.name}:{line}: {skip.group(1)}")] if skip else []
        params.append(pytest.param(code, id=f"{path.relative_to(REPO)}:{line}", marks=marks))
    return params


BLOCKS = python_blocks()


def test_docs_have_python_blocks():
    assert len(BLOCKS) >= 10, [p.id for p in BLOCKS]


@pytest.mark.slow
@pytest.mark.parametrize("code", BLOCKS)
def test_python_block_runs_as_written(code: str, tmp_path: Path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"block failed:\n{code}\n--- stderr ---\n{proc.stderr[-4000:]}"
