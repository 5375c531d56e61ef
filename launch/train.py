"""Training entry point (Hydra). One process, or one per rank under torchrun:

    python -m launch.train model=toy train.steps=50
    torchrun --standalone --nproc_per_node 4 -m launch.train parallel.ep=2 run.dir=runs/demo
"""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from launch import sweep
from launch.errors import exit_with, precheck_overrides, user_error_types
from trainer.config import register_configs

register_configs()
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")


def cpu_threads(threads: int) -> int:
    """Intra-op threads per process: train.threads, else $OMP_NUM_THREADS (torch would otherwise
    ignore it once we set a count), else the machine's cores shared between its ranks."""
    if threads > 0:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig):
    # Multirun (-m) jobs, and launch.nproc_per_node > 1 outside torchrun: launch/sweep.py gives each
    # job its own run.dir and runs it under torchrun (or in-process with one rank).
    if sweep.wants_launch(cfg):
        return sweep.run_job(cfg, main)
    # here, not at the top: torch loads after the override precheck (__main__) and only in the
    # process that trains (a sweep's launcher never does)
    import torch
    import torch.distributed as dist

    from trainer.dry_run import dry_run
    from trainer.preemption import Preempted
    from trainer.trainer import Trainer

    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads(cfg.train.threads))
    try:
        if cfg.debug.dry_run:  # one process builds ranks of the whole job on fake process groups
            dry_run(cfg)
            return
        Trainer(cfg).train()
    except user_error_types() as err:
        exit_with(err)
    except Preempted as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"preempted: checkpoint {cfg.run.dir}/checkpoints/step_{stop.step} written; exit "
                  f"{stop.code} so that torchrun --max-restarts / the scheduler restarts the job", file=sys.stderr,
                  flush=True)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    precheck_overrides(CONFIG_DIR, sys.argv[1:])
    main()
