"""Run folders that never lose, mix or corrupt data.

Every command that writes a folder (``run``, ``eval``, ``sample``, ``distill``,
``train-teacher``, ``convert``, ``report``) goes through this module:

* :func:`lock_folder` -- one writer per folder. The lock file ``.attnbench.lock``
  holds the writer's PID (and its start time, so a reused PID is not mistaken for
  the writer); a second writer is refused with :class:`FolderLocked` naming that
  PID, and the lock of a process that no longer exists is taken over with a
  message. The lock is re-entrant within one process (``run`` writes its results,
  then its quality rows, then its report into one folder).
* :func:`claim_files` -- a file attnbench did not write is never overwritten
  without ``--force``: the names it wrote are recorded in ``.attnbench-files``.
* :func:`atomic_write` -- a temporary sibling, fsync, ``os.replace``; the
  temporary is removed on any failure, and a full disk (ENOSPC) becomes one
  :class:`DiskFull` line that says what was kept.
* :func:`append_jsonl` / :func:`read_jsonl` -- rows appended with flush + fsync;
  a partial last line (a writer killed mid-row) is cut off before the next append,
  so any number of kill/resume cycles leaves a file where every line parses.
* :func:`remove_temporaries` -- the ``.NAME.tmpPID`` files and folders left by a
  killed writer are removed when the next writer takes the lock.
* :func:`write_error` -- the one reading of a failed write: a full disk (including
  safetensors' and ``torch.save``'s own wordings of ENOSPC) and a read-only or
  forbidden destination become one line; ``cli.main`` applies it to any write that
  escapes the functions above.
* :func:`claim_output` / :func:`write_output` -- a single output file (``compare --out``,
  ``world --render``) claimed like a folder's files, then written atomically.

A leaf: it imports nothing of attnbench.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_FILE = ".attnbench.lock"
MANIFEST_FILE = ".attnbench-files"
#: the files of this module in a folder (not the user's, not the command's outputs)
BOOKKEEPING = (LOCK_FILE, MANIFEST_FILE)
#: ``.results.csv.tmp1234``, ``.checkpoint.pt.tmp99``, ``.student.tmp7`` and the older
#: ``results.csv.tmp``: what a writer killed mid-write leaves behind
TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$|^.+\.csv\.tmp$")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked: one line, exit code 2."""


class FolderLocked(RunFolderError):
    """Another live process writes this folder."""


class DiskFull(RunFolderError):
    """The disk filled up while writing; what was already written is kept."""


# --------------------------------------------------------------------------- the lock


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    now = _start_time(pid)
    if started is not None and now is not None and now != started:
        return False  # the PID was reused by an unrelated process
    return True


@dataclass
class _Held:
    path: Path
    count: int


_HELD: dict[Path, _Held] = {}


