"""tests/networks: run the tiny models single-threaded (restored afterwards).

The models here are tiny; on a shared 2-core machine two intra-op threads make them many times slower
(measured: 88 s vs 12 s for this package while other jobs ran), so this package uses one thread.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
