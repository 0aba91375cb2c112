"""What natzoo writes and what it may delete: the one home of its atomic file writes (:func:`write_atomically`),
scratch names (used by every folder replacement) and generated folders (:class:`GeneratedFolder`). It deletes only
files and folders it can show it wrote itself, and the leftovers of its own crashes.

Two kinds of proof are used (docs/reliability.md describes the guarantees built on them):

* **Scratch names.** Temporary checkpoint files and half-written or half-deleted generated datasets are named
  ``.<base>.natzoo-<kind>.<host>.<pid>.<random>`` (``.tmp`` appended for files). A later run removes such an entry
  only when its name says it was made on this host by a process that no longer exists, and, for a folder, only when
  every entry inside is one the generator writes (checked by name; symbolic links are never followed or accepted).
* **Ownership by listing.** A generator describes what it writes with a predicate on relative POSIX paths (folders
  end in ``/``); :func:`scan_tree` splits a folder into the files the predicate accepts and everything else.
  Anything else makes the folder foreign, and foreign folders are never deleted.

On these rules :class:`GeneratedFolder` builds the one protocol of generated datasets: generate in a scratch
folder, write a record (the generator, its parameters and every file with its size) last, rename the folder into
place; reuse a folder whose record matches and whose listed files are all there with their sizes; replace or delete
only a folder that holds nothing but the files its record lists.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

if sys.platform != "win32":
    import fcntl  # flock: the lock of GeneratedFolder.exclusive (without it, generated folders are made unlocked)

__all__ = [
    "GeneratedFolder",
    "Survey",
    "abandoned_scratch",
    "delete_scanned",
    "scan_tree",
    "scratch_prefix",
    "sweep_abandoned",
    "write_atomically",
]

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


def write_atomically(path: str | os.PathLike, write: Callable[[IO[Any]], object], mode: str = "w",
                     fsync: bool = False) -> None:
    """Writes ``path`` through ``write(handle)`` into a scratch file of this process beside it (a scratch name of
    kind ``tmp``), then ``os.replace``; on failure the scratch file is removed and ``path`` is unchanged.

    Args:
        path: The destination (its folder is created).
        write: Writes the content into the open handle.
        mode: ``"w"`` (text, newline translation off) or ``"wb"``.
        fsync: Flush the file to disk before the rename (checkpoints: a crash never leaves a truncated file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=scratch_prefix(path.name, "tmp"), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, newline=None if "b" in mode else "") as handle:
            write(handle)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


@dataclass(frozen=True)
class Survey:
    """What a generated folder holds compared with its record (see :meth:`GeneratedFolder.survey`).

    Attributes:
        files: Listed files present (relative path -> size in bytes), and the record itself.
        foreign: Entries the record does not list (paths relative to the folder, folders with a trailing ``/``).
        missing: Listed files that are absent.
        changed: Listed files present with another size than recorded.
    """

    files: dict[str, int]
    foreign: list[str]
    missing: list[str]
    changed: list[str]


