"""User-facing failures.

Anything the user can fix (a bad path, a corrupt file, a model that will not fit) is raised as
ErnieError with one sentence that says what is wrong and what to do; the CLI prints that line and
exits 1 without a traceback. UsageError is the same for bad option values and exits 2.
"""


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
