"""stderr-only output helpers: stdout is reserved for the product (completions, JSON, tables, paths)."""

from __future__ import annotations

import sys

from rich.console import Console

err = Console(stderr=True, highlight=False, soft_wrap=True)


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def info(message: str, quiet: bool = False) -> None:
    if not quiet:
        err.print(message, markup=False)


def byte_progress(label: str, quiet: bool = False):
    """(update(done, total), stop()) for a rich bar over bytes, only for a person watching stderr."""
    if quiet or not stderr_is_tty():
        return None, lambda: None
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(label, BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True)
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(label, total=total)
        bar.update(task, completed=done)

    return update, bar.stop


def warn(message: str) -> None:
    err.print(f"warning: {message}", markup=False)


def write_stdout(text: str) -> None:
    """Write product output and flush at once, so a pipe sees each piece as it is made."""
    from ernie_cli.errors import PipeClosed

    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise PipeClosed() from None
