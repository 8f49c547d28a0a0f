"""Errors a user can act on: the CLI prints their message on one line and exits non-zero (no traceback)."""


class SelfplayError(Exception):
    """Base of the errors whose message alone tells the user what to fix."""


class InputError(SelfplayError, ValueError):
    """Bad input data: the message names the file, row or field."""


class NoPairsError(SelfplayError):
    """A round produced no preference pairs to train on."""


class UnchangedPolicyError(SelfplayError):
    """A train stage whose optimizer steps left every weight as it was: a no-op reported as a failure."""
