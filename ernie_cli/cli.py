"""The `ernie` command line: parses options and hands them to the runtime.

Each subcommand lives in ernie_cli/commands/<name>.py; this module only registers them and turns
exceptions into the CLI's manners: one line on stderr, exit 1 (2 for usage errors), no traceback
unless ERNIE_DEBUG=1, quiet exits on a closed pipe or Ctrl-C.

Ctrl-C must give exit 130 at any moment, also while typer, torch or a model is still being
imported. So this module imports nothing heavy at its top (the console script imports it before
main() runs), main() installs its SIGINT handler before importing anything else, and every import
happens inside main()'s handlers.
"""

from __future__ import annotations

import os
import signal
import sys

from ernie_cli import errors  # imports nothing but contextlib

_APP = None


def _watch_sigint():
    """Install the handler; returns the previous one, or None where none can be installed."""
    try:
        return signal.signal(signal.SIGINT, errors.on_sigint)
    except (ValueError, OSError):  # not the main thread, or no signals here
        return None


def _app():
    global _APP
    if _APP is None:
        import typer

        from ernie_cli.commands import registered_commands

        app = typer.Typer(
            name="ernie",
            help="Run Baidu's ERNIE 4.5 text models in plain PyTorch: download, complete, serve, quantize, bench.",
            no_args_is_help=True,
            add_completion=False,
            pretty_exceptions_enable=False,
            rich_markup_mode=None,  # help text is plain: "[default: ...]" must print, not vanish as a markup tag
            context_settings={"help_option_names": ["-h", "--help"]},
        )
        for name, func in registered_commands():
            app.command(name)(func)
        _APP = app
    return _APP


def _errors(name: str) -> tuple[type[BaseException], ...]:
    """click's exception `name`, from click and, on typer >= 0.22, from typer's vendored copy of click."""
    import click
    import typer

    modules = [click.exceptions, typer]
    try:
        from typer._click import exceptions as vendored

        modules.append(vendored)
    except ImportError:
        pass
    return tuple({getattr(module, name) for module in modules if hasattr(module, name)})


def _debug() -> bool:
    return os.environ.get("ERNIE_DEBUG", "") not in ("", "0")


def _quiet_broken_pipe() -> None:
    # Point stdout at /dev/null so the interpreter's final flush cannot raise again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _run(argv: list[str] | None) -> int:
    import warnings

    # torch warns at import when numpy cannot be imported; ernie never hands torch numpy arrays, so
    # the warning would only be noise on stderr (numpy is a dependency, but may be broken or absent).
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    from ernie_cli.errors import ErnieError, PipeClosed, interrupted

    app = _app()
    try:
        # Without standalone mode typer returns an exit code (130 after Ctrl-C) instead of exiting.
        result = app(args=argv, prog_name="ernie", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except _errors("NoArgsIsHelpError") as exc:  # `ernie` alone: the help, as a usage error
        exc.show()
        return 2
    except _errors("UsageError") as exc:
        exc.show()
        return 2
    except _errors("Exit") as exc:
        return exc.exit_code
    except _errors("Abort"):
        return 130
    except (BrokenPipeError, PipeClosed):
        _quiet_broken_pipe()
        return 0
    except ErnieError as exc:
        if _debug():
            raise
        if interrupted():  # the error came from the interrupt (a half-done import)
            return 130
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the last line of defence for the user
        if _debug():
            raise
        if interrupted():
            return 130
        print(f"error: {type(exc).__name__}: {exc} (run with ERNIE_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> None:
    errors.reset_interrupts()
    previous = _watch_sigint()
    try:
        code = _run(argv)
    except KeyboardInterrupt:
        code = 130
    finally:
        errors.hold_interrupts()  # a late Ctrl-C must not raise in the teardown
    if errors.interrupted():  # also when something swallowed the KeyboardInterrupt and the run went on
        code = 130
    if previous is not None and argv is not None:
        # Called from Python (tests, scripts) rather than as the program: give the caller its handler back.
        signal.signal(signal.SIGINT, previous)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_broken_pipe()
    if code == 130 and argv is None:
        # CPython remembers a KeyboardInterrupt that ever left an exec() of a string (dataclasses and
        # namedtuple run one per class they make, at import), and then ends the process by SIGINT
        # whatever exit code it was given. os._exit keeps the code; the teardown it skips has nothing
        # an interrupted run needs.
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os._exit(130)
    if argv is None and _cuda_started():
        # The process is done and has written everything; tearing down CUDA, Triton and torch's
        # state would only add to the user's wait (docs/performance.md: the one-shot table).
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os._exit(code)
    sys.exit(code)


def _cuda_started() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()
