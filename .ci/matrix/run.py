"""The version-matrix step of CI: the supported (Python, torch, Triton) pairs that the main suite does not run.

Usage (from the repository root; `.ci/run` calls it after the main suite)::

    python .ci/matrix/run.py               # every pair
    python .ci/matrix/run.py --pair py3.12-torch2.11-triton3.6 --pair current
    python .ci/matrix/run.py --list

Each pair is a requirements file here (`<pair>.txt`: exact pins, `# python: X.Y` names the interpreter, a line
ending in `# no-deps` is installed afterwards with ``--no-deps``). Its virtual environment is built under
``$NATZOO_CI_CACHE`` (default ``~/.cache/natzoo-ci``) in a folder keyed by the SHA-256 of the file, the
interpreter's version and this script's `VENV_FORMAT`, and reused while those stay the same; a folder of an older key
of the same pair is removed (only folders carrying this script's marker). pip's own cache keeps the wheels.

In each pair's environment (the repository on ``PYTHONPATH``, nothing installed from it) it runs `STEPS`: the
compat tests, the CUDA-path stand-in tests, the kit's dry run (precompile workers included) and a subset of the
Triton-interpreter op tests; the ahead-of-time compile of the search-space kernels for sm_90; mypy over the code
that calls torch and Triton. The ``current`` pair is this interpreter's own environment (today's pair, which the
main suite already tests): only the AOT compile, which the main suite lacks. docs/versions.md says why each piece
runs where it does. Exit status 1 if any step of any pair failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VENV_FORMAT = "1"  # bump to rebuild every cached environment
OWNER_MARK = ".natzoo-ci-venv"  # written first: this script created the folder (and may remove it)
DONE_MARK = ".natzoo-ci-complete"  # written last: the environment is fully installed

# Interpreter op tests per extra pair (forward, backward and rpb gradient against the float64 oracle): one case per
# rank with rpb and causal or dilated windows, 16-bit inputs, the non-finite rerun path, the deterministic rpb
# gradient and torch.compile. The whole file (tests/test_triton.py, about 5 min) runs in the main suite.
OP_TESTS = [f"tests/test_triton.py::{test}" for test in (
    "test_matches_oracle_fp32[n1-L13-k3-s1-d4-c0-rpb]",
    "test_matches_oracle_fp32[n2-L9x11-k3x4-s1x1-d2x1-c01-rpb]",
    "test_matches_oracle_fp32[n3-L4x6x5-k2x3x3-s1x1x1-d2x1x1-c001-rpb]",
    "test_half_precision_with_fp32_rpb[n2-L6x7-k3x2-d2x1-c01-bf16]",
    "test_non_finite_key_or_value_stays_in_its_neighbourhood[v-nan]",
    "test_deterministic_drpb_matches_oracle",
    "test_torch_compile_fullgraph",
)]
TESTS = ["tests/test_triton_compat.py", "tests/test_cuda_paths.py", "tests/test_ops_failsafe.py",
         "tests/test_gpu_kit.py"]
# Ahead-of-time compile for sm_90 (benchmarks/aot_compile_check.py, first config of each launch): each binary costs
# 10-50 s of CPU, so each pair compiles the forward, dQ and dK/dV kernels of one 1-D, one 2-D and one 3-D problem (9
# binaries); the current pair adds the 64-bit-offset, dilated NAT, head-dim-128 and deterministic variants.
AOT_CASES = ["nat 7x7 h16", "1d k13 d3 fp16", "3d mixed rpb"]
AOT_CASES_CURRENT = [*AOT_CASES, "dinat 56x56", "int64", "2d hd128", "nat deterministic"]
MYPY_FILES = ["natzoo/ops", "benchmarks/triton_aot.py", "benchmarks/aot_compile_check.py", "benchmarks/static_cost.py",
              "benchmarks/gpu_kit.py", "benchmarks/bench_op.py"]


def pairs() -> dict[str, Path | None]:
    found: dict[str, Path | None] = {p.stem: p for p in sorted(HERE.glob("*.txt"))}
    found["current"] = None
    return found


def python_for(version: str) -> str:
    """An interpreter of `version` (``3.12``): pyenv's newest ``X.Y.*``, else ``pythonX.Y`` on PATH."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for candidate in sorted(root.glob(f"{version}.*"), key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)],
                            reverse=True):
        exe = candidate / "bin" / f"python{version}"
        if exe.exists():
            return str(exe)
    found = shutil.which(f"python{version}")
    if found is None:
        raise SystemExit(f"matrix: no Python {version} found (pyenv versions or python{version} on PATH)")
    return found


