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
