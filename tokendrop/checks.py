"""Checks of user-given values, shared by the methods' options and the harnesses' configs:
each raises a `UsageError` naming the option and what it takes.

`UsageError` marks input the caller must change (an option, a name, a path, a file, a
missing package), as opposed to a bug: the command line prints its message as a usage error
(exit code 2) and lets every other exception show its traceback. Its subclasses are also the
builtin error such a check would raise without it (TypeError, FileNotFoundError, ImportError),
so that callers catching those still catch them.
"""

from __future__ import annotations

import numbers


class UsageError(ValueError):
    """Bad input from the caller: the message says what was wrong and what to give instead."""


class UsageTypeError(UsageError, TypeError):
    """A value of the wrong type."""


class MissingInputError(UsageError, FileNotFoundError):
    """A file, folder, model or data set named by the caller that is not there (or not reachable)."""


class MissingPackageError(UsageError, ImportError):
    """An optional package that the asked-for feature needs; the message says how to install it."""


def is_int(value) -> bool:
    """A Python int that is not a bool (True is an int to Python, never a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_choice(option: str, value, choices) -> None:
    if value not in choices:
        raise UsageError(f"{option} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_real(option: str, value, low: float, high: float) -> float:
    if not is_number(value) or not low <= float(value) <= high:
        raise UsageError(f"{option} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def check_int(option: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageTypeError(f"{option} must be an int, got {value!r}")
    return int(value)


def check_layer(option: str, layer, n_layers: int) -> int:
    """A vision layer index, negative counting from the end, as Python lists do."""
    layer = check_int(option, layer)
    if not -n_layers <= layer < n_layers:
        raise UsageError(f"{option}={layer} is out of range: the vision tower has {n_layers} layers")
    return layer
