"""The error bundles raise on bad user input, and the parsers of command-line knob values.

``fire`` passes ``--resume true`` as the string ``"true"`` and ``--in_plane_size null`` as ``"null"``: the bundle
configs read such knobs through :func:`as_bool` and :func:`optional_knob`.
"""

from __future__ import annotations

from typing import Any

#: torch's ``ExceptionWrapper.reraise`` message: "Caught <type> in DataLoader worker process N.\nOriginal Traceback ..."
_WORKER_TRACEBACK = "\nOriginal Traceback"

__all__ = ["BundleInputError", "as_bool", "optional_knob"]


class BundleInputError(ValueError):
    """Bad user input, reported as one line naming the file or knob (raised by the preflight checks, the dataset).

    An error raised in a DataLoader worker reaches the main process rebuilt by torch as
    ``BundleInputError("Caught BundleInputError in DataLoader worker process 0.\\nOriginal Traceback ...")``: that
    message is brought back to the worker's own one-line message (the last line of the worker's traceback).
    """

    def __init__(self, *args: Any) -> None:
        name = type(self).__name__
        if (
            len(args) == 1
            and isinstance(args[0], str)
            and args[0].startswith(f"Caught {name} ")
            and _WORKER_TRACEBACK in args[0]
        ):
            _, found, original = args[0].rstrip().rpartition(f"{name}: ")
            if found and "\n" not in original:
                args = (original,)
        super().__init__(*args)


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
