"""Atomic writes and safe checkpoint loading."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError


def atomic_write_bytes(path: str | Path, data: bytes, shown: str | Path | None = None) -> None:
    """Write to a temporary file in the same folder, fsync, rename: never a truncated file.

    The file gets the permissions that the umask gives a new file (0644 under umask 022), as
    ``open`` would; every failure (a read-only folder, a full disk) is a one-line
    :class:`UserError` (naming ``shown``, else ``path``)."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if shown is not None and exc.filename and Path(exc.filename).parent == path.parent:
            exc.filename = str(path.parent / f".{Path(shown).name}.tmp")  # the folder's fault
        raise write_error(shown if shown is not None else path, exc) from None


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a full disk raises ``OSError(ENOSPC)``)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_line(path: str | Path, line: str) -> None:
    """Append one line (``line`` plus a newline) to a text file such as ``log.jsonl``: all of it
    or nothing. A write that fails (a full disk, no permission) cuts the file back to its
    previous length, so no torn line is left, and is a one-line :class:`UserError`."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666 & ~current_umask())
    except OSError as exc:
        raise write_error(path, exc) from None
    size = os.fstat(fd).st_size
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise write_error(path, exc) from None
    finally:
        os.close(fd)


def probe_writable(folder: str | Path) -> Path:
    """Make sure files can be written in ``folder`` (created if needed) by creating and
    removing a temporary file there; a one-line :class:`UserError` if not. Commands call it
    before long work whose results go there."""
    folder = make_dir(folder)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=folder)
        try:
            _write_all(fd, b"0")
        finally:
            os.close(fd)
    except OSError as exc:
        raise write_error(folder, exc, folder=True) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return folder


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(path: str | Path, exc: OSError, folder: bool = False) -> UserError:
    """The one-line error for a file or folder that cannot be written (``folder``: files cannot
    be written in the folder ``path``). A file written atomically keeps its previous content."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "in" if folder else "writing"
        return UserError(f"no space left on the device {what} {path}; the previous file is "
                         f"kept — free disk space and run the command again (with --resume "
                         f"to continue a training or an evaluation)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = exc.filename or path
        if exc.filename and Path(exc.filename).name.startswith(
                (f".{Path(path).name}.", ".write-probe.")):
            where = Path(path) if folder else Path(path).parent  # the folder is the problem
        return UserError(f"cannot write {path}: permission denied on {where}; choose a "
                         f"writable output folder or fix its permissions")
    return UserError(f"cannot write {path}: {exc.strerror or exc}")


def make_dir(path: str | Path) -> Path:
    """``mkdir -p`` whose failure is a one-line :class:`UserError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from None
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pending_path(path: str | Path) -> Path:
    """Where a checkpoint waits, complete, until its sidecar names it (see :func:`save_with_sidecar`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.pending")


def save_with_sidecar(path: str | Path, data: bytes, meta: dict[str, Any]) -> str:
    """Write checkpoint bytes and their ``.json`` sidecar (``meta`` plus the sha256) so that a
    kill at any moment leaves a pair that agrees, or one that :func:`finish_interrupted_save`
    completes: the bytes go to a pending file first, then the sidecar, then the pending file is
    renamed onto ``path``. Return the sha256."""
    path = Path(path)
    digest = sha256_bytes(data)
    pending = pending_path(path)
    atomic_write_bytes(pending, data, shown=path)
    atomic_write_json(path.with_suffix(".json"), {"sha256": digest,
                                               **{k: v for k, v in meta.items() if k != "sha256"}})
    try:
        os.replace(pending, path)
    except OSError as exc:
        raise write_error(path, exc) from None
    _fsync_dir(path.parent)
    return digest


def finish_interrupted_save(path: str | Path) -> None:
    """After a kill inside :func:`save_with_sidecar`: install the pending file if the sidecar
    already names it, otherwise drop it (the previous pair is still whole)."""
    path = Path(path)
    pending = pending_path(path)
    if not pending.exists():
        return
    try:
        want = json.loads(path.with_suffix(".json").read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):
        want = None
    try:
        if want and sha256_file(pending) == want:
            os.replace(pending, path)
            _fsync_dir(path.parent)
        else:
            pending.unlink()
    except OSError as exc:
        raise write_error(path, exc) from None


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False
                    ) -> dict[str, Any]:
    """Load with ``weights_only=True`` (tensors and plain containers only: no code runs);
    ``mmap``: map the tensors' bytes instead of reading them (a cheap check of the file).

    Every way a file can be wrong ends in a :class:`UserError` naming the problem and the fix."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} not found; check the path")
    if path.is_dir():
        raise UserError(f"{str(path)!r} is a folder, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {str(path)!r}: {exc.strerror}") from None
    if len(head) == 0:
        raise UserError(f"checkpoint {str(path)!r} is empty; the write was interrupted — use the "
                        f"previous checkpoint")
    low = head.lstrip().lower()
    if low.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        raise UserError(
            f"{str(path)!r} is an HTML page, not a checkpoint (cloud drives return one instead of "
            f"the file); download the file itself"
        )
    if path.suffix == ".safetensors":
        return _load_safetensors(path, map_location)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True,
                         **({"mmap": True} if mmap else {}))
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise UserError(
                f"checkpoint {str(path)!r} contains Python objects that would run code when "
                f"loaded; refused — save only tensors (a state dict) or use .safetensors"
            ) from None
        raise UserError(
            f"checkpoint {str(path)!r} is truncated or not a PyTorch checkpoint "
            f"({shorten(first_sentence(msg), 160)}); use an intact file"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def first_sentence(text: str) -> str:
    """The first sentence of a (library's) error message, without its final full stop."""
    return re.split(r"(?<=[.!?])\s+", " ".join(text.split()), maxsplit=1)[0].rstrip(".")


def shorten(text: str, width: int) -> str:
    """``text`` cut at a word boundary to at most ``width`` characters, with "…" when cut."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    cut = text[: width - 1].rsplit(" ", 1)[0].rstrip(" ,;:.")
    return cut + "…"


def _load_safetensors(path: Path, map_location: Any) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file

        return dict(load_file(str(path), device=str(map_location)))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{str(path)!r} is not a valid safetensors file ({exc}); use an intact "
                        f"file") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file such as ``log.jsonl``. A torn last line (a process
    killed while appending it) is left out; a damaged line before it, or a line that is not a
    JSON object, is a one-line :class:`UserError` naming the file and the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is damaged (not UTF-8 text); restore it from a copy, or "
                        f"delete it (only the record of past epochs is lost)") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    numbered = [(i + 1, t) for i, t in enumerate(lines) if t.strip()]
    out = []
    for k, (no, text) in enumerate(numbered):
        try:
            rec = json.loads(text)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if k == len(numbered) - 1 and not text.rstrip().endswith("}"):
                continue  # torn by a kill while it was appended
            raise UserError(f"{path} is damaged (line {no} is not a JSON record); repair or "
                            f"delete that line") from None
        out.append(rec)
    return out
