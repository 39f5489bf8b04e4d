"""The registry of issue 19's faults (``issue19_cases.py``) names real tests of this folder, covers every class, and
keys are unique."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.issue19_cases import CASES, CLASSES, EXTRA


def test_every_pattern_names_a_collected_test(request):
    """A renamed or removed test would leave its case uncovered: every pattern must match a test of this folder."""
    nodes = {item.nodeid.partition("reliability/")[2] for item in request.session.items}
    files = {p.name for p in Path(__file__).parent.glob("test_*.py")}
    if not files <= {n.split("::")[0] for n in nodes}:
        pytest.skip("only part of tests/reliability was collected")
    deselected = bool(request.config.getoption("markexpr", ""))  # e.g. -m "not slow": check those by their source

    def defined(pattern: str) -> bool:
        file, _, name = pattern.partition("::")
        return deselected and f"def {name.split('[')[0]}(" in (Path(__file__).parent / file).read_text()

    stale = [
        (c.key, t) for c in (*CASES, *EXTRA) for t in c.tests
        if not any(n.startswith(t) for n in nodes) and not defined(t)
    ]  # fmt: skip
    assert stale == []
    keys = [c.key for c in (*CASES, *EXTRA)]
    assert len(keys) == len(set(keys)) and {c.kind for c in CASES} == set(CLASSES)


def test_counts_of_the_issue():
    """The issue names 1 code execution, 6 data-loss cases and 2 identifier leaks (the headline's own counts)."""
    kinds = [c.kind for c in CASES]
    assert (kinds.count("code execution"), kinds.count("data lost"), kinds.count("identifier leak")) == (1, 6, 2)
