"""What every stage shares: user errors become one line on stderr and exit status 2, library warnings one line
``warning: …``; the CPU allocator setting."""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Callable, TypeVar

import typer

from netvlad_core.errors import NetVLADError, NetVLADWarning

F = TypeVar("F", bound=Callable)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The library's own warnings (:class:`NetVLADWarning`, e.g. a PCA dimension that was lowered) as one line
    ``warning: …`` on stderr; other packages' warnings in Python's usual form, which names their source."""
    if issubclass(category, NetVLADWarning):
        typer.echo(f"warning: {message}", err=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def user_errors(fn: F) -> F:
    """Turn :class:`NetVLADError` (and a full disk) into ``error: <message>`` and exit 2.
    Also keeps the process's freed CPU buffers mapped (:func:`netvlad_core.device.configure_cpu_allocator`),
    a process-wide setting that belongs to a command, not to the library."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from netvlad_core.device import configure_cpu_allocator

        configure_cpu_allocator()
        try:
            with warnings.catch_warnings():
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


def run(fn: Callable) -> None:
    """Entry point for ``python -m stages.<stage>``."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(help=fn.__doc__)(fn)
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = main_spec.name if main_spec is not None else fn.__module__
    app(prog_name=f"python -m {module}")
    sys.exit(0)
