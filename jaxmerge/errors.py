"""Errors jaxmerge raises for bad user input.

Every error a user can cause (a missing file, a tensor that does not match, a
hyperparameter out of range) is a :class:`JaxmergeError`. The command line
prints its message on one line and exits non-zero, with no traceback; anything
else is a bug and keeps its traceback.
"""


class JaxmergeError(Exception):
    """A user-facing error: the message says what is wrong and where."""


class CheckpointError(JaxmergeError):
    """A checkpoint directory, shard file or tensor is missing or malformed."""


class MismatchError(JaxmergeError):
    """Base and experts disagree on tensor names, shapes or dtypes."""


class ConfigError(JaxmergeError):
    """A method, hyperparameter or flag value is invalid."""
