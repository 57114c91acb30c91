"""Shared fixtures: tiny random Dream and LLaDA folders written by lopa.models.tiny (no downloads)."""

import pytest

from lopa.models.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dream_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_dream"), model_type="dream", seed=0)


@pytest.fixture(scope="session")
def tiny_llada_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llada"), model_type="llada", seed=1)