def _lock_document(command: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "started": _start_time(os.getpid()),
            "host": socket.gethostname(), "command": command,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_rank_zero() -> bool:
    """True on a plain process and on rank 0 under torchrun (the only rank that writes)."""
    return os.environ.get("RANK", "0") == "0"


def lock_folder(folder: str | Path, command: str, *, log: Callable[[str], None] | None = None
                ) -> Path | None:
    """Take the writer's lock of ``folder`` (created if needed) for this process.

    Raises :class:`FolderLocked` naming the holder's PID when another live process
    holds it; takes over, with a message, the lock of a process that is gone, and
    then removes the temporaries it left. Released by :func:`release_all` or at exit.
    Ranks other than 0 under torchrun take no lock (rank 0 holds it for the job).
    """
    if not is_rank_zero():
        return None
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{folder} is a file, not a folder: choose a folder for --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(err, folder) or RunFolderError(
            f"cannot write to run directory {folder}: {err.strerror or err}") from None
    key = folder.resolve()
    if key in _HELD:
        _HELD[key].count += 1
        return _HELD[key].path
    path = key / LOCK_FILE
    mine = json.dumps(_lock_document(command))
    for _ in range(20):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:
                continue  # released meanwhile: try again
            pid = holder.get("pid")
            host = holder.get("host")
            if isinstance(pid, int) and host in (None, socket.gethostname()) \
                    and pid != os.getpid() and _alive(pid, holder.get("started")):
                raise FolderLocked(
                    f"{folder} is being written by attnbench {holder.get('command', '?')} "
                    f"(PID {pid}, since {holder.get('since', '?')}): wait for it to finish, "
                    f"stop it, or choose another --out"
                ) from None
            if isinstance(pid, int) and host not in (None, socket.gethostname()):
                raise FolderLocked(
                    f"{folder} is locked by PID {pid} on host {host}: if that process is gone, "
                    f"remove {path}; or choose another --out"
                ) from None
            stale = path.with_name(f"{LOCK_FILE}.stale{os.getpid()}")
            try:
                os.replace(path, stale)
            except FileNotFoundError:
                continue
            stale.unlink(missing_ok=True)
            log(f"attnbench: {folder}: took over the lock of PID {pid}, which no longer runs "
                "(it was interrupted)")
            continue
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        break
    else:  # pragma: no cover - 20 lost races in a row
        raise FolderLocked(f"{folder}: could not take the lock {path}; try again")
    _HELD[key] = _Held(path, 1)
    removed = remove_temporaries(key)
    if removed:
        log(f"attnbench: {folder}: removed {len(removed)} temporary file(s) left by an "
            f"interrupted writer ({', '.join(p.name for p in removed[:3])}"
            f"{', ...' if len(removed) > 3 else ''})")
    return path


def release(folder: str | Path) -> None:
    """Give back one hold of ``folder``'s lock (removed when the last is given back)."""
    key = Path(folder).resolve()
    held = _HELD.get(key)
    if held is None:
        return
    held.count -= 1
    if held.count <= 0:
        _HELD.pop(key)
        holder = _read_lock(held.path)
        if holder and holder.get("pid") == os.getpid():
            held.path.unlink(missing_ok=True)


def release_all() -> None:
    """Remove every lock this process holds (a command's end)."""
    for key in list(_HELD):
        _HELD[key].count = 1
        release(key)


atexit.register(release_all)


def holds_lock(folder: str | Path) -> bool:
    return Path(folder).resolve() in _HELD


# --------------------------------------------------------------------------- temporaries


def temporary_path(path: str | Path) -> Path:
    """The temporary sibling ``.NAME.tmpPID`` a write of ``path`` goes through."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries of other (finished or killed) processes under ``folder``."""
    removed = []
    me = str(os.getpid())
    for root, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            match = TEMPORARY.match(name)
            if not match or match.group(1) == me:
                continue
            item = Path(root) / name
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
                dirs.remove(name)
            else:
                item.unlink(missing_ok=True)
            removed.append(item)
    return removed


# --------------------------------------------------------------------------- writing


def _disk_full(path: Path, kept: str) -> DiskFull:
    return DiskFull(f"the disk is full: {path} was not written ({kept}); free some space and "
                    "run the same command again to continue")


#: how libraries that do not raise ``OSError(ENOSPC)`` say the disk is full: safetensors'
#: ``SafetensorError`` and ``torch.save``'s inline_container ``RuntimeError``
_DISK_FULL_WORDS = ("no space left on device", "file write failed", "disk quota exceeded")


def is_disk_full(err: BaseException) -> bool:
    """True when ``err`` says the disk (or the quota) is full, whatever raised it."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(err, OSError) and err.errno is not None:
        return False
    text = str(err).lower()
    return any(word in text for word in _DISK_FULL_WORDS)


def write_error(err: BaseException, path: str | Path | None = None, *,
                kept: str = "what was written before is kept") -> RunFolderError | None:
    """The one-line error a failed write of ``path`` means, or None for another failure.

    A full disk becomes :class:`DiskFull`; a read-only file system or a destination
    this user may not write becomes a :class:`RunFolderError` naming the path.
    """
    where = Path(path) if path is not None else Path(getattr(err, "filename", None) or "?")
    if is_disk_full(err):
        return _disk_full(where, kept)
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        reason = ("the file system is read-only" if err.errno == errno.EROFS
                  else "permission denied")
        return RunFolderError(f"cannot write {where}: {reason}; choose a writable --out")
    return None


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], Any], *,
                 kept: str = "the previous version is intact") -> Path:
    """Write ``path`` through a temporary sibling renamed over it; never a half file.

    ``data`` is the content, or a function writing the temporary path it is given
    (``torch.save``, a CSV writer). The temporary is removed on any failure; ENOSPC
    raises :class:`DiskFull` (``kept`` says what survived).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        if callable(data):
            data(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as err:
        _reraise_explained(err, path, kept)
    finally:
        _remove(tmp)
    return path


def _reraise_explained(err: Exception, path: Path, kept: str) -> None:
    """Raise ``err`` as its one-line :func:`write_error`, or as it is if it is no write error."""
    explained = write_error(err, path, kept=kept)
    if explained is None:
        raise err
    raise explained from None


def atomic_folder(directory: str | Path, write: Callable[[Path], Any], *,
                  kept: str = "the previous files there are intact") -> Path:
    """Write files into ``directory`` through a staging sibling ``.NAME.tmpPID/``.

    ``write(staging)`` writes the files (a model: weights, config, reports); they are
    then renamed one by one over ``directory``'s, so a reader sees old or new files,
    never a half-written one (a sub-folder, such as a pipeline's component, is
    swapped whole). The staging folder is removed on any failure; a full
    disk or a read-only destination is one line (:func:`write_error`).
    """
    directory = Path(directory)
    staging = temporary_path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        staging.mkdir(parents=True, exist_ok=True)
        write(staging)
        for item in sorted(staging.iterdir()):
            if item.is_dir():  # a component folder (a diffusers pipeline): swapped whole
                _replace_folder(item, directory / item.name)
                continue
            with open(item, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(item, directory / item.name)
    except Exception as err:
        _reraise_explained(err, directory, kept)
    finally:
        _remove(staging)
    return directory


def _replace_folder(source: Path, target: Path) -> None:
    """Put folder ``source`` at ``target``: the old one is renamed aside, then removed."""
    for path in source.rglob("*"):
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    aside = temporary_path(target) if target.exists() else None
    if aside is not None:
        os.replace(target, aside)
    os.replace(source, target)
    if aside is not None:
        _remove(aside)


def _remove(path: Path) -> None:
    """Remove a temporary file or folder (a staged model folder), ignoring what is gone."""
    try:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def repair_tail(path: str | Path) -> bool:
    """Cut a partial last line off a JSONL file (a writer killed mid-row); True if cut.

    A last line that parses but lacks its newline gets the newline instead.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
        block = min(size, 1 << 20)
        while True:
            f.seek(size - block)
            chunk = f.read(block)
            cut = chunk.rfind(b"\n")
            if cut >= 0 or block == size:
                break
            block = min(size, block * 2)
        start = size - block + cut + 1 if cut >= 0 else 0
        f.seek(start)
        tail = f.read()
        try:
            json.loads(tail)
        except ValueError:
            f.truncate(start)
            f.flush()
            os.fsync(f.fileno())
            return True
        f.seek(0, os.SEEK_END)
        f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())
        return False


def append_jsonl(path: str | Path, row: Any, *, kept: str = "the rows before it are kept") -> None:
    """Append one JSON row as one line, flushed and fsynced; repairs a partial tail first."""
    path = Path(path)
    line = (json.dumps(row, default=str) + "\n").encode()
    repair_tail(path)
    try:
        with open(path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        explained = write_error(err, path, kept=kept)
        if explained is None:
            raise
        if isinstance(explained, DiskFull):
            repair_tail(path)
        raise explained from None


def read_jsonl(path: str | Path, *, repair: bool = False) -> list[tuple[int, Any]]:
    """``(line number, row)`` of every row; a partial last line is skipped (cut if ``repair``).

    Any other line that does not parse raises :class:`RunFolderError` naming it.
    """
    path = Path(path)
    if repair:
        repair_tail(path)
    lines = path.read_bytes().split(b"\n")
    complete = lines[:-1]  # what follows the last newline is a partial row or nothing
    rows = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except ValueError:
            raise RunFolderError(f"{path}:{number} is not a JSON row: the file was damaged; "
                                 "restore it or re-run into a new folder") from None
    if lines[-1].strip():
        try:
            rows.append((len(lines), json.loads(lines[-1])))
        except ValueError:
            pass  # cut short by an interruption: its point is measured again
    return rows


# --------------------------------------------------------------------------- whose files


def _manifest(folder: Path) -> dict[str, str]:
    """``{name: kind}`` of ``.attnbench-files``; the older plain list has kind ``""``."""
    try:
        data = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if isinstance(data, list):
        return {str(n): "" for n in data}
    if isinstance(data, dict):
        return {str(n): str(k) for n, k in data.items()}
    return {}


def claim_files(folder: str | Path, names: Iterable[str], *, force: bool = False,
                ours: Callable[[Path], bool] | None = None, flag: str = "--out",
                kind: str = "") -> None:
    """Refuse to overwrite a file of ``names`` in ``folder`` that attnbench did not write.

    attnbench's files are those recorded in ``.attnbench-files`` with the same
    ``kind`` (``""``: a run folder's results and reports; ``"training"``, ``"samples"``,
    ``"model"``, ``"compare"``, ``"world"``: the other commands' outputs, so that
    ``compare --out RUN/results.json`` cannot replace a results table), or, for
    folders made before the record existed, the files ``ours`` recognises. With
    ``force`` everything is claimed (and recorded as ``kind``).
    """
    folder = Path(folder)
    names = list(dict.fromkeys(names))
    known = _manifest(folder)
    foreign = []
    for name in names:
        path = folder / name
        if known.get(name) == kind or not (path.exists() or path.is_symlink()):
            continue
        if name not in known and ours is not None and ours(path):
            continue
        foreign.append(name)
    if foreign and not force:
        whose = ("attnbench did not write" if all(n not in known for n in foreign)
                 else "are not this command's output")
        raise RunFolderError(
            f"{flag} {folder} holds {', '.join(foreign)}, which {whose}: pass "
            "--force to overwrite, or choose another folder"
        )
    if all(known.get(n) == kind for n in names):
        return
    record = {**known, **{n: kind for n in names}}
    data = sorted(record) if not any(record.values()) else dict(sorted(record.items()))
    atomic_write(folder / MANIFEST_FILE, json.dumps(data, indent=0) + "\n")


def claim_output(path: str | Path, *, force: bool, kind: str, flag: str) -> Path:
    """Claim the single output file ``path`` (``--out FILE``, ``--render PNG``).

    An empty name and a folder are refused; an existing file is overwritten only
    if attnbench wrote it as ``kind`` (recorded in its folder's ``.attnbench-files``)
    or with ``force``. Its folder is created.
    """
    if not str(path).strip():
        raise RunFolderError(f"{flag} is empty: give a file name")
    path = Path(path)
    if path.is_dir():
        raise RunFolderError(f"{flag} {path} is a folder: give a file name, e.g. "
                             f"{path / ('grid.png' if kind == 'world' else 'out.md')}")
    blocking = [p for p in path.parents if p.exists() and not p.is_dir()]
    if blocking:
        raise RunFolderError(f"{flag} {path}: {blocking[0]} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(err, path.parent) or RunFolderError(
            f"{flag} {path}: cannot create {path.parent} ({err.strerror})") from None
    claim_files(path.parent, [path.name], force=force, flag=flag, kind=kind)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a killed writer of it
        match = TEMPORARY.match(stale.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1)),
                                                                         None):
            _remove(stale)
    return path


def write_output(path: str | Path, data: bytes | str | Callable[[Path], Any], *, force: bool,
                 kind: str, flag: str) -> Path:
    """:func:`claim_output`, then :func:`atomic_write`: every single-file output's path."""
    return atomic_write(claim_output(path, force=force, kind=kind, flag=flag), data,
                        kept="nothing else was changed")
