import os

import pytest
import torch

from tests.helpers import hessian_problem

# Two cores on CI: keep torch from oversubscribing them when tests spawn subprocesses.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def setup():
    """The exact-Hessian problem of :func:`tests.helpers.hessian_problem` (computed once a module)."""
    return hessian_problem()
