"""Configuration values checked where they are read, so that a mistaken one ends the run at its start in one line
naming the key (hydra passes `abc`, `2.5` or `maybe` through as they are typed)."""
import os
from typing import Any, Optional, Sequence, Type

from dpr.foundation.errors import ConfigError, UserInputError


def whole_number(key: str, value: Any, minimum: int, way_out: Optional[str] = None,
                 error: Type[UserInputError] = ConfigError, maximum: Optional[int] = None) -> int:
    """`value` (of `key`) as an int of at least `minimum` (and at most `maximum`); `way_out` replaces the default
    advice when too small."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{key}={value!r} must be a whole number (at least {minimum})")
    if value < minimum:
        raise error(f"{key}={value}: {way_out}" if way_out else f"{key}={value} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise error(f"{key}={value} must be at most {maximum}")
    return value


def number(key: str, value: Any, minimum: float, maximum: Optional[float] = None, above_minimum: bool = False,
           error: Type[UserInputError] = ConfigError) -> float:
    """`value` (of `key`) as a float of at least `minimum` (above it with `above_minimum`), at most `maximum`."""
    bounds = (f"above {minimum}" if above_minimum else f"at least {minimum}") + \
        (f" and at most {maximum}" if maximum is not None else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # nan != nan
        raise error(f"{key}={value!r} must be a number {bounds}")
    if value < minimum or (above_minimum and value == minimum) or (maximum is not None and value > maximum):
        raise error(f"{key}={value} must be {bounds}")
    return float(value)


def true_or_false(key: str, value: Any, error: Type[UserInputError] = ConfigError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{key}={value!r} must be true or false")
    return value


def one_of(key: str, value: Any, choices: Sequence[str], error: Type[UserInputError] = ConfigError) -> str:
    """`value` (of `key`) when it is one of `choices`."""
    if value not in choices:
        raise error(f"{key}={value!r}: choose one of {', '.join(choices)}")
    return value


def existing_file(key: str, path: Any, what: str, error: Type[UserInputError] = ConfigError) -> str:
    """`path` (of `key`) when it names a file; `what` says what the file should be, for the message."""
    if not path:
        raise error(f"{key} is required: {what}")
    if os.path.isdir(path):
        raise error(f"{key}={path} is a folder: give {what} itself")
    if not os.path.isfile(path):
        raise error(f"{key}={path} does not exist: give {what}")
    return str(path)
