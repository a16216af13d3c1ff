"""Checkpoint integrity: the sha256 recorded beside each checkpoint is checked before use."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .io import load_checkpoint, pending_path, read_jsonl, sha256_file


def verify_checkpoint(path: str | Path) -> None:
    """Compare the file's sha256 with the one in its ``.json`` sidecar (when there is one)."""
    path = Path(path)
    side = path.with_suffix(".json")
    if not side.exists():
        return
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{side} is unreadable; delete it to skip the integrity check") from None
    want = meta.get("sha256")
    if want and sha256_file(path) != want:
        pending = pending_path(path)
        if pending.exists() and sha256_file(pending) == want:
            raise UserError(f"checkpoint {str(path)!r} is being written, or its write was "
                            f"interrupted; wait for it, or resume the run with --resume to "
                            f"complete it")
        raise UserError(f"checkpoint {str(path)!r} does not match its recorded sha256 (modified "
                        f"or corrupted); restore the file or retrain")


def check_resumable(run_dir: str | Path) -> None:
    """Before a run is resumed, and before anything in it changes (its lock included): the
    checkpoint it would continue from - ``checkpoints/last.pt``, or the complete write of it
    that an interrupted save left pending - matches its recorded sha256 and loads (tensors
    only), and ``log.jsonl`` has no damaged line (other than a torn last one). Raise the
    one-line :class:`UserError` of the first problem."""
    log_path = Path(run_dir) / "log.jsonl"
    if log_path.exists():
        read_jsonl(log_path)
    ck = Path(run_dir) / "checkpoints" / "last.pt"
    pending = pending_path(ck)
    if pending.exists():
        try:
            want = json.loads(ck.with_suffix(".json").read_text()).get("sha256")
        except (OSError, ValueError, AttributeError):
            want = None
        if want and sha256_file(pending) == want:  # --resume installs it
            load_checkpoint(pending, mmap=True)
            return
    if not ck.exists():
        return
    verify_checkpoint(ck)
    load_checkpoint(ck, mmap=True)
