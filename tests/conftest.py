import os
import sys

import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest, and reproducibly, on one thread; two OpenMP threads on the shared
    2-core machine stall each other at every small op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
