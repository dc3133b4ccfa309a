"""The exceptions fairbench raises for problems a user can fix.

The CLI prints their message on one line, without a traceback, and exits with ``exit_code``.
"""

from __future__ import annotations


class FairbenchError(Exception):
    """A problem with the user's input or environment; the message says what and how to fix it."""

    exit_code = 1


class UnknownNameError(FairbenchError):
    """A method, dataset, option or attribute name that does not exist (a usage error)."""

    exit_code = 2
