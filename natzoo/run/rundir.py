"""Run directories: a new one per process, one writer at a time, and nothing left behind by a run that never started.

* **A new directory per process** (:func:`claim_fresh_dir`, the ``natzoo_fresh_dir`` resolver of
  ``configs/hydra/*.yaml``). Hydra names a run directory after the second it started in, so two runs of one
  ``run_name`` started in the same second got the same directory. The resolver creates the directory itself with
  ``os.mkdir``, which fails when another process got there first; it then takes ``<timestamp>_2``, ``_3``, ... One
  process always gets the same answer for the same name (Hydra resolves the run directory more than once).
* **One writer** (:class:`RunDirLock`). A training run holds an exclusive lock on ``<run dir>/.natzoo.lock``
  (``fcntl.flock``; the operating system releases it when the process ends, however it ends). A second run into the
  same directory (two resumes of one run, or ``hydra.run.dir`` given twice) is refused with
  :class:`RunDirectoryBusy`, naming the holder.
* **Unique temporary files** (:func:`natzoo.ownership.write_atomically`): results (``curves.png``, ``eval.json``, a
  rewritten ``metrics.csv``) are written to a scratch file of this process (:mod:`natzoo.ownership` names), then
  moved into place, so two processes never write the same temporary file.
* **No litter** (:func:`discard_unused`). A run that fails its config check removes what was created for it: the
  directory this process claimed, when it holds nothing but Hydra's record (``.hydra/*.yaml``, ``<job>.log``) and the
  lock file; for a resumed run, only the ``.hydra/resumed_<timestamp>`` record of this attempt, which the process
  created itself (:func:`claim_record_dir`: ``resumed_<timestamp>_2``, ... when a concurrent resume took the name).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from types import FrameType, TracebackType

__all__ = ["RunDirLock", "RunDirectoryBusy", "claim_fresh_dir", "claim_record_dir", "discard_unused",
           "release_other_claims"]

LOCK_NAME = ".natzoo.lock"

# candidate name -> (claimed directory, parent directories this process created for it)
_CLAIMED: dict[str, tuple[Path, list[Path]]] = {}
# (run directory, candidate record name) -> the record folder this process created under <run dir>/.hydra
_RECORDS: dict[tuple[str, str], Path] = {}


def claim_fresh_dir(candidate: str) -> str:
    """Creates a run directory no other process has: ``candidate``, else ``candidate_2``, ``candidate_3``, ...

    Args:
        candidate: The directory Hydra's pattern names (``logs/<run_name>/runs/<timestamp>``).

    Returns:
        The directory created (the same one for the same ``candidate`` within a process).

    A directory that cannot be created (a read-only log folder, a file in the way) ends the process with one
    ``Error: ...`` line (status 2) when Hydra resolves the run's own directory; in the resolutions Hydra makes while it
    merges the config groups (before the command line's ``paths.log_dir`` is applied) the name is returned unclaimed.
    """
    key = os.path.abspath(candidate)  # `./logs/x` and `logs/x` are one name
    if key in _CLAIMED:
        return str(_CLAIMED[key][0])
    base = Path(candidate)
    created = [p for p in reversed(base.parents) if str(p) not in ("", ".") and not p.exists()]
    number = 1
    while True:
        path = base if number == 1 else base.with_name(f"{base.name}_{number}")
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir()
        except FileExistsError:
            number += 1
            continue
        except OSError as err:
            if not _resolving_the_job_directory():
                return candidate
            # Raised inside Hydra's resolver, an exception ends in ~110 lines of Hydra's own failing formatter.
            print(f"Error: cannot create the run directory {path}: {err.strerror or err}; set paths.log_dir to a "
                  "folder you can write to (or hydra.run.dir)", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        if not _CLAIMED:
            atexit.register(_remove_empty_claims)
        _CLAIMED[key] = (path, created)
        return str(path)


def _resolving_the_job_directory() -> bool:
    """Whether Hydra is resolving the directory of the job it is about to run (``run_job``; a sweep's ``launch``)
    rather than composing the config."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in ("run_job", "launch") and "hydra" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def release_other_claims(keep: str | os.PathLike) -> None:
    """Removes the directories this process claimed other than ``keep`` (the run's own), when they are still empty.

    Hydra evaluates the run directory's resolver while it merges the config groups, before the command line's
    overrides are applied (``paths.log_dir``, a ``model=`` that changes ``run_name``); those claims are not the run's
    and would stay behind, empty, after a ``kill -9``. A run calls this as soon as it knows its directory.
    """
    kept = Path(keep).resolve()
    others = {key: claim for key, claim in _CLAIMED.items() if claim[0].resolve() != kept}
    _remove_if_empty(others.values())
    own = next((created for path, created in _CLAIMED.values() if path.resolve() == kept), None)
    for key, (path, created) in others.items():
        if not path.exists():
            if own is not None:
                # Parents created for that claim which now hold the run's own directory (the clock's second turned
                # between the two claims): they go with the run's directory when it is discarded.
                shared = [p for p in created if p.is_dir() and kept.is_relative_to(p.resolve())]
                own[:] = sorted({*own, *shared}, key=lambda p: len(p.resolve().parts))
            del _CLAIMED[key]


def _remove_if_empty(claims: Iterable[tuple[Path, list[Path]]]) -> None:
    """Removes the claimed directories that are empty, then the parents created for them that are empty (deepest
    first: several claims of one process can share the parents the first one created)."""
    claims = list(claims)
    for path, _ in claims:
        with contextlib.suppress(OSError):
            path.rmdir()  # only an empty directory goes
    parents = {parent for _, created in claims for parent in created}
    for parent in sorted(parents, key=lambda p: len(p.resolve().parts), reverse=True):
        with contextlib.suppress(OSError):
            parent.rmdir()


def claim_record_dir(run_dir: str | os.PathLike, name: str) -> str:
    """Creates the Hydra record folder of a resumed run, ``<run dir>/.hydra/<name>`` (``<name>_2``, ... when another
    process took it), so that two resumes started in the same second never share (or delete) one record.

    Args:
        run_dir: The run directory the resumed run continues in.
        name: The record's folder name (``resumed_<timestamp>``).

    Returns:
        Hydra's ``output_subdir`` relative to the run directory (``.hydra/<name>`` or ``.hydra/<name>_<n>``); the same
        one for the same arguments within a process.
    """
    key = (str(Path(run_dir).resolve()), name)
    if key not in _RECORDS:
        hydra_dir = Path(key[0]) / ".hydra"
        number = 1
        while True:
            path = hydra_dir / (name if number == 1 else f"{name}_{number}")
            try:
                path.mkdir()
            except FileExistsError:
                number += 1
                continue
            break
        _RECORDS[key] = path
    return f".hydra/{_RECORDS[key].name}"


def _remove_empty_claims() -> None:
    """At exit: removes each directory this process claimed and never wrote into (``--cfg job``, ``--help``, a
    process that stopped while composing), with the parents it created for it when they are empty too."""
    _remove_if_empty(_CLAIMED.values())


def _claimed_by_this_process(directory: Path) -> list[Path] | None:
    for path, parents in _CLAIMED.values():
        if path.resolve() == directory.resolve():
            return parents
    return None


def _only_hydra_record(directory: Path) -> bool:
    """Whether ``directory`` holds nothing but Hydra's record of a run (no result of any kind)."""
    for entry in directory.iterdir():
        if entry.is_symlink():
            return False
        if entry.name == ".hydra" and entry.is_dir():
            if not _only_yaml(entry):
                return False
        elif not (entry.is_file() and (entry.suffix == ".log" or entry.name == LOCK_NAME)):
            return False
    return True


def _only_yaml(directory: Path) -> bool:
    return all(not e.is_symlink() and e.is_file() and e.suffix == ".yaml" for e in directory.iterdir())


def _remove_record(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir():
            for item in entry.iterdir():
                item.unlink()
            entry.rmdir()
        else:
            entry.unlink()
    directory.rmdir()


def discard_unused(output_dir: str | os.PathLike, hydra_subdir: str | None = None) -> bool:
    """Removes what was created for a run that stopped before it wrote anything (a failed config check).

    Only what this process provably created goes: a directory it claimed (:func:`claim_fresh_dir`) that holds nothing
    but Hydra's record, with the parents it created for it when they are empty; or, in a directory that existed
    before (a resumed run), the ``.hydra/resumed_<timestamp>`` record of this attempt when it holds only YAML files.

    Args:
        output_dir: The run directory.
        hydra_subdir: Hydra's ``output_subdir`` of this run (None outside Hydra).

    Returns:
        Whether anything was removed.
    """
    directory = Path(output_dir)
    if not directory.is_dir():
        return False
    parents = _claimed_by_this_process(directory)
    if parents is not None:
        if not _only_hydra_record(directory):
            return False
        _remove_record(directory)
        for parent in reversed(parents):
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
        return True
    if hydra_subdir and Path(hydra_subdir).name.startswith("resumed_"):
        record = directory / hydra_subdir
        if not any(claimed.resolve() == record.resolve() for claimed in _RECORDS.values()):
            return False  # another process's record (a concurrent resume started in the same second)
        if record.is_dir() and not record.is_symlink() and _only_yaml(record):
            for item in record.iterdir():
                item.unlink()
            record.rmdir()
            return True
    return False


class RunDirectoryBusy(RuntimeError):
    """Another process is writing into the run directory."""


class RunDirLock:
    """Exclusive lock of a run directory for one writer (a context manager; re-acquiring in one process fails too).

    Args:
        directory: The run directory (created if missing).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock and records this process in the lock file.

        Raises:
            RunDirectoryBusy: another process holds it (the message names the directory and the holder).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except OSError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirectoryBusy(
                f"run directory {self.directory} is in use by {holder}; two runs writing into one directory would mix "
                "their metrics.csv and overwrite each other's checkpoints. Wait for that run to end (or stop it), or "
                "start a separate run (a fresh run gets its own directory)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"natzoo run pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Releases the lock (the file stays: removing it would let two processes lock different files)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


def _lock(fd: int) -> None:
    """Non-blocking exclusive lock of ``fd``; ``OSError`` when another open file description holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
