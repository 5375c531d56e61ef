"""debug.dry_run: ranks of a job built in one process on fake process groups and the meta device;
their bytes against the planner's for the same ranks."""
from __future__ import annotations

import pytest

from tests.helpers import compose, run_cli

TOY_JOB = ["model=toy", "parallel.pp=2", "parallel.dp=4", "parallel.ep=2", "parallel.schedule=dualpipe",
           "train.micro_batch=1", "train.global_batch=16", "debug.dry_run=true", "debug.dry_run_ranks=[3,5]"]


def _planned(cfg, rank: int):
    """launch.plan's figures for `rank` of the run `cfg`: plan() (its layer split and activation
    bytes) and predict_rank_bytes for that split with the numerics the runtime holds (`precision`:
    fp32 weights, or BF16 weights + FP32 master under bf16/fp8; FP32 grads; AdamW moments in
    optim.moment_dtype; balanced ZeRO-1)."""
    from dataclasses import replace

    from omegaconf import OmegaConf

    from model import ModelConfig
    from parallel import planner as P

    mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    p, t = cfg.parallel, cfg.train
    lay = P.PlanLayout(pp=p.pp, dp=p.dp, ep=p.ep, world_size=p.pp * p.dp, gpus_per_node=p.gpus_per_node,
                       schedule=p.schedule)
    r = P.plan(mcfg, lay, P.Recipe(precision=cfg.precision, recompute=t.recompute, seq_len=t.seq_len,
                                   micro_batch=t.micro_batch, global_batch=t.global_batch), fraction=0.4, sensitivity=[])
    if p.pp > 1:
        lay = replace(lay, layers_per_stage=tuple(r["layout"]["layers_per_stage"]))
    return P.predict_rank_bytes(mcfg, lay, rank, precision=cfg.precision, zero=True,
                                moment_dtype=cfg.optim.moment_dtype), r  # auto: resolved as the optimizer does


def _check(cfg, rb):
    want, r = _planned(cfg, rb.rank)
    got = (rb.param_count, rb.param_bytes, rb.grad_bytes, rb.optimizer_state_bytes)
    assert got == (want["param_count"], want["param_bytes"], want["grad_bytes"], want["optimizer_state_bytes"])
    assert rb.stages == want["stages"]
    if cfg.parallel.pp > 1:  # the same layer split, and the activation bytes launch.plan prints for the rank
        assert rb.layers == [r["layout"]["layers_per_stage"][s] for s in rb.stages]
        assert rb.activation_bytes == pytest.approx(r["per_rank"][rb.pp_rank]["activations_gb"] * 1e9, rel=1e-12)
        assert rb.activation_bytes > 0


@pytest.mark.parametrize("layout", [TOY_JOB, TOY_JOB[:1] + ["parallel.dp=4", "parallel.ep=4", "debug.dry_run=true",
                                                            "debug.dry_run_ranks=[1,2]"],
                                    TOY_JOB + ["precision=bf16"]],
                         ids=["pp2_dp4_ep2_dualpipe", "dp4_ep4", "pp2_dp4_ep2_dualpipe_bf16"])
def test_dry_run_bytes_equal_the_planners(layout, capsys):
    from trainer.dry_run import dry_run

    cfg = compose(layout)
    ranks = dry_run(cfg)
    assert [r.rank for r in ranks] == ([0, 3, 4, 5] if cfg.parallel.pp == 2 else [0, 1, 2])
    assert "dry run rank" in capsys.readouterr().out
    for rb in ranks:
        _check(cfg, rb)
    # the balanced ZeRO-1 shard: the DP ranks of one stage hold the same optimizer bytes to 1%
    stage0 = [r.optimizer_state_bytes for r in ranks if r.pp_rank == 0]
    assert len(stage0) > 1 and max(stage0) <= 1.01 * min(stage0)


def test_dry_run_of_the_2048_gpu_job_first_rank():
    """Rank 0 of the DeepSeek-V3 job (embedding stage + head/MTP stage), built on the meta device
    with the recipe's numerics and shape: split, parameter count and bytes equal the planner's."""
    from omegaconf import OmegaConf

    from model import ModelConfig
    from trainer.dry_run import rank_bytes
    from trainer.trainer import plan_stages, validate

    cfg = compose(["model=deepseek_v3_671b", "parallel=deepseek_v3_2048", "precision=fp8", "train.global_batch=15360",
                   "train.micro_batch=1", "train.seq_len=4096", "train.recompute=norm_and_up_proj"])
    mcfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    layout, n_micro = validate(cfg, mcfg, 2048)
    schedule, split = plan_stages(cfg, mcfg, layout, n_micro)
    rb = rank_bytes(cfg, mcfg, layout, schedule, split, 0)
    assert rb.stages == [0, 15]
    _check(cfg, rb)


def test_dry_run_error_is_the_runs_named_error_line(tmp_path):
    res = run_cli([f"run.dir={tmp_path}"] + TOY_JOB + ["parallel.ep=3"], timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: parallel.ep"), res.stderr[-2000:]


@pytest.mark.parametrize("args, key", [
    (["debug.dry_run_ranks=[8]"], "debug.dry_run_ranks"),
    (["train.global_batch=10"], "train.global_batch"),
])
def test_dry_run_validates_as_a_run(args, key):
    from model import ConfigError
    from trainer.dry_run import dry_run

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        dry_run(compose(TOY_JOB + args))
