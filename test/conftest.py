"""Shared fixtures (helpers live in flad_testing.py so test modules can import them by name)."""

from __future__ import annotations

import sys

import pytest

from flad_testing import free_port_base


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip cleanly on a host whose torch sees no CUDA device (CPU CI stays the gate)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:     # the marker, not a parametrize id named "cuda"
            item.add_marker(skip)


@pytest.fixture
def port_base() -> int:
    return free_port_base(24)


@pytest.fixture
def python() -> str:
    return sys.executable
