"""What natzoo may delete: only files and folders it can show it wrote itself, and the leftovers of its own crashes.

Two kinds of proof are used (docs/reliability.md describes the guarantees built on them):

* **Scratch names.** Temporary checkpoint files and half-written or half-deleted generated datasets are named
  ``.<base>.natzoo-<kind>.<host>.<pid>.<random>`` (``.tmp`` appended for files). A later run removes such an entry
  only when its name says it was made on this host by a process that no longer exists, and, for a folder, only when
  every entry inside is one the generator writes (checked by name; symbolic links are never followed or accepted).
* **Ownership by listing.** A generator describes what it writes with a predicate on relative POSIX paths (folders
  end in ``/``); :func:`scan_tree` splits a folder into the files the predicate accepts and everything else.
  Anything else makes the folder foreign, and foreign folders are never deleted.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["abandoned_scratch", "delete_scanned", "scan_tree", "scratch_prefix", "sweep_abandoned"]

log = logging.getLogger(__name__)

_SCRATCH_NAME = re.compile(
    r"^\.(?P<base>.+)\.natzoo-(?P<kind>[a-z]+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+(?:\.tmp)?$"
)


def _host() -> str:
    # Dots separate the fields of a scratch name, so the host keeps only letters, digits and dashes.
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "localhost"


def scratch_prefix(base: str, kind: str) -> str:
    """Name prefix (for ``tempfile.mkstemp``/``mkdtemp``) of a scratch entry for ``base`` made by this process.

    Args:
        base: Name of the file or folder the scratch entry stands in for.
        kind: Lower-case word saying what the entry is (``tmp``, ``partial``, ``stale``).
    """
    if not re.fullmatch(r"[a-z]+", kind):
        raise ValueError(f"kind must be lower-case letters, got {kind!r}")
    return f".{base}.natzoo-{kind}.{_host()}.{os.getpid()}."


def _process_exists(pid: int) -> bool:
    if pid <= 0 or os.name != "posix":
        # os.kill(0, ...) addresses the process group, and on Windows os.kill terminates the process: never probe
        # there, so such names are never treated as abandoned.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but belongs to another user, or cannot be checked: keep its files
    return True


def abandoned_scratch(directory: Path, kind: str, base: str | None = None) -> list[Path]:
    """Scratch entries of ``kind`` (and ``base``, if given) in ``directory`` whose process on this host has exited.

    Entries made on another host or by a running process (another rank, a concurrent run) are not listed.
    """
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    host = _host()
    found = []
    for name in names:
        match = _SCRATCH_NAME.match(name)
        if match is None or match["kind"] != kind or (base is not None and match["base"] != base):
            continue
        if match["host"] == host and not _process_exists(int(match["pid"])):
            found.append(Path(directory) / name)
    return found


def scan_tree(root: Path, owns: Callable[[str], bool]) -> tuple[dict[str, int], list[str]]:
    """Splits the folder ``root`` into the files ``owns`` accepts and everything it does not.

    Symbolic links and entries other than regular files and folders are always foreign; foreign folders are not
    entered. An entry that cannot be read counts as foreign.

    Args:
        root: Folder to scan (not followed if it is a symbolic link: the caller decides about ``root`` itself).
        owns: Predicate on paths relative to ``root`` in POSIX form; folders are asked with a trailing ``/``.

    Returns:
        ``({relative path: size in bytes} of the accepted files, [relative paths of foreign entries])``.
    """
    root = Path(root)
    files: dict[str, int] = {}
    foreign: list[str] = []

    def unreadable(error: OSError) -> None:
        foreign.append(os.path.relpath(error.filename, root) if error.filename else str(error))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        prefix = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        keep = []
        for name in sorted(dirnames):
            full = os.path.join(dirpath, name)
            if not os.path.islink(full) and owns(prefix + name + "/"):
                keep.append(name)
            else:
                foreign.append(prefix + name + ("" if os.path.islink(full) else "/"))
        dirnames[:] = keep
        for name in sorted(filenames):
            rel = prefix + name
            try:
                info = os.lstat(os.path.join(dirpath, name))
            except OSError:
                foreign.append(rel)
                continue
            if stat.S_ISREG(info.st_mode) and owns(rel):
                files[rel] = info.st_size
            else:
                foreign.append(rel)
    return files, foreign


def delete_scanned(root: Path, files: Iterable[str], last: str | None = None) -> None:
    """Deletes ``files`` (relative to ``root``; missing ones are skipped), then the folders they leave, then ``root``.

    Folders are removed with ``rmdir``, which fails rather than delete anything that appeared after the scan.

    Args:
        root: Folder whose contents :func:`scan_tree` found to be owned.
        files: Relative paths of the files to delete.
        last: One of ``files`` to delete after all the others (the marker that says the folder is complete).
    """
    root = Path(root)
    for rel in [f for f in files if f != last] + ([last] if last is not None else []):
        try:
            os.remove(root / rel)
        except FileNotFoundError:
            pass
    for dirpath, _, _ in os.walk(root, topdown=False):
        os.rmdir(dirpath)


def sweep_abandoned(directory: Path, kind: str, owns: Callable[[str], bool] | None = None,
                    base: str | None = None) -> list[Path]:
    """Removes the scratch entries that :func:`abandoned_scratch` lists, when their contents prove them ours.

    A scratch file is removed if it is a regular file and ``owns`` is None; a scratch folder if ``owns`` is given and
    :func:`scan_tree` finds nothing foreign in it. Anything else is kept and named in a warning. Failures to delete
    are logged, never raised: cleaning up must not stop a run.

    Args:
        directory: Folder holding the scratch entries.
        kind: Scratch kind to look for.
        owns: Predicate of :func:`scan_tree` for scratch folders; None for scratch files.
        base: Only entries standing in for this name.

    Returns:
        The removed paths.
    """
    removed = []
    for path in abandoned_scratch(directory, kind, base):
        try:
            info = os.lstat(path)
            if owns is None and stat.S_ISREG(info.st_mode):
                os.remove(path)
            elif owns is not None and stat.S_ISDIR(info.st_mode):
                files, foreign = scan_tree(path, owns)
                if foreign:
                    log.warning("kept %s: it is named like an interrupted natzoo write but also holds %s", path,
                                ", ".join(foreign[:3]))
                    continue
                delete_scanned(path, files)
            else:
                continue
        except OSError as exc:
            log.warning("could not remove %s, left by an interrupted natzoo process: %s", path, exc)
            continue
        log.info("removed %s, left behind by an interrupted natzoo process", path)
        removed.append(path)
    return removed
