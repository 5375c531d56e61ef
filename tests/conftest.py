"""Shared pytest fixtures."""
import os

import pytest
import torch

# Multi-process tests run one intra-op thread per worker (parallel/testing.py, tests/helpers.run_cli)
# and compare with references computed in this process to 1e-5. Those references must sum in the
# same order: with 2 threads here, tests/test_pipeline.py's 1F1B case failed on a busy 2-core
# machine (embedding 1.5e-5 relative off after 3 Adam steps) while CI's idle run had passed; with
# one thread it passes. One thread here too, so the comparison does not depend on the machine.
torch.set_num_threads(1)

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


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory):
    """Runs that several tests check, each started once per session (tests/shared_runs.py)."""
    from tests.shared_runs import SharedRuns

    return SharedRuns(tmp_path_factory.mktemp("shared_runs"))
