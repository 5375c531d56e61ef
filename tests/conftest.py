"""Shared pytest fixtures."""
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root() -> str:
    """Absolute path of the repository root (where configs/ lives)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_data_cfg(tmp_path_factory):
    """DataConfig for a small slice of the embedded stdlib corpus in a private cache dir."""
    from trainer.data import DataConfig

    return DataConfig(max_bytes=300_000, vocab_size=512, seed=0,
                      cache_dir=str(tmp_path_factory.mktemp("data_cache")))


@pytest.fixture(scope="session")
def tiny_dataset(tiny_data_cfg):
    """TokenDataset over ``tiny_data_cfg`` with seq_len 64 (built once per session, ~1 s)."""
    from trainer.data import TokenDataset

    return TokenDataset(tiny_data_cfg, seq_len=64)
