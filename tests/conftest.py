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


# Fix this process's ATen CPU capability now, from the machine: torch reads ATEN_CPU_CAPABILITY once, at the
# first query, and a test that runs the demo in-process sets it to avx2 (bf16 matmuls then failed with
# "pack_vnni2 is only supported when avx512 is supported" in every later test).
torch.backends.cpu.get_cpu_capability()


@pytest.fixture(autouse=True)
def demo_numerics_env_stays_in_its_test():
    """A test that runs the demo in this process gets its pinned numerics (training.demo.pin_numerics sets
    MKL_CBWR and ATEN_CPU_CAPABILITY in os.environ); later tests, and the processes they start, must not
    inherit them: with ATEN_CPU_CAPABILITY=avx2 at start-up, torch.compile's CPU inductor kernels produced NaN
    logits (measured with torch in .venv on this machine; eager is unaffected)."""
    names = ("MKL_CBWR", "ATEN_CPU_CAPABILITY")
    before = {name: os.environ.get(name) for name in names}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The Hub switched off for `datasets` and huggingface_hub (env and their already-read constants), and a
    private datasets cache: a test that goes through load_dataset reads local files only."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
