"""Shared pytest fixtures for the MiniGPT-Pancreas test suite."""

from __future__ import annotations

import os

import pytest

# Tests never touch the network: make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def scene():
    """An empty MRML scene (slicer-core), for the Slicer module tests; skips the test when slicer-core is missing."""
    from slicer_fixtures import new_scene
    return new_scene()


@pytest.fixture(scope="module")
def phantom():
    """The noise-free phantom the Slicer module tests draw on (built once per test module)."""
    from slicer_fixtures import noise_free_phantom
    return noise_free_phantom()
