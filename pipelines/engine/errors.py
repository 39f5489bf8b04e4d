"""The error bundles raise on bad user input, and the parsers of command-line knob values.

``fire`` passes ``--resume true`` as the string ``"true"`` and ``--in_plane_size null`` as ``"null"``: the bundle
configs read such knobs through :func:`as_bool` and :func:`optional_knob`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BundleInputError", "as_bool", "optional_knob"]


class BundleInputError(ValueError):
    """Bad user input detected before any long work (raised by the preflight checks)."""


def as_bool(value: Any) -> bool:
    """A CLI flag as bool: ``fire`` passes ``--resume true`` as the string ``"true"``.

    Raises:
        ValueError: a string other than true/false/yes/no/1/0/on/off.
    """
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("true", "yes", "1", "on"):
            return True
        if v in ("false", "no", "0", "off", "", "none", "null"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {value!r}.")
    return bool(value)


def optional_knob(value: Any) -> Any:
    """A knob whose documented "unset" is ``null``: the CLI passes ``--in_plane_size null`` as the string ``"null"``.

    Args:
        value: the knob value.

    Returns:
        None for None or the strings null/none/"" (any case), else ``value`` unchanged.
    """
    if isinstance(value, str) and value.strip().lower() in ("", "null", "none"):
        return None
    return value
