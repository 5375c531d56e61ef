"""Structured Hydra configs: the schema of every key in configs/ (unknown keys and wrong types
are rejected by Hydra before anything runs). README.md lists the keys users rely on."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from model.config import ModelConfig
from trainer.data import DataConfig


@dataclass
class ParallelConfig:
    pp: int = 1
    dp: int = 0  # 0 = world_size / pp
    ep: int = 1
    schedule: str = "1f1b"  # 1f1b | dualpipe | dualpipev
    gpus_per_node: int = 8  # a "node" for node-limited routing and a2a byte accounting
    # Node-groups the routed experts are split into for node-limited routing
    # (model.max_nodes_per_token). 0 = ep / gpus_per_node of this layout. Set it explicitly to
    # give a smaller layout (e.g. one process) exactly the routing of a larger one.
    expert_nodes: int = 0
    # Expert all-to-all: flat (one all-to-all per (token, expert)) | two_hop (once per destination
    # node over the inter-node link, then inside the node) | auto (two_hop when the EP group
    # spans several nodes). parallel/dispatch.py, parallel/two_hop.py
    dispatch: str = "auto"
    # Payload format: auto (precision=fp8: FP8 dispatch, BF16 combine and backward; else the
    # activation dtype) | fp32 | bf16 | fp8 (dispatch; combine and backward BF16). model/wire.py
    a2a_dtype: str = "auto"
    layers_per_stage: Optional[list] = None  # e.g. [2, 3]; None = the planner's split (balanced per rank)
    zero: bool = True  # ZeRO-1: AdamW states sharded over DP (non-expert) and expert-DP (experts)
    # DP / expert-DP gradient reduction: all_reduce (every rank gets whole gradients) |
    # reduce_scatter (each rank gets its ZeRO-1 range; needs zero) | auto (reduce_scatter on NCCL
    # with ZeRO-1, all_reduce on gloo). parallel/grads.py
    grad_reduce: str = "auto"
    timeout_s: float = 300.0  # collective timeout (a hang becomes an error naming rank and op)


@dataclass
class TrainConfig:
    steps: int = 150
    global_batch: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 2  # sequences per micro-batch on one rank
    microbatches: int = 0  # micro-batches per rank per step; 0 = global_batch / (dp · micro_batch)
    seq_len: int = 128
    seed: int = 0
    lr: float = 2.2e-4 * 10  # peak learning rate (toy models like a larger one than the paper's)
    min_lr: float = 2.2e-5 * 10
    warmup_steps: int = 20
    decay_start: float = 0.5  # fraction of steps after which the cosine decay starts
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    recompute: str = "none"  # none | norm_and_up_proj | full
    ema_decay: float = 0.0  # > 0 keeps a CPU EMA of the parameters
    exit_after_steps: int = 0  # > 0: stop this invocation after N steps with a checkpoint (resume later)
    eval_every: int = 0  # > 0: validation loss every N steps and at the last step (EMA weights too)
    eval_batches: int = 4  # global batches of the held-out split per evaluation (the same ones each time)
    # Intra-op threads per process on CPU. 0 = $OMP_NUM_THREADS when set, else the cores divided by
    # the ranks on this machine. Tiny models step fastest with 1 (thread hand-offs cost more than
    # they save, and much more on a busy machine), so `OMP_NUM_THREADS=1` is worth trying there.
    threads: int = 0
    on_nonfinite: str = "stop"  # stop | skip: a NaN/Inf loss or gradient (agreed over ranks) stops, or skips the update
    # Token-based schedules (trainer/schedules.py; configs/train/deepseek_v3.yaml has the report's).
    tokens: float = 0.0  # > 0 with steps = 0: train until this many tokens are consumed
    lr_decay_start_tokens: float = 0.0  # with lr_decay_end_tokens > 0: lr constant until here, ...
    lr_decay_end_tokens: float = 0.0  # ... cosine to min_lr here (0 = the step-based decay_start) ...
    lr_tail: list = field(default_factory=list)  # ... then [[from_tokens, lr], ...] constant stages
    batch_ramp_start: int = 0  # > 0: global batch ramps from this up to global_batch ...
    batch_ramp_increment: int = 0  # ... in steps of this (0 = dp × micro_batch, ×2 for dualpipe) ...
    batch_ramp_tokens: float = 0.0  # ... evenly over the first this many tokens
    bias_update_gamma: list = field(default_factory=list)  # [[from_tokens, γ], ...]; none = model's
    mtp_lambda: list = field(default_factory=list)  # [[from_tokens, λ], ...]; none = model.mtp_lambda


@dataclass
class OptimConfig:
    # AdamW moments' storage: auto = bf16 under precision=bf16|fp8 (the paper's recipe), fp32 under
    # fp32; they are updated in fp32 either way (parallel/zero.py)
    moment_dtype: str = "auto"  # auto | fp32 | bf16


@dataclass
class LoggingConfig:
    wandb: str = "disabled"  # disabled | offline | online
    project: str = "dsv3"
    name: Optional[str] = None
    progress: bool = True  # tqdm bar on rank 0
    peak_tflops: float = 0.0  # per device, for MFU; 0 = measure an fp32/bf16 matmul at start-up
    log_expert_load_per_layer: bool = True


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints (0 = only at the end if final=true)
    resume: str = "auto"  # auto | none | <path to a step_N folder>
    final: bool = True  # a checkpoint after the last step (launch.convert export reads it); false = none
    keep: int = 3  # newest checkpoints of this run's lineage kept (0 = all); other runs' are never pruned
    # run.dir holds another run's checkpoints/metrics: true moves them into run.dir/replaced_<n>/ and
    # starts over (with resume=none); false stops with an error naming what is there.
    overwrite: bool = False
    # Resume even if the corpus, tokenizer or sample-order seed differ from the checkpoint's (named
    # in a warning); false stops with an error naming what differs.
    allow_data_change: bool = False
    async_save: bool = False  # DCP async_save: stage to CPU, write in the background (one in flight)
    # A scheduler's notice: finish the step, checkpoint it, exit 143 (torchrun/SLURM may restart)
    preemption_signals: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class RunConfig:
    dir: str = "runs/default"


@dataclass
class DebugConfig:
    fail_at_step: int = -1  # fault injection: kill a rank hard at this step ...
    fail_rank: int = 0  # ... this rank ...
    fail_once: bool = True  # ... on the first attempt only
    fail_mode: str = "exit"  # exit (os._exit) | hang (sleep: the other ranks' collectives time out)
    record_timeline: bool = False
    inject_nonfinite_at_step: int = -1  # put a NaN into one gradient at this step ...
    inject_nonfinite_rank: int = 0  # ... on this rank (train.on_nonfinite decides what follows)
    faults: list = field(default_factory=list)  # "attempt:step:rank:kill|kill_in_checkpoint|term" (trainer/faults.py)
    dry_run: bool = False  # build ranks of the job in one process (fake process groups, meta device), print bytes, exit
    dry_run_ranks: list = field(default_factory=list)  # extra ranks to visit (default: one per pipeline position)


@dataclass
class PlanConfig:
    format: str = "table"  # table | json
    mode: str = "auto"  # auto (full when the layout has > 1 rank, else model) | model | schedule | full
    hardware: str = "h800"  # configs/hardware/<name>.yaml
    achievable_fraction: float = 0.4  # fraction of the dense peak TFLOP/s the kernels reach
    cost: dict = field(default_factory=lambda: {"f": 1.0, "b": 2.0, "w": 1.0, "fb": 2.5, "p2p": 0.0})
    # The training shape being planned; 0 / "" = take it from train.* / precision.
    world_size: int = 0  # 0 = parallel.pp × parallel.dp
    global_batch: int = 0
    micro_batch: int = 0
    seq_len: int = 0
    precision: str = ""  # fp32 | bf16 | fp8 (fp8 = the paper's recipe: FP8 GEMMs and activation caching)
    recompute: str = ""  # none | norm_and_up_proj | full
    zero: bool = True  # ZeRO-1: optimizer states sharded over DP (non-expert) / expert-DP (experts)
    # activations: cuda = the paper's kernels (the GPU target); cpu = what this runtime's modules save
    # on CPU (fp32 compute, SDPA math path), the figure a CPU run's saved_activation_bytes matches
    device: str = "cuda"
    sensitivity: list = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6])  # achievable fractions


@dataclass
class LaunchConfig:
    # > 1: `python -m launch.train` runs itself under `torchrun --standalone --nproc_per_node N`
    # (each job of a `-m` sweep, or a plain run); ignored when already under torchrun. launch/sweep.py
    nproc_per_node: int = 1
    max_restarts: int = 0  # torchrun --max-restarts for those launches


@dataclass
class Config:
    model: ModelConfig = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    precision: str = "fp32"  # fp32 | bf16 | fp8
    hardware: Any = None  # filled from configs/hardware by the planner


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
