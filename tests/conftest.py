"""Shared pytest setup: the `slow` marker is opt-in (--runslow, or CI=true through scripts/test)."""

import os
from pathlib import Path

import pytest
import torch

# Tests never reach the hub: loaders run on local files through the same code path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

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


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread in every test: bit-exact CPU comparisons need the same thread count in every
    run, and tiny models on a 2-core CI machine are faster without intra-op threading."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
