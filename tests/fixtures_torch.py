"""Single-threaded torch for the model-library tests (import the fixture into a test module to use it).

The tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP threads that spin at
barriers while other processes hold the cores make each step many times slower (measured: a 40 s test took 300 s).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
