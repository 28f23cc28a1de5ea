"""The `ernie` command line: parses options and hands them to the runtime.

Each subcommand lives in ernie_cli/commands/<name>.py; this module only registers them and turns
exceptions into the CLI's manners: one line on stderr, exit 1 (2 for usage errors), no traceback
unless ERNIE_DEBUG=1, quiet exits on a closed pipe or Ctrl-C.
"""

from __future__ import annotations

import os
import sys

import click
import typer

# Typer >= 0.22 raises the exceptions of its own vendored copy of click; older releases use click's.
_CLICK = [click.exceptions, typer]
try:
    from typer._click import exceptions as _vendored

    _CLICK.append(_vendored)
except ImportError:
    pass


def _errors(name: str) -> tuple[type[BaseException], ...]:
    return tuple({getattr(module, name) for module in _CLICK if hasattr(module, name)})

from ernie_cli.errors import ErnieError, PipeClosed

app = typer.Typer(
    name="ernie",
    help="Run Baidu's ERNIE 4.5 text models in plain PyTorch: download, complete, quantize, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is plain: "[default: ...]" must print, not vanish as a markup tag
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register() -> None:
    from ernie_cli.commands import registered_commands

    for name, func in registered_commands():
        app.command(name)(func)


def _debug() -> bool:
    return os.environ.get("ERNIE_DEBUG", "") not in ("", "0")


def _quiet_broken_pipe() -> None:
    # Point stdout at /dev/null so the interpreter's final flush cannot raise again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        # Without standalone mode typer returns an exit code (130 after Ctrl-C) instead of exiting.
        result = app(args=argv, prog_name="ernie", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except _errors("NoArgsIsHelpError") as exc:  # `ernie` alone: the help, as a usage error
        exc.show()
        code = 2
    except _errors("UsageError") as exc:
        exc.show()
        code = 2
    except _errors("Exit") as exc:
        code = exc.exit_code
    except _errors("Abort"):
        code = 130
    except KeyboardInterrupt:
        code = 130
    except (BrokenPipeError, PipeClosed):
        _quiet_broken_pipe()
        code = 0
    except ErnieError as exc:
        if _debug():
            raise
        print(f"error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the last line of defence for the user
        if _debug():
            raise
        print(f"error: {type(exc).__name__}: {exc} (run with ERNIE_DEBUG=1 for a traceback)", file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_broken_pipe()
    sys.exit(code)