def parse(path: Path) -> tuple[str, list[str], list[str]]:
    """(python version, requirements, no-deps requirements) of a pair file."""
    python, reqs, nodeps = "", list[str](), list[str]()
    for line in path.read_text().splitlines():
        match = re.match(r"#\s*python:\s*(\S+)", line)
        if match:
            python = match.group(1)
        body = line.split("#", 1)[0].strip()
        if body:
            (nodeps if re.search(r"#\s*no-deps\s*$", line) else reqs).append(body)
    if not python:
        raise SystemExit(f"matrix: {path.name} has no '# python: X.Y' line")
    return python, reqs, nodeps


def call(cmd: list[str], out: IO[str], env: dict[str, str] | None = None) -> tuple[int, float]:
    """Runs `cmd` from the repository root with output to `out`: its exit status and CPU seconds (its own and its
    children's: on a busy machine the CPU time says more about the cost than the wall time)."""
    out.write("$ " + " ".join(cmd) + "\n")
    out.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def run(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float, str]:
    """Runs `cmd` into `log`: its status, CPU seconds and a short excerpt of the log for the report."""
    with open(log, "w") as out:
        rc, cpu = call(cmd, out, env)
    lines = log.read_text(errors="replace").splitlines()
    return rc, cpu, "\n".join("    " + line for line in lines[-(40 if rc else 3):])


def venv_for(name: str, path: Path, cache: Path, log: Path) -> tuple[Path, float, float | None]:
    """The pair's environment (built if missing): its python, and the wall and CPU seconds spent building it (CPU
    None: it was cached)."""
    version, reqs, nodeps = parse(path)
    base = python_for(version)
    full = subprocess.run([base, "-c", "import sys; print(sys.version)"], capture_output=True, text=True,
                          check=True).stdout.strip()
    key = hashlib.sha256(path.read_bytes() + full.encode() + VENV_FORMAT.encode()).hexdigest()[:12]
    home = cache / "venvs"
    target = home / f"{name}-{key}"
    python = target / "bin" / "python"
    for old in home.glob(f"{name}-*"):
        if old != target and (old / OWNER_MARK).exists():
            shutil.rmtree(old)  # the environment of an older key of this pair
    if (target / DONE_MARK).exists():
        return python, 0.0, None
    if target.exists():
        if not (target / OWNER_MARK).exists():
            raise SystemExit(f"matrix: {target} exists and was not made by this script; remove it yourself")
        shutil.rmtree(target)  # an interrupted build of ours
    start = time.monotonic()
    target.mkdir(parents=True)
    (target / OWNER_MARK).write_text(f"created by .ci/matrix/run.py for {path.name}\n")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    cpu = 0.0
    with open(log, "w") as out:
        for cmd in ([base, "-m", "venv", str(target)], pip + reqs, pip + ["--no-deps"] + nodeps if nodeps else []):
            if cmd:
                rc, seconds = call(cmd, out)
                cpu += seconds
                if rc:
                    raise subprocess.CalledProcessError(rc, cmd)
    (target / DONE_MARK).write_text(full + "\n")
    return python, time.monotonic() - start, cpu


def steps(python: str, name: str, cache: Path) -> list[tuple[str, list[str]]]:
    mypy_cache = str(cache / "mypy" / name)
    if name == "current":
        return [("aot compile sm_90", [python, "benchmarks/aot_compile_check.py", *_only(AOT_CASES_CURRENT)])]
    return [
        ("versions", [python, "-c", "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, "
                                    "triton.__version__)"]),
        ("tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "900", *TESTS]),
        ("interpreter op tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "900",
                                  *OP_TESTS]),
        ("aot compile sm_90", [python, "benchmarks/aot_compile_check.py", *_only(AOT_CASES)]),
        ("mypy", [python, "-m", "mypy", "--cache-dir", mypy_cache, *MYPY_FILES]),
    ]


