"""Helpers shared by tests (and the benchmark) that are not pytest fixtures."""
