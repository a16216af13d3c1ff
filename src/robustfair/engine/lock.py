"""One trainer per run directory: a lock file holding the owner's PID and host.

``RUN/train.lock`` is opened and locked with ``flock`` (exclusive, non-blocking) when training
starts, then filled with the owner's PID and host; it is removed when training ends, however it
ends. The operating system drops the ``flock`` of a process that dies, so exactly one of several
trainers started together gets the lock, and a killed job's lock is taken over. A second
``robustfair train`` of the same run directory stops with one line naming the owner. A lock file
naming a live process on this host is respected even when no ``flock`` is held on it; a lock
from another host cannot be checked from here, so the message says how to remove it by hand
once no job is running there. Where ``fcntl`` does not exist, the file is created exclusively
(``O_CREAT | O_EXCL``) instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError
from .io import current_umask, write_error

try:
    import fcntl
except ImportError:  # not on POSIX: exclusive creation only
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("robustfair")

LOCK_NAME = "train.lock"


def _alive(pid: int) -> bool:
    """Whether a process of this PID exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks since boot, Linux), to tell a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's owner (pid, host, since, command), or None when there is no readable lock."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _is_stale(owner: dict[str, Any] | None) -> bool:
    if owner is None:  # torn or empty: the writer died while writing it
        return True
    if owner.get("host") != socket.gethostname():
        return False
    pid = int(owner.get("pid", -1))
    if pid <= 0 or pid == os.getpid() or not _alive(pid):
        return True
    started, now = owner.get("started"), _start_ticks(pid)
    return started is not None and now is not None and started != now  # the PID was reused


def _describe(owner: dict[str, Any]) -> str:
    since = owner.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    return f"PID {owner.get('pid')} on host {owner.get('host')} (since {when})"


def _create(path: Path, owner: dict[str, Any]) -> bool:
    """Create the lock file; False if it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~current_umask())
    except FileExistsError:
        return False
    except OSError as exc:
        raise write_error(path, exc) from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(owner) + "\n")
    return True


def _owner_lines(run_dir: Path, path: Path, held: dict[str, Any] | None) -> UserError:
    if held is not None and held.get("host") != socket.gethostname():
        return UserError(f"run directory {str(run_dir)!r} is locked by {_describe(held)}; "
                         f"wait for that job, or delete {path} if no job runs there any more")
    who = _describe(held) if held is not None else "another process"
    return UserError(f"run directory {str(run_dir)!r} is being trained by {who}; wait for it "
                     f"to finish or stop it")


#: open lock files of this process (their ``flock`` lasts as long as the descriptor)
_HELD: dict[str, int] = {}


def _acquire_flock(run_dir: Path, path: Path, owner: dict[str, Any]) -> None:
    """Open, ``flock`` and fill the lock file, or raise. The descriptor stays open (in
    ``_HELD``) until :func:`release`."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        except OSError as exc:
            raise write_error(path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another trainer holds it now
            os.close(fd)
            raise _owner_lines(run_dir, path, read_lock(path)) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # released and removed between our open and our flock: try again
            os.close(fd)
            continue
        held = read_lock(path)
        if held is not None and not _is_stale(held):  # e.g. a lock of another host
            os.close(fd)
            raise _owner_lines(run_dir, path, held)
        if held is not None or os.fstat(fd).st_size:
            log.warning("taking over the stale lock of a job that no longer runs: %s",
                        _describe(held) if held else "unreadable lock file")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode("utf-8"), 0)
        _HELD[str(path)] = fd
        return
    raise UserError(f"cannot take the lock {path}: other processes keep creating it; "
                    f"make sure only one job trains {str(run_dir)!r}")


def acquire(run_dir: str | Path, command: str = "train") -> Path:
    """Take the lock of ``run_dir`` (created if needed) or raise a one-line :class:`UserError`."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(run_dir, exc) from None
    path = run_dir / LOCK_NAME
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
             "started": _start_ticks(os.getpid()), "command": command}
    if fcntl is not None:
        _acquire_flock(run_dir, path, owner)
        return path
    for _ in range(3):
        if _create(path, owner):
            return path
        held = read_lock(path)
        try:  # an unreadable lock is being written now, or was torn by a killed writer
            torn = held is None and time.time() - path.stat().st_mtime > 10
        except FileNotFoundError:
            continue
        if not torn and (held is None or not _is_stale(held)):
            raise _owner_lines(run_dir, path, held)
        log.warning("taking over the stale lock of a job that no longer runs: %s",
                    _describe(held) if held else "unreadable lock file")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    raise UserError(f"cannot take the lock {path}: other processes keep creating it; "
                    f"make sure only one job trains {str(run_dir)!r}")


def release(path: Path) -> None:
    """Remove the lock if this process owns it."""
    fd = _HELD.pop(str(path), None)
    owner = read_lock(path)
    if owner is not None and owner.get("pid") == os.getpid() and \
            owner.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # removed while still locked, so no one takes the old file
    if fd is not None:
        os.close(fd)


def release_all() -> None:
    """Release every lock this process holds (a worker process told to stop, just before it
    exits: its runs are left unlocked, not with a stale lock)."""
    for path in list(_HELD):
        with contextlib.suppress(OSError):
            release(Path(path))


@contextlib.contextmanager
def run_lock(run_dir: str | Path, enabled: bool = True) -> Iterator[Path | None]:
    """Hold the training lock of ``run_dir`` for the duration of the block (a no-op when
    ``enabled`` is false, e.g. on the non-main processes of a distributed run)."""
    if not enabled:
        yield None
        return
    run_dir = Path(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    path = acquire(run_dir)
    try:
        yield path
    finally:
        release(path)
        for folder in created:  # a run that failed before writing anything leaves no folder
            try:
                folder.rmdir()
            except OSError:
                break


EVAL_LOCK = "eval.lock"


@contextlib.contextmanager
def eval_lock(folder: str | Path, enabled: bool = True) -> Iterator[Path | None]:
    """Hold the lock of an evaluation folder (``RUN/eval`` or ``--out``) while an evaluation
    writes into it: a second evaluation of the same folder stops at once with one line naming
    the process that holds it, instead of both merging into one record. A killed holder's lock
    is free again (the operating system drops its ``flock``). A no-op when ``enabled`` is false
    or where ``fcntl`` does not exist."""
    if not enabled or fcntl is None:
        yield None
        return
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(folder, exc, folder=True) from None
    path = folder / EVAL_LOCK
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
             "started": _start_ticks(os.getpid()), "command": "eval"}
    fd = None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        except OSError as exc:
            raise write_error(path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            held = read_lock(path)
            who = _describe(held) if held is not None else "another process"
            raise UserError(f"{folder} is being written by another evaluation, {who}; wait "
                            f"for it to finish, or give this one another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # released and removed between our open and our flock: try again
        fd = None
    if fd is None:
        raise UserError(f"cannot take the lock {path}: other evaluations keep creating it")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode("utf-8"), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # removed while still locked, so no one takes the old file
        os.close(fd)
