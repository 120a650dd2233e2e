"""What every stage shares: user errors become one line on stderr and exit status 2, library warnings one line
``warning: …``; the CPU allocator setting."""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Callable, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

from netvlad_core.errors import NetVLADError, NetVLADWarning

F = TypeVar("F", bound=Callable)
# click's exception classes as Typer raises them (recent Typer versions carry their own copy of click)
_click_errors = sys.modules[typer.BadParameter.__module__]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The library's own warnings (:class:`NetVLADWarning`, e.g. a PCA dimension that was lowered) as one line
    ``warning: …`` on stderr; other packages' warnings in Python's usual form, which names their source."""
    if issubclass(category, NetVLADWarning):
        typer.echo(f"warning: {message}", err=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def user_errors(fn: F) -> F:
    """Turn :class:`NetVLADError` (and a full disk) into ``error: <message>`` and exit 2.
    The command runs under its own :class:`netvlad_core.io.FileLedger` (no output may replace a file it reads).
    Also keeps the process's freed CPU buffers mapped (:func:`netvlad_core.device.configure_cpu_allocator`),
    a process-wide setting that belongs to a command, not to the library."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from netvlad_core.device import configure_cpu_allocator
        from netvlad_core.io import tracked_files

        configure_cpu_allocator()
        try:
            with warnings.catch_warnings(), tracked_files():
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except NetVLADError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except Exception as e:  # a full disk met outside an atomic write (h5py, torch, numpy name no file)
            from netvlad_core.io import is_disk_full

            if not is_disk_full(e):
                raise
            where = getattr(e, "filename", None)
            typer.echo(f"error: {f'{where}: ' if where else ''}cannot write, no space left on device", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class _UsageErrorsInOneLine:
    """A click command whose command-line mistakes (an unknown option, ``--batch-size abc``, a missing required
    option) print the usage line and one ``error: …`` line, exit status 2, instead of Typer's multi-line box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):
        if not standalone_mode:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                                **extra)
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                                **extra)
        except _click_errors.NoArgsIsHelpError as e:
            text = e.ctx.get_help()  # Typer prints its rich help itself and returns ""
            if text:
                typer.echo(text, err=True)
            sys.exit(e.exit_code)
        except _click_errors.UsageError as e:
            if e.ctx is not None:
                typer.echo(e.ctx.get_usage(), err=True)
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            typer.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
            sys.exit(e.exit_code)
        except _click_errors.ClickException as e:
            typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        # without standalone mode a command's Exit comes back as its code; the commands themselves return None
        sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)


class CommandGroup(_UsageErrorsInOneLine, TyperGroup):
    """The ``netvlad`` group (see :class:`_UsageErrorsInOneLine`)."""


class Command(_UsageErrorsInOneLine, TyperCommand):
    """A single command run as ``python -m stages.<stage>`` (see :class:`_UsageErrorsInOneLine`)."""


def run(fn: Callable) -> None:
    """Entry point for ``python -m stages.<stage>``."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(help=fn.__doc__, cls=Command)(fn)
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = main_spec.name if main_spec is not None else fn.__module__
    app(prog_name=f"python -m {module}")
    sys.exit(0)
