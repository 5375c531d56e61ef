"""Shared helpers for tests that run the trainer (in-process via Hydra compose, or torchrun)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
# A tiny, fast training job; tests add their own overrides.
TINY = ["model=tiny", "data=tiny", "train.seq_len=32", "train.global_batch=8", "train.micro_batch=2",
        "train.warmup_steps=2", "logging.progress=false", "logging.peak_tflops=1"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    from trainer.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hydra_compose(config_name="config", overrides=overrides)


def train_in_process(overrides: list[str]) -> list[dict]:
    from trainer.trainer import Trainer

    cfg = compose(TINY + overrides)
    Trainer(cfg).train()
    return read_metrics(cfg.run.dir)


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_cli(args: list[str], nproc: int = 1, timeout: int = 300, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """python -m launch.train (nproc=1) or torchrun --standalone (nproc>1) with the tiny job."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    if nproc == 1:
        cmd = [sys.executable, "-m", "launch.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "launch.train"]
    return subprocess.run(cmd + TINY + args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# The tiny preset (configs/model/tiny.yaml), inlined so that edits to the presets do not move the
# unit tests that compare numbers against references.
TINY_MODEL = dict(
    vocab_size=512, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=3, n_dense_layers=1, n_heads=2,
    n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
    route_scale=2.5, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    max_seq_len=64, original_seq_len=64, mtp_depth=1, init_std=0.02,
)


def tiny_model_cfg(**over):
    from model import ModelConfig

    return ModelConfig.from_dict({**TINY_MODEL, **over})


def preset_model_cfg(name: str = "tiny"):
    """The ModelConfig of a configs/model preset, as the trainer resolves it."""
    from omegaconf import OmegaConf

    from model import ModelConfig

    return ModelConfig.from_dict(OmegaConf.to_container(compose([f"model={name}"]).model, resolve=True))
