"""Shared pytest fixtures for the MiniGPT-Pancreas test suite."""

from __future__ import annotations

import os

# Tests never touch the network: make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
