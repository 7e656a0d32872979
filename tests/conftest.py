"""Shared pytest setup: the `slow` marker is opt-in (--runslow, or CI=true through scripts/test)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AQUAINTERP_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("CI") == "true":
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (CI runs it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (AQuA dev, GSM8K) that tests and benchmarks read."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data folder not found at {SHARED_DATA}; tests need ../shared/data "
                    "(or set AQUAINTERP_SHARED_DATA)")
    return SHARED_DATA