@dataclass(frozen=True)
class GeneratedFolder:
    """The protocol of one dataset generator: generate in scratch, record last, reuse if complete, delete only its own.

    The record is a JSON file in the folder, ``{"generator": <generator>, <the record's other keys>, "files":
    {relative path: size}}``, written after every other file. A folder is this generator's when its record names
    ``generator`` and lists only paths ``owns`` accepts; it is complete for the wanted parameters when the record
    holds them (key by key) and every listed file is there with the recorded size.

    Attributes:
        generator: Identifier written in the record (kept stable so existing folders stay recognised).
        record_name: File name of the record inside the folder.
        owns: Predicate on the relative POSIX paths the generator writes, the record included (folders with a
            trailing ``/``).
    """

    generator: str
    record_name: str
    owns: Callable[[str], bool]

    def read_record(self, root: Path) -> Any:
        """The record file of ``root`` as written (any JSON value; :meth:`listed_files` says whether it is ours).

        Raises:
            FileNotFoundError: ``root`` has no record.
            OSError: it cannot be read.
            ValueError: it is not JSON.
        """
        return json.loads((Path(root) / self.record_name).read_text())

    def listed_files(self, record: Any) -> dict[str, int] | None:
        """Files a record of this generator lists (path -> size), or None when the record is not this generator's."""
        if not isinstance(record, dict) or record.get("generator") != self.generator:
            return None
        files = record.get("files")
        if not isinstance(files, dict):
            return None
        if not all(self.owns(k) and isinstance(v, int) and not isinstance(v, bool) for k, v in files.items()):
            return None
        return dict(files)

    @staticmethod
    def matches(record: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
        """Whether the record holds every key of ``wanted`` with that value."""
        return all(record.get(k) == v for k, v in wanted.items())

    def survey(self, root: Path, listed: Mapping[str, int]) -> Survey:
        """Compares the folder ``root`` with the files its record lists (``listed``, from :meth:`listed_files`)."""
        dirs = {rel[: i + 1] for rel in listed for i, ch in enumerate(rel) if ch == "/"}
        files, foreign = scan_tree(Path(root), lambda rel: rel in listed or rel in dirs or rel == self.record_name)
        missing = [rel for rel in listed if rel not in files]
        changed = [rel for rel, size in listed.items() if rel in files and files[rel] != size]
        return Survey(files, foreign, missing, changed)

    def is_complete(self, root: Path, wanted: Mapping[str, Any]) -> bool:
        """Whether ``root`` holds this generator's record for ``wanted`` and every file it lists, with the recorded
        sizes (other files are not looked at)."""
        try:
            record = self.read_record(root)
        except (OSError, ValueError):
            return False
        listed = self.listed_files(record)
        if listed is None or not self.matches(record, wanted):
            return False
        survey = self.survey(root, listed)
        return not survey.missing and not survey.changed

    def sweep(self, root: Path) -> None:
        """Removes the scratch folders of interrupted generations and replacements of ``root`` (this host only)."""
        root = Path(root)
        for kind in ("partial", "stale"):
            sweep_abandoned(root.parent, kind, self.owns, base=root.name)

    def generate(self, root: Path, record: Mapping[str, Any], fill: Callable[[Path], None]) -> Path:
        """Writes a new folder ``root`` (absent, or an empty folder): ``fill`` writes the files into a scratch sibling,
        then the record (``record`` plus the generator and the file list) is written and the folder renamed into place,
        so an interrupted generation never leaves a folder that looks complete.

        If the rename fails because another process (another rank, a concurrent run) put the same dataset there
        first, its copy is used when :meth:`is_complete` for ``record``. The scratch folder is removed on every exit,
        when it holds only what the generator writes.

        Raises:
            OSError: the rename failed and ``root`` is not a complete copy.
        """
        root = Path(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=scratch_prefix(root.name, "partial"), dir=root.parent))
        try:
            fill(scratch)
            files, _ = scan_tree(scratch, self.owns)
            full = {"generator": self.generator, **record, "files": files}
            (scratch / self.record_name).write_text(json.dumps(full, indent=1) + "\n")
            try:
                os.replace(scratch, root)
            except OSError:
                if not self.is_complete(root, record):
                    raise
        finally:
            if scratch.exists():
                files, foreign = scan_tree(scratch, self.owns)
                if not foreign:
                    delete_scanned(scratch, files)
        return root

    def remove(self, root: Path, survey: Survey) -> None:
        """Deletes the folder ``root`` whose :meth:`survey` found nothing foreign: it is first renamed to a scratch
        name (so an interrupted deletion is finished by a later :meth:`sweep`), the record deleted last.

        Raises:
            ValueError: the survey found foreign entries (nothing is deleted).
        """
        if survey.foreign:
            raise ValueError(f"{root} holds entries its record does not list ({', '.join(survey.foreign[:3])})")
        root = Path(root)
        stale = Path(tempfile.mkdtemp(prefix=scratch_prefix(root.name, "stale"), dir=root.parent))
        try:
            os.replace(root, stale)
        except FileNotFoundError:
            # Another process removed it first (one without the lock of exclusive()): the job is done.
            stale.rmdir()
            return
        delete_scanned(stale, survey.files, last=self.record_name)

    @contextmanager
    def exclusive(self, root: Path) -> Iterator[None]:
        """Holds the lock of ``root`` on this host: processes that check, replace or generate the same folder inside
        this block take turns, so the second one finds (and reuses) what the first one made.

        The lock is ``flock`` on the file ``.<name>.natzoo-lock`` beside ``root``. natzoo creates it with a fixed
        content by a hard link (so it never exists without that content) and the holder deletes it, when it still
        holds that content, before releasing the lock (also one a killed holder left); a process that waited on a
        deleted file takes the lock on the new one. Where the lock cannot be taken (no ``fcntl``, a file system
        without ``flock``, a lock path that is not a regular file) the block runs without it, with a warning (none
        where the folder cannot be written, which is then only read).
        """
        root = Path(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        path = root.parent / f".{root.name}.natzoo-lock"
        try:
            fd = _lock_file(path, root)
        except OSError as exc:
            # A folder this process cannot write into is only read (nothing there can be replaced): no warning then.
            quiet = exc.errno in (errno.EACCES, errno.EROFS)
            log.log(logging.DEBUG if quiet else logging.WARNING, "working on %s without the lock %s: %s", root, path,
                    exc)
            fd = None
        try:
            yield
        finally:
            if fd is not None:
                try:
                    if os.pread(fd, len(_LOCK_TEXT) + 1, 0) == _LOCK_TEXT:
                        os.remove(path)  # before the unlock, so a waiter sees that the file it locked was deleted
                finally:
                    os.close(fd)


_LOCK_TEXT = b"natzoo: lock of a generated folder\n"


def _create_lock_file(path: Path) -> None:
    """Creates ``path`` holding ``_LOCK_TEXT`` unless it exists (a hard link of a scratch file of kind ``tmp``)."""
    sweep_abandoned(path.parent, "tmp", base=path.name)
    fd, tmp = tempfile.mkstemp(prefix=scratch_prefix(path.name, "tmp"), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(_LOCK_TEXT)
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.remove(tmp)


def _lock_file(path: Path, root: Path) -> int:
    """Opens (creating it if absent) and ``flock``s ``path``; returns its descriptor.

    Raises:
        OSError: the lock cannot be taken.
    """
    if sys.platform == "win32":
        raise OSError("flock is not available on Windows")
    while True:
        _create_lock_file(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # its holder deleted it between the two calls
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{path} is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process working on %s", root)
                fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)  # the file we waited on was deleted by its holder: lock the current one
