"""pipelines.engine.progress: ``--progress auto|true|false`` and the bar it attaches."""

from __future__ import annotations

import io

import pytest
from ignite.engine import Engine

from pipelines.engine.progress import Progress, progress_enabled


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_knob_values():
    assert progress_enabled("auto", _Tty()) is True
    assert progress_enabled("auto", io.StringIO()) is False  # a log file, CI, a batch job
    assert progress_enabled("AUTO", _Tty()) is True
    assert progress_enabled("true", io.StringIO()) is True and progress_enabled(True) is True
    assert progress_enabled("false", _Tty()) is False and progress_enabled(False, _Tty()) is False
    closed = io.StringIO()
    closed.close()
    assert progress_enabled("auto", closed) is False
    with pytest.raises(ValueError, match="auto, true, false.*'sometimes'"):
        progress_enabled("sometimes")


@pytest.mark.parametrize(("knob", "shown"), [("true", True), ("false", False), ("auto", True)])
def test_progress_bar_on_an_evaluator(knob, shown):
    stream = _Tty()
    engine = Engine(lambda e, b: None)
    handler = Progress(knob, desc="evaluate", stream=stream)
    handler.attach(engine)
    engine.run(list(range(5)), max_epochs=1)
    text = stream.getvalue()
    assert ("evaluate: [4/5]" in text) is shown, text  # the bar is cleared (not persisted) when the epoch completes
    assert (handler.bar is not None) is shown
