"""The one error type for bad user input, and the checks that raise it.

Every value a user can set from a config, the command line or a public function is checked with
these helpers, so every package words its errors the same way::

    <field>: <what was given>; allowed: <what is allowed>

The CLI prints that line as ``error: ...`` and exits with code 2 before any training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

__all__ = [
    "ConfigError",
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
]


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


class ConfigError(ValueError):
    """A value a user set is not allowed.

    Args:
        field: where the value was set, as the user writes it (``model.backbone``,
            ``HessianTrace.probes``, ``boosting.rounds``).
        given: the value that was given (shown with ``repr`` for strings), or a short description
            of it when ``describe=True``.
        allowed: what is allowed, in words.
        describe: ``given`` is already a description, not a value to show.

    Example:
        >>> str(ConfigError("boosting.rounds", 0, "an integer >= 1"))
        'boosting.rounds: 0; allowed: an integer >= 1'
    """

    def __init__(self, field: str, given: Any, allowed: str, *, describe: bool = False) -> None:
        self.field = field
        self.given = given
        self.allowed = allowed
        self.given_text = str(given) if describe else _show(given)
        super().__init__(f"{field}: {self.given_text}; allowed: {allowed}")

    def __reduce__(self):  # keep the fields through pickling (DDP workers, multiprocessing)
        return (_rebuild, (self.field, self.given_text, self.allowed))


def _rebuild(field: str, given_text: str, allowed: str) -> ConfigError:
    return ConfigError(field, given_text, allowed, describe=True)


def check_int(field: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` in ``[low, high]``; a bool is not an integer here.

    >>> check_int("data.batch_size", 64, low=1)
    64
    >>> check_int("data.batch_size", True, low=1)
    Traceback (most recent call last):
    ...
    marginboost.errors.ConfigError: data.batch_size: True; allowed: an integer >= 1
    """
    ok = isinstance(value, Integral) and not isinstance(value, bool)
    if ok and low is not None and value < low:
        ok = False
    if ok and high is not None and value > high:
        ok = False
    if not ok:
        raise ConfigError(field, value, "an integer" + _range_text(low, high))
    return int(value)


def check_number(
    field: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a ``float`` in ``[low, high]`` (``(low, high]`` with ``low_open``).

    NaN is never allowed; infinity only with ``finite=False``; a bool is not a number here.

    >>> check_number("model.rho", 0.05, low=0.0)
    0.05
    >>> check_number("model.rho", float("nan"), low=0.0)
    Traceback (most recent call last):
    ...
    marginboost.errors.ConfigError: model.rho: nan; allowed: a finite number >= 0.0
    """
    ok = isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)
    if ok and finite and math.isinf(value):
        ok = False
    if ok and low is not None and (value <= low if low_open else value < low):
        ok = False
    if ok and high is not None and value > high:
        ok = False
    if not ok:
        kind = "a finite number" if finite else "a number"
        raise ConfigError(field, value, kind + _range_text(low, high, low_open))
    return float(value)


def check_bool(field: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0/1, not a string).

    >>> check_bool("model.freeze_head", "yes")
    Traceback (most recent call last):
    ...
    marginboost.errors.ConfigError: model.freeze_head: 'yes'; allowed: true or false
    """
    if not isinstance(value, bool):
        raise ConfigError(field, value, "true or false")
    return value


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``.

    >>> check_choice("model.scheduler_interval", "batch", ("epoch", "step"))
    Traceback (most recent call last):
    ...
    marginboost.errors.ConfigError: model.scheduler_interval: 'batch'; allowed: 'epoch', 'step'
    """
    choices = tuple(choices)
    if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
        raise ConfigError(field, value, ", ".join(_show(c) for c in choices))
    return value


def _range_text(low: float | None, high: float | None, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" <= {high}"
    return ""
