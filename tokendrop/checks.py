"""Checks of user-given values, shared by the methods' options and the harnesses' configs:
each raises ValueError or TypeError naming the option and what it takes."""

from __future__ import annotations

import numbers


def is_int(value) -> bool:
    """A Python int that is not a bool (True is an int to Python, never a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_choice(option: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_real(option: str, value, low: float, high: float) -> float:
    if not is_number(value) or not low <= float(value) <= high:
        raise ValueError(f"{option} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def check_int(option: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{option} must be an int, got {value!r}")
    return int(value)


def check_layer(option: str, layer, n_layers: int) -> int:
    """A vision layer index, negative counting from the end, as Python lists do."""
    layer = check_int(option, layer)
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"{option}={layer} is out of range: the vision tower has {n_layers} layers")
    return layer
