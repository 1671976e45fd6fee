"""Shared fixtures."""

import pytest

from tests.factories import make_adapter


@pytest.fixture
def adapter_factory():
    return make_adapter


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread_per_worker():
    """The suite runs under pytest-xdist with one worker per core: a second torch thread per worker only contends."""
    import torch

    torch.set_num_threads(1)
