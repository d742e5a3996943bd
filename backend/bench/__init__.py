"""Benchmark scripts (speed and memory are measured here, never asserted in tests)."""
