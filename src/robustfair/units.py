"""Parsing of user-facing quantities."""

from __future__ import annotations

import re
from typing import Any


def parse_eps(value: Any) -> float:
    """Accept 0.031, 8/255 or "8/255"."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*", value)
        try:
            value = float(m.group(1)) / float(m.group(2)) if m else float(value)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"not a number or fraction: {value!r}") from None
    return value
