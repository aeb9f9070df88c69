"""Shared test settings: deterministic seeds and one thread per test process (the suite runs 2 in parallel)."""

import os

import pytest
import torch

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
