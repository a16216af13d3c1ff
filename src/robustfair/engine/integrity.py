"""Checkpoint integrity: the sha256 recorded beside each checkpoint is checked before use."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .io import pending_path, sha256_file


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