def _only(cases: list[str]) -> list[str]:
    return [arg for case in cases for arg in ("--only", case)]


def run_pair(name: str, path: Path | None, cache: Path, base_env: dict[str, str]) -> tuple[list[tuple], str]:
    """Builds (or reuses) the pair's environment and runs its steps: the summary rows and the report text."""
    logs = cache / "logs"
    rows: list[tuple] = []
    text = [f"== {name}"]
    python, built, cpu = sys.executable, 0.0, None
    if path is not None:
        try:
            python_path, built, cpu = venv_for(name, path, cache, logs / f"{name}-environment.log")
        except subprocess.CalledProcessError as exc:
            text.append(f"  environment build failed ({exc}); see {logs / f'{name}-environment.log'}")
            return [(name, "environment", "FAILED", 0.0, 0.0)], "\n".join(text)
        python = str(python_path)
    rows.append((name, "environment", "cached" if cpu is None else "built", built, cpu or 0.0))
    # Triton's on-disk cache per pair: a binary is rebuilt when its source, options or the Triton version change.
    env = dict(base_env, TRITON_CACHE_DIR=str(cache / "triton" / name))
    for label, cmd in steps(python, name, cache):
        start = time.monotonic()
        rc, cpu_s, excerpt = run(cmd, env, logs / f"{name}-{label.replace(' ', '_')}.log")
        rows.append((name, label, "ok" if rc == 0 else f"FAILED ({rc})", time.monotonic() - start, cpu_s))
        text.append(f"  {label}: {'ok' if rc == 0 else 'FAILED'}\n{excerpt}")
    return rows, "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CI version matrix")
    parser.add_argument("--pair", action="append", help="run only this pair (repeatable); see --list")
    parser.add_argument("--list", action="store_true", help="list the pairs and exit")
    parser.add_argument("--jobs", type=int, default=2, help="pairs run at once (default 2, one per CI core)")
    args = parser.parse_args(argv)
    known = pairs()
    if args.list:
        for name, path in known.items():
            print(name, "(this interpreter)" if path is None else f"(python {parse(path)[0]})")
        return 0
    chosen = args.pair or list(known)
    unknown = [p for p in chosen if p not in known]
    if unknown:
        raise SystemExit(f"matrix: unknown pair(s) {unknown}; known: {list(known)}")
    cache = Path(os.environ.get("NATZOO_CI_CACHE", Path.home() / ".cache" / "natzoo-ci"))
    (cache / "logs").mkdir(parents=True, exist_ok=True)
    # The repository on the path (nothing installed from it); one thread per process, as pairs run side by side.
    base_env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    base_env.pop("TRITON_INTERPRET", None)  # the tests' conftest turns it on; the AOT compile needs it off
    print(f"== version matrix: {', '.join(chosen)} ({args.jobs} at a time; logs in {cache / 'logs'})", flush=True)
    total = time.monotonic()
    summary: list[tuple] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_pair, name, known[name], cache, base_env) for name in chosen]
        for future in concurrent.futures.as_completed(futures):
            rows, text = future.result()
            summary.extend(rows)
            print(text, flush=True)
    print(f"\n== matrix on {platform.node()} ({os.cpu_count()} CPUs): {time.monotonic() - total:.0f} s wall, "
          f"{sum(row[4] for row in summary):.0f} s CPU")
    order = {name: i for i, name in enumerate(chosen)}
    print(f"{'pair':32s} {'step':22s} {'status':12s} {'wall s':>8s} {'CPU s':>8s}")
    for name, label, status, seconds, cpu in sorted(summary, key=lambda row: order[row[0]]):
        print(f"{name:32s} {label:22s} {status:12s} {seconds:8.1f} {cpu:8.1f}")
    return 1 if any(row[2] not in ("ok", "cached", "built") for row in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
