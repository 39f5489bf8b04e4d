"""Progress bars for evaluation and inference: ``--progress auto|true|false``.

``auto`` (the default) shows a bar when stderr is a terminal and stays silent in logs, CI and batch jobs.
:class:`Progress` is a handler (attach to an evaluator or trainer) around ignite's tqdm ``ProgressBar``: one bar
per epoch (an evaluation: one step per case), cleared when the epoch completes.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from ignite.engine import Engine

__all__ = ["PROGRESS_MODES", "progress_enabled", "Progress"]

#: valid values of the ``progress`` knob
PROGRESS_MODES = ("auto", "true", "false")


def progress_enabled(progress: Any = "auto", stream: IO[str] | None = None) -> bool:
    """Whether to show a progress bar.

    Args:
        progress: ``"auto"`` (on when ``stream`` is a terminal), ``"true"``/``True`` or ``"false"``/``False``
            (case-insensitive; ``"1"``/``"0"``, ``"yes"``/``"no"`` are accepted too).
        stream: where the bar would be written (default ``sys.stderr``).

    Returns:
        True to show the bar.

    Raises:
        ValueError: any other value, naming the valid ones.
    """
    if isinstance(progress, bool):
        return progress
    mode = str(progress).strip().lower()
    if mode in ("true", "1", "yes", "on"):
        return True
    if mode in ("false", "0", "no", "off", "none", ""):
        return False
    if mode != "auto":
        raise ValueError(f"progress must be one of {', '.join(PROGRESS_MODES)}; got {progress!r}.")
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


class Progress:
    """Handler: a tqdm progress bar over an engine's iterations when :func:`progress_enabled` says so.

    Args:
        progress: the knob (``auto``, ``true``, ``false``).
        desc: text before the bar (e.g. ``"evaluate"``).
        stream: where the bar goes (default ``sys.stderr``; also what ``auto`` tests).

    Raises:
        ValueError: an invalid ``progress`` value.
    """

    def __init__(self, progress: Any = "auto", desc: str = "", stream: IO[str] | None = None) -> None:
        self.stream = stream
        self.enabled = progress_enabled(progress, stream)
        self.desc = str(desc)
        self.bar: Any = None

    def attach(self, engine: Engine) -> None:
        """Attach ignite's ``ProgressBar`` (not persisted) when enabled; otherwise nothing."""
        if not self.enabled:
            return
        from ignite.handlers import ProgressBar

        kwargs: dict[str, Any] = {"persist": False, "desc": self.desc}
        if self.stream is not None:
            kwargs["file"] = self.stream
        self.bar = ProgressBar(**kwargs)
        self.bar.attach(engine)

    def __call__(self, engine: Engine) -> None:
        """Nothing to do per event: the bar updates itself once attached."""
