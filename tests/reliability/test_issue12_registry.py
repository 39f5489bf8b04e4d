"""The registry of issue 12's listed faults (``issue12_cases.py``) names real tests, and its counting is right."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.conftest import case_outcome
from tests.reliability.issue12_cases import CASES, CLASSES, EXTRA


def test_every_pattern_names_a_collected_test(request):
    """A renamed or removed test would leave its case uncovered: every pattern must match a test of this folder."""
    nodes = {item.nodeid.partition("reliability/")[2] for item in request.session.items}
    files = {p.name for p in Path(__file__).parent.glob("test_*.py")}
    if not files <= {n.split("::")[0] for n in nodes}:
        pytest.skip("only part of tests/reliability was collected")
    stale = [(c.key, t) for c in (*CASES, *EXTRA) for t in c.tests if not any(n.startswith(t) for n in nodes)]
    assert stale == []
    keys = [c.key for c in (*CASES, *EXTRA)]
    assert len(keys) == len(set(keys)) and {c.kind for c in CASES} == set(CLASSES)


def test_case_outcome_counts_a_case_handled_only_when_a_test_passed_and_none_failed():
    outcomes = {"a.py::t[x]": "passed", "a.py::t[y]": "failed", "b.py::u": "skipped", "c.py::v": "passed"}
    assert case_outcome(("a.py::t[x]",), outcomes) == "handled"
    assert case_outcome(("a.py::t",), outcomes) == "failing"  # one parameter failed
    assert case_outcome(("a.py::t[x]", "c.py::v"), outcomes) == "handled"
    assert case_outcome(("b.py::u",), outcomes) == "uncovered"  # skipped only
    assert case_outcome(("d.py::w",), outcomes) == "uncovered"  # no such test ran
