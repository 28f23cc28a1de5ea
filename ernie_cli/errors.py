"""User-facing failures.

Anything the user can fix (a bad path, a corrupt file, a model that will not fit) is raised as
ErnieError with one sentence that says what is wrong and what to do; the CLI prints that line and
exits 1 without a traceback. UsageError is the same for bad option values and exits 2.
"""

from contextlib import contextmanager


class ErnieError(Exception):
    exit_code = 1


class UsageError(ErnieError):
    exit_code = 2


class PipeClosed(Exception):
    """The reader of stdout went away (`| head`). Not an OSError, so click does not turn it into exit 1."""


def os_reason(exc: OSError) -> str:
    """An OSError's cause in words ("read-only file system"), without the errno number and the
    path that the sentence around it already names."""
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


# Ctrl-C as the CLI's SIGINT handler (on_sigint) saw it. Code that calls back into Python from C
# (torch's C++ side importing a module, for one) can swallow the KeyboardInterrupt the handler
# raises; the flag survives that, so the run still stops at the next check and exits 130.
_interrupted = False
# > 0: a Ctrl-C is only noted, and raised where check_interrupt() is next called.
_held = 0


def on_sigint(signum, frame) -> None:
    global _interrupted
    _interrupted = True
    if not _held:
        raise KeyboardInterrupt


def reset_interrupts() -> None:
    global _interrupted, _held
    _interrupted, _held = False, 0


def hold_interrupts() -> None:
    """From now on only note Ctrl-C (for the CLI's last steps, where raising would only print noise)."""
    global _held
    _held += 1


@contextmanager
def deferred_interrupts():
    """Raise a Ctrl-C that comes during the block only once the block is over.

    For imports of native libraries: importing torch runs Python from C++ callbacks, and a
    KeyboardInterrupt raised inside one of those aborts the process (pybind11's error_already_set
    thrown where C++ cannot catch it) instead of unwinding.
    """
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1
    check_interrupt()


def interrupted() -> bool:
    return _interrupted


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even when something swallowed it at the time."""
    if _interrupted:
        raise KeyboardInterrupt
