"""Errors that are the user's to fix.

A :class:`UserError` carries a one-line message that names the problem and the fix. The command
line prints it without a traceback and exits with code 2.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (configuration, files, arguments), not with robustfair."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class Interrupted(UserError):
    """The user stopped a command (Ctrl-C); the message says how to continue it."""

    exit_code = 130
