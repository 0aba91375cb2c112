"""benchmarks/suite_times.py: the test-time tables of docs/development.md come from pytest's own summary."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LOG = """\
tests/test_a.py ....s                                                    [100%]
============================= slowest 3 durations ==============================
12.33s call     tests/test_a.py::test_one
0.66s setup    tests/test_a.py::test_two
5.57s call     tests/test_b.py::test_three[x-1]
=========================== short test summary info ============================
1433 passed, 12 skipped, 940 deselected in 331.20s (0:05:31)
"""


@pytest.fixture(scope="module")
def suite_times():
    spec = importlib.util.spec_from_file_location("suite_times", REPO / "benchmarks" / "suite_times.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["suite_times"] = module
    spec.loader.exec_module(module)
    return module


def test_parse_reads_counts_time_and_durations(suite_times):
    counts, seconds, durations = suite_times.parse(LOG)
    assert counts == {"passed": 1433, "skipped": 12, "deselected": 940} and seconds == 331.2
    assert durations[0] == (12.33, "call", "tests/test_a.py::test_one") and len(durations) == 3
    with pytest.raises(ValueError, match="no pytest summary line"):
        suite_times.parse("collected 0 items\n")


def test_update_rewrites_only_its_own_table(suite_times, tmp_path):
    page = tmp_path / "development.md"
    page.write_text("intro\n<!-- test-times:fast -->\nold\n<!-- /test-times:fast -->\nkept\n")
    block = suite_times.table("fast", 'python -m pytest -q -m "not slow"', LOG, "0.5 / 0.4 / 0.3", 2)
    suite_times.update(page, "fast", block)
    text = page.read_text()
    assert text.startswith("intro\n<!-- test-times:fast -->\n| Subset |")
    assert text.endswith("<!-- /test-times:fast -->\nkept\n")
    assert "| 5 min 31 s |" in text and "1433 passed, 12 skipped, 940 deselected" in text and "old" not in text
    assert text.index("tests/test_a.py::test_one") < text.index("tests/test_b.py::test_three[x-1]")  # slowest first
    assert "test_two" not in text  # only the 2 slowest
    with pytest.raises(ValueError, match="has no <!-- test-times:full -->"):
        suite_times.update(page, "full", block)
