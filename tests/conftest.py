"""Shared set-up for the unit tests: a headless matplotlib backend and a one-thread fixture.

Quick mode is set for the whole suite by the repository's root conftest.py.
"""

import matplotlib
import pytest
import torch

# No display in CI: draw figures into memory only.
matplotlib.use("Agg")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second torch thread costs more than it gives, most of all on a shared machine.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`; the thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
