"""Shared fixtures: tiny random Dream, LLaDA, SDAR and Fast-dLLM v2 folders written by lopa.models.tiny (no
downloads)."""

import pytest

from lopa.models.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dream_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_dream"), model_type="dream", seed=0)


@pytest.fixture(scope="session")
def tiny_llada_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llada"), model_type="llada", seed=1)


@pytest.fixture(scope="session")
def tiny_sdar_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_sdar"), model_type="sdar", seed=2)


@pytest.fixture(scope="session")
def tiny_fast_dllm_v2_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_fast_dllm_v2"), model_type="fast_dllm_v2", seed=3)


# the (model family, dtype) cases a test marked ``diagonal`` keeps of its four (the suite's time)
DIAGONAL = {("dream", "float64"), ("llada", "float32")}


def pytest_configure(config):
    config.addinivalue_line("markers", "diagonal: of a test's four (family, dtype) cases, run only float64 Dream and "
                                       "float32 LLaDA (its subject is neither the family nor the dtype)")


def pytest_collection_modifyitems(config, items):
    """Deselect the off-diagonal (family, dtype) cases of tests marked ``diagonal``: each family and each dtype
    still runs, in two cases instead of four."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        dtype = next((v for v in params.values() if v in ("float32", "float64")), None)
        if item.get_closest_marker("diagonal") and dtype and (params.get("family"), dtype) not in DIAGONAL:
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
