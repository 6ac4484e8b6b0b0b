"""One error hierarchy. Every error a user can act on says what was wrong and what to do, in one line; the command
line prints it without a traceback and exits with the class's code (2: bad usage, 1: a runtime failure)."""

from __future__ import annotations


class VocabsegError(Exception):
    """A failure the user can act on that is not a mistake in what they asked for (exit code 1)."""

    exit_code = 1


class UsageError(VocabsegError, ValueError):
    """Bad input: an option, a class list, a file or a setting that cannot work (exit code 2).

    A ``ValueError`` too, so callers of the Python API can catch it as one.
    """

    exit_code = 2
