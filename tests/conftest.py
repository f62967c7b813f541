"""Shared pytest setup: the `cuda` and `slow` markers and their default skips."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line(
        "markers", "slow: takes tens of seconds on a small CPU box; runs only with NFLUX_TEST_SLOW=1"
    )


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="no CUDA device available")
    not_slow = pytest.mark.skip(reason="slow test; set NFLUX_TEST_SLOW=1 to run it")
    run_slow = os.environ.get("NFLUX_TEST_SLOW", "") not in ("", "0")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(not_slow)
