"""The ``robustfair`` command line."""

from __future__ import annotations

import errno
import importlib
import logging
import pkgutil
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import Interrupted, UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="robustfair")
def cli() -> None:
    """Train and evaluate image classifiers that are adversarially robust and fair."""


def _add_plugin_commands() -> None:
    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{commands.__name__}.{info.name}")
        for cmd in getattr(mod, "COMMANDS", [getattr(mod, "command", None)]):
            if cmd is not None:
                cli.add_command(cmd)


_add_plugin_commands()


def _interrupted(args: list[str]) -> str:
    """What Ctrl-C prints: for an evaluation, the command that continues it."""
    if args[:1] == ["eval"] and "--checks" not in args:
        again = args + ([] if "--resume" in args else ["--resume"])
        return f"interrupted; continue with: robustfair {shlex.join(again)}"
    return "interrupted"


#: file-system errors that are the user's to fix (permissions, read-only or full disk)
_USER_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so that a command stopped by ``kill`` or a job
    scheduler saves what Ctrl-C saves, stops its worker processes and says how to continue."""


#: exit status of a command stopped by SIGINT (Ctrl-C) or SIGTERM: 128 + the signal's number
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM
_terminated = False


def _on_sigterm(signum: int, frame: Any) -> None:
    global _terminated
    _terminated = True
    raise Terminated()


def _interrupt_status() -> int:
    return EXIT_SIGTERM if _terminated else EXIT_SIGINT


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes end in one line on stderr and exit code 2, never a traceback.

    SIGTERM is handled as Ctrl-C is (the same line on stderr, saying how to continue), with exit
    status 143 instead of 130; the previous handler is put back on the way out, and so is the
    ``robustfair`` logger's configuration (a command run from Python leaves the process as it
    found it)."""
    global _terminated
    _terminated = False
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    logger = logging.getLogger("robustfair")
    logging_state = (list(logger.handlers), logger.level, logger.propagate)
    try:
        _main(argv)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        logger.handlers[:], logger.level, logger.propagate = logging_state


def _main(argv: list[str] | None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="robustfair", standalone_mode=False)
    except Interrupted as exc:
        click.echo(str(exc), err=True)
        sys.exit(_interrupt_status() if exc.exit_code == EXIT_SIGINT else exc.exit_code)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C into Abort; a command with something to resume says so itself
        ctrl_c = isinstance(exc.__context__, KeyboardInterrupt)
        click.echo(_interrupted(sys.argv[1:] if argv is None else argv) if ctrl_c else "aborted",
                   err=True)
        sys.exit(_interrupt_status())
    except KeyboardInterrupt:
        click.echo(_interrupted(sys.argv[1:] if argv is None else argv), err=True)
        sys.exit(_interrupt_status())
    except click.ClickException as exc:
        exc.show()
        sys.exit(2 if exc.exit_code in (1, 2) else exc.exit_code)
    except BrokenPipeError:
        sys.exit(0)
    except OSError as exc:
        if exc.errno not in _USER_ERRNOS:
            raise
        from .engine.io import write_error

        click.echo(f"error: {write_error(exc.filename or '', exc)}", err=True)
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["Terminated", "cli", "main", "Path"]
