"""Shared fixtures."""

import pytest

from tests.factories import make_adapter


@pytest.fixture
def adapter_factory():
    return make_adapter
