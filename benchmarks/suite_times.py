"""How long the test suite takes: runs pytest (or reads a log of a run) and rewrites the tables of docs/development.md.

    python benchmarks/suite_times.py --name fast --marker "not slow"          # run the fast subset, print the table
    python benchmarks/suite_times.py --name fast --marker "not slow" --update  # ... and rewrite docs/development.md
    python benchmarks/suite_times.py --name full --from-log ci.log --update   # a log of `pytest --durations=N`

Each table of docs/development.md sits between ``<!-- test-times:<name> -->`` and ``<!-- /test-times:<name> -->``
and records the command, the counts, the wall time, the machine (CPU model, cores, load when the run started), the
date and the library versions, then the slowest tests (from ``--durations``). A run on a busy machine says so: the
load average is part of the table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine.py beside this script
from machine import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "development.md"

_SUMMARY = re.compile(r"^=*\s*(?P<counts>(?:\d+ \w+(?:, )?)+) in (?P<seconds>[\d.]+)s", re.M)
_DURATION = re.compile(r"^(?P<seconds>[\d.]+)s (?P<phase>call|setup|teardown)\s+(?P<test>\S+)", re.M)


def _versions() -> str:
    found = []
    for name in ("torch", "lightning", "timm", "triton"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def parse(log: str) -> tuple[dict[str, int], float, list[tuple[float, str, str]]]:
    """The counts (``{"passed": 1433, ...}``), the wall seconds and the ``(seconds, phase, test)`` durations of a
    pytest log.

    Raises:
        ValueError: the log has no pytest summary line.
    """
    matches = list(_SUMMARY.finditer(log))
    if not matches:
        raise ValueError("no pytest summary line ('N passed ... in S s') in the log")
    last = matches[-1]
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (\w+)", last.group("counts"))}
    durations = [(float(m.group("seconds")), m.group("phase"), m.group("test")) for m in _DURATION.finditer(log)]
    return counts, float(last.group("seconds")), durations


def table(name: str, command: str, log: str, load: str, slowest: int) -> str:
    """The markdown block of one run (counts, time, machine, slowest tests)."""
    counts, seconds, durations = parse(log)
    minutes, rest = divmod(round(seconds), 60)
    lines = [
        "| Subset | Command | Tests | Wall time | Machine | Date | Versions |",
        "|---|---|---|---|---|---|---|",
        f"| {name} | `{command}` | {', '.join(f'{n} {w}' for w, n in counts.items())} | {minutes} min {rest:02d} s "
        f"| {cpu_model()}, {os.cpu_count()} cores, load {load} at the start | {datetime.date.today().isoformat()} "
        f"| Python {platform.python_version()}, {_versions()} |",
    ]
    if durations and slowest > 0:
        lines += ["", f"Slowest {min(slowest, len(durations))} (setup and call phases):", "",
                  "| Seconds | Phase | Test |", "|---|---|---|"]
        lines += [f"| {s:.1f} | {phase} | `{test}` |" for s, phase, test in sorted(durations, reverse=True)[:slowest]]
    return "\n".join(lines)


def update(page: Path, name: str, block: str) -> None:
    """Replaces the block between the ``test-times:<name>`` markers of ``page``.

    Raises:
        ValueError: the page has no such markers.
    """
    begin, end = f"<!-- test-times:{name} -->", f"<!-- /test-times:{name} -->"
    text = page.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{page} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    page.write_text(f"{head}{begin}\n{block}\n{end}{tail}")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="the table's name in docs/development.md (fast, full)")
    parser.add_argument("--marker", default=None, help='pytest -m expression, e.g. "not slow"')
    parser.add_argument("--from-log", type=Path, default=None, help="read this pytest log instead of running")
    parser.add_argument("--load", default=None, help="the load average of the logged run (with --from-log)")
    parser.add_argument("--durations", type=int, default=15, help="how many of the slowest tests to list")
    parser.add_argument("--update", action="store_true", help="rewrite the table in docs/development.md")
    args = parser.parse_args(argv)
    command = "python -m pytest -q" + (f' -m "{args.marker}"' if args.marker else "") + f" --durations={args.durations}"
    if args.from_log is not None:
        log, load = args.from_log.read_text(), args.load or "unknown"
    else:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        cmd = [sys.executable, "-m", "pytest", "-q", f"--durations={args.durations}", "-p", "no:cacheprovider"]
        if args.marker:
            cmd += ["-m", args.marker]
        log = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False).stdout
    block = table(args.name, command, log, load, args.durations)
    print(block)
    if args.update:
        update(PAGE, args.name, block)


if __name__ == "__main__":
    main()
