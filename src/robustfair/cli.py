"""The ``robustfair`` command line."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes end in one line on stderr and exit code 2, never a traceback."""
    try:
        rv = cli.main(args=argv, prog_name="robustfair", standalone_mode=False)
    except Interrupted as exc:
        click.echo(str(exc), err=True)
        sys.exit(exc.exit_code)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C into Abort; a command with something to resume says so itself
        ctrl_c = isinstance(exc.__context__, KeyboardInterrupt)
        click.echo("interrupted" if ctrl_c else "aborted", err=True)
        sys.exit(130)
    except PermissionError as exc:
        click.echo(f"error: permission denied on {exc.filename or exc}; choose a writable "
                   f"output folder or fix its permissions", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; resume with --resume", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2 if exc.exit_code in (1, 2) else exc.exit_code)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["cli", "main", "Path"]
