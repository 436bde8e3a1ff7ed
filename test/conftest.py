"""Shared fixtures (helpers live in flad_testing.py so test modules can import them by name)."""

from __future__ import annotations

import sys

import pytest

from flad_testing import free_port_base


@pytest.fixture
def port_base() -> int:
    return free_port_base(24)


@pytest.fixture
def python() -> str:
    return sys.executable
