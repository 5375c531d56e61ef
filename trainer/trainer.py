"""The training loop: build → (resume) → step → log → checkpoint.

Order matters for the run contract's promise that bad input fails cleanly: every config,
layout and data check runs BEFORE the process group exists, so a user error is one line on
every rank and no collective ever starts.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from model import ConfigError, DeepSeekV3, ModelConfig
from model.flops import train_flops_per_token
from model.moe import ExpertPlacement, LocalDispatcher
from model.wire import FP32, Wire, resolve_wire
from parallel.dispatch import build_dispatcher, resolve_dispatch
from parallel.grads import allreduce_gradients, clip_grads_, count_bytes, reduce_scatter_gradients, resolve_grad_reduce
from parallel.pipeline import get_schedule
from parallel.pipeline.runtime import PipelineEngine
from parallel.pipeline.stages import build_stage_modules, plan_pipeline, stage_dispatchers
from parallel.step_engine import StepStats
from parallel.topology import Layout, init_distributed, validate_for_model
from parallel.zero import build_optimizer, moment_dtype_for
from trainer import checkpoint as ckpt
from trainer.data import TokenDataset
from trainer.ema import CPUEMA
from trainer.local_engine import LocalEngine
from trainer.schedules import Schedules
from trainer.precision import LiveSavedActivations, Numerics, autocast_for, check_precision, metered, numerics_for
from trainer.validation import validate_config
from trainer.preemption import PreemptionFlag, Preempted, parse_signals
from trainer.faults import FaultPlan
from trainer import step_guard
from trainer.metrics import MetricsSink, measure_peak_flops, peak_memory_bytes


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the rank, its coordinates and the op."""


def validate(cfg, model_cfg: ModelConfig, world_size: int) -> tuple[Layout, int]:
    """The checks that span keys (each key's own range is trainer/validation.py's, already run);
    returns the layout and micro-batches per rank per step (of the final global batch). Raises
    named errors, and runs before any process group exists."""
    p = cfg.parallel
    layout = validate_for_model(world_size, p.pp, p.dp, p.ep, p.gpus_per_node, model_cfg)
    t = cfg.train
    if t.steps < 1 and not (t.steps == 0 and t.tokens > 0):
        raise ConfigError(f"train.steps: must be >= 1 (or 0 with train.tokens > 0), got {t.steps}")
    if t.global_batch % (layout.dp * t.micro_batch):
        raise ConfigError(
            f"train.global_batch={t.global_batch} must be a multiple of parallel.dp × train.micro_batch "
            f"= {layout.dp} × {t.micro_batch}")
    if t.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    check_precision(cfg.precision, "cuda" if torch.cuda.is_available() else "cpu")
    if t.on_nonfinite not in step_guard.ON_NONFINITE:
        raise ConfigError(f"train.on_nonfinite: expected {'|'.join(step_guard.ON_NONFINITE)}, got {t.on_nonfinite!r}")
    parse_signals(cfg.checkpoint.preemption_signals)
    FaultPlan(cfg.debug.faults, rank=0)  # a malformed debug.faults entry is a named error now
    expert_nodes(cfg, model_cfg, layout)
    expert_dispatch(cfg, model_cfg, layout)
    try:
        resolve_grad_reduce(cfg.parallel.grad_reduce, "", cfg.parallel.zero)  # the backend only picks auto's way
    except ValueError as e:
        raise ConfigError(str(e)) from None
    n_micro = t.global_batch // (layout.dp * t.micro_batch)
    if t.microbatches and t.microbatches != n_micro:
        raise ConfigError(
            f"train.microbatches={t.microbatches} disagrees with train.global_batch / (parallel.dp × "
            f"train.micro_batch) = {n_micro}; set one of them")
    schedules(cfg, layout, model_cfg)  # named errors for the token schedules and every batch of a ramp
    return layout, n_micro


def schedules(cfg, layout: Layout, model_cfg: ModelConfig) -> tuple[Schedules, int]:
    """(the run's schedules, its number of optimizer steps): train.steps, or with train.steps = 0
    the steps until train.tokens are consumed (batch ramp included)."""
    t = cfg.train
    unit = layout.dp * t.micro_batch * (2 if layout.pp > 1 and cfg.parallel.schedule != "1f1b" else 1)
    sched = Schedules.from_config(t, max(t.steps, 1), model_cfg, unit)
    if t.steps == 0:
        steps = sched.batch.steps_for_tokens(t.tokens, t.seq_len)
        sched = Schedules.from_config(t, steps, model_cfg, unit)
        return sched, steps
    return sched, t.steps


def expert_nodes(cfg, model_cfg: ModelConfig, layout: Layout) -> int:
    """Node-groups of the routed experts for node-limited routing: parallel.expert_nodes, or the
    nodes this layout's EP group spans (ep / gpus_per_node)."""
    p = cfg.parallel
    n = p.expert_nodes or max(1, -(-layout.ep // p.gpus_per_node))
    if model_cfg.n_routed_experts % n:
        raise ConfigError(f"parallel.expert_nodes={n} does not divide model.n_routed_experts={model_cfg.n_routed_experts}")
    return n


def expert_dispatch(cfg, model_cfg: ModelConfig, layout: Layout):
    """(`parallel.dispatch` resolved to flat | two_hop, the a2a Wire of `parallel.a2a_dtype`).
    auto = two_hop when the EP group spans several nodes (one process: when the experts are
    split into several node-groups, so that it rounds like that layout)."""
    p = cfg.parallel
    try:
        wire = resolve_wire(p.a2a_dtype, cfg.precision)
        nodes = layout.n_nodes_ep if layout.ep > 1 else expert_nodes(cfg, model_cfg, layout)
        mode = resolve_dispatch(p.dispatch, nodes)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if mode == "two_hop" and layout.ep > 1 and layout.ep % layout.gpus_per_node:
        raise ConfigError(f"parallel.dispatch: two_hop needs an EP group of whole nodes; parallel.ep={layout.ep} "
                          f"is not a multiple of parallel.gpus_per_node={layout.gpus_per_node} (use flat)")
    return mode, wire


def plan_stages(cfg, model_cfg: ModelConfig, layout: Layout, n_micro: int):
    """(schedule, layer split) for pp > 1, else (None, None); the schedule of every other global
    batch of a ramp is built (and checked) too. Pure: runs before any collective."""
    if layout.pp == 1:
        return None, None
    layers = list(cfg.parallel.layers_per_stage) if cfg.parallel.layers_per_stage else None
    t = cfg.train  # the split's cost model: the run's numerics and shape (the planner's split_layers)
    recipe = dict(precision=cfg.precision, seq_len=t.seq_len, recompute=t.recompute, ep=layout.ep)
    for batch in schedules(cfg, layout, model_cfg)[0].batch.sizes()[:-1]:
        try:  # the split is the final batch's; each of the ramp's batches needs a valid schedule
            get_schedule(cfg.parallel.schedule, layout.pp, batch // (layout.dp * cfg.train.micro_batch))
        except ValueError as err:
            raise ConfigError(f"train.batch_ramp_start: the ramp's global batch {batch} does not fit the pipeline: {err}") from None
    return plan_pipeline(model_cfg, cfg.parallel.schedule, layout.pp, n_micro, layers, **recipe)


def build_modules(mcfg: ModelConfig, topo, schedule, split, n_nodes: int, mode: str = "flat", wire: Wire = FP32,
                  device=None, recompute: str = "none", numerics: Numerics = Numerics(),
                  gpus_per_node: int = 1) -> list[DeepSeekV3]:
    """This rank's model as it runs: its stage module(s) (pp > 1) or the whole model, with its
    experts and their dispatcher(s), the node count, the recompute mode and the numerics (weight
    dtype, FP8 switch: trainer.precision.numerics_for); uninitialised, on `device` (None: the
    default; the dry run builds on "meta")."""
    n_experts = mcfg.n_routed_experts
    experts = ExpertPlacement(topo.ep_rank, topo.ep, n_nodes) if topo is not None else ExpertPlacement(n_nodes=n_nodes)
    # every expert in process, rounded as the configured EP layout would send it
    local = LocalDispatcher(wire, mode == "two_hop", n_nodes, gpus_per_node)
    if schedule is None:
        if topo is not None and topo.ep > 1:
            groups = (topo.ep_group, topo.ep_inter_group, topo.ep_intra_group)
            dispatcher = build_dispatcher(mode, groups, n_experts, topo.gpus_per_node, wire)
        else:
            dispatcher = local
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return [DeepSeekV3(mcfg, experts=experts, dispatcher=dispatcher, recompute=recompute, init_seed=None,
                               numerics=numerics)]  # initialised by the caller
    n_chunks = len(schedule.placement[topo.pp_rank])
    dispatchers = stage_dispatchers(topo, n_chunks, n_experts, mode, wire) or [local] * n_chunks
    return build_stage_modules(mcfg, schedule, topo.pp_rank, split=split, device=device, experts=experts,
                               dispatchers=dispatchers, recompute=recompute, numerics=numerics)


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        validate_config(cfg)  # every key's range / enum (trainer/validation.py), one named line
        model_dict = OmegaConf.to_container(cfg.model, resolve=True)
        self.model_cfg = ModelConfig.from_dict(model_dict)
        self.rank = int(os.environ.get("RANK", "0"))
        self.layout, self.n_micro = validate(cfg, self.model_cfg, int(os.environ.get("WORLD_SIZE", "1")))
        self.schedule, self.split = plan_stages(cfg, self.model_cfg, self.layout, self.n_micro)
        self.schedules, self.steps = schedules(cfg, self.layout, self.model_cfg)
        self._pipeline_schedules = {self.n_micro: self.schedule}
        self.expert_nodes = expert_nodes(cfg, self.model_cfg, self.layout)
        self.dispatch_mode, self.wire = expert_dispatch(cfg, self.model_cfg, self.layout)
        self.data = TokenDataset(cfg.data, cfg.train.seq_len)
        if cfg.train.eval_every:
            self.data.windows("val")  # DataError now if there is no held-out split
        if self.data.vocab_size > self.model_cfg.vocab_size:
            raise ConfigError(
                f"model.vocab_size={self.model_cfg.vocab_size} is smaller than the tokenizer's "
                f"vocabulary data.vocab_size={self.data.vocab_size}")
        self.is_main = self.rank == 0
        self._rank_bytes_written = False  # run.dir/rank_bytes.json, once per process (_memory_bytes)
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
        self.expected = self._identity()  # written into every checkpoint's meta.json
        self.resume_identity = self._resume_identity()  # what a checkpoint must match to be resumed
        self.lineage = uuid.uuid4().hex  # replaced by the checkpoint's on resume
        self._guard_run_dir()
        self.faults = FaultPlan(cfg.debug.faults, self.rank)
        self.preemption = PreemptionFlag(parse_signals(cfg.checkpoint.preemption_signals))
        self.skipped_steps = 0  # steps whose update train.on_nonfinite=skip left out
        self.mtp_lambda = self.model_cfg.mtp_lambda  # the running step's λ (train.mtp_lambda), for the logs
        self.topo = None
        if self.layout.world_size > 1:
            p = cfg.parallel
            self.topo = init_distributed(pp=p.pp, dp=self.layout.dp, ep=p.ep, gpus_per_node=p.gpus_per_node,
                                         timeout_s=p.timeout_s)
        # gradient reduction over DP / expert-DP: all_reduce | reduce_scatter (parallel/grads.py)
        self.grad_reduce = resolve_grad_reduce(cfg.parallel.grad_reduce, self.topo.backend if self.topo else "",
                                               cfg.parallel.zero)
        self._build()
        if self.topo is not None and self.is_main:  # what the auto settings resolved to, once
            lay = self.layout
            print(f"layout: pp {lay.pp} × dp {lay.dp} × ep {lay.ep} ({self.topo.backend}), "
                  f"expert dispatch {self.dispatch_mode}, gradients {self.grad_reduce}", flush=True)
        group = self.topo.background_group() if (self.topo is not None and cfg.checkpoint.async_save) else None
        self.writer = ckpt.CheckpointWriter(self._ckpt_root(), cfg.checkpoint.keep, self.rank,
                                            async_save=cfg.checkpoint.async_save, group=group)

    # ------------------------------------------------------------------ build
    def _build(self) -> None:
        cfg, mcfg = self.cfg, self.model_cfg
        torch.manual_seed(cfg.train.seed)
        modules = build_modules(mcfg, self.topo, self.schedule, self.split, self.expert_nodes, self.dispatch_mode,
                                self.wire, recompute=cfg.train.recompute, numerics=numerics_for(cfg.precision),
                                gpus_per_node=cfg.parallel.gpus_per_node)
        for m in modules:
            m.init_weights(cfg.train.seed)  # seeded by global name: any split gives the same values
            m.to(self.device)
        autocast = autocast_for(cfg.precision, self.device)
        # the step engine enters the precision's autocast around every forward (one owner for
        # every layout; the pipeline runtime must enter it in the thread that runs each forward)
        self.activations = LiveSavedActivations(exclude=modules)  # saved_activation_bytes
        autocast = metered(autocast, self.activations)
        if self.schedule is None:
            self.engine = LocalEngine(modules[0], self.topo, autocast=autocast)
        else:
            self.engine = PipelineEngine(self.schedule, modules, self.topo, autocast=autocast)
            self.engine.timeline.enabled = cfg.debug.record_timeline
        self.modules = modules
        t = cfg.train
        self.optimizer = build_optimizer(self.engine.named_parameters(), t, self.topo, zero=cfg.parallel.zero,
                                         moment_dtype=moment_dtype_for(cfg.optim.moment_dtype, cfg.precision))
        self.param_bytes = count_bytes(p for _, p in self.engine.named_parameters())
        self.ema = None
        if t.ema_decay > 0:
            self.ema = CPUEMA(dict(self.engine.named_parameters()), decay=t.ema_decay)

        self.flops_per_token = train_flops_per_token(mcfg, t.seq_len)
        if cfg.logging.peak_tflops > 0:
            self.peak_flops = cfg.logging.peak_tflops * 1e12
        else:
            dtype = torch.bfloat16 if (cfg.precision != "fp32" and self.device.type == "cuda") else torch.float32
            self.peak_flops = measure_peak_flops(self.device, dtype)

    @property
    def model(self) -> DeepSeekV3:
        """The whole model, when this rank holds it as one stage (pp = 1)."""
        if len(self.modules) != 1 or self.schedule is not None:
            raise AttributeError("Trainer.model: this rank holds pipeline stages; use trainer.modules")
        return self.modules[0]

    # ------------------------------------------------------------------ checkpoint state
    def _named_modules(self) -> dict[str, torch.nn.Module]:
        named = {}
        for m in self.modules:  # two DualPipe stages on one rank: disjoint names, one shared embedding
            named.update(dict(m.named_modules()))
        return named

    def _state(self) -> dict:
        state, named_modules = {}, self._named_modules()
        for m in self.modules:
            state.update(ckpt.model_state(m))
        state.update(ckpt.optimizer_state(named_modules, self.optimizer.shards()))
        if self.ema is not None:  # the live CPU shadow tensors: DCP loads into them in place
            state.update({f"ema.{k}": v for k, v in ckpt.tensor_items(self.ema.shadow(), named_modules).items()})
        return state

    def _ckpt_root(self) -> str:
        return os.path.join(self.cfg.run.dir, "checkpoints")

    def _identity(self) -> dict:
        """What a checkpoint of this run holds (saved in meta.json, compared on resume): the model
        config, the global parameter inventory, the weights' storage (FP32, or BF16 with FP32
        master ranges: a BF16 run needs the masters, so it refuses an FP32 checkpoint with a named
        error, and an FP32 run a BF16 one) and the data fingerprint."""
        with torch.device("meta"):  # names and shapes only: nothing allocated or initialised
            whole = DeepSeekV3(self.model_cfg)
        return {"model": self.model_cfg.to_dict(),
                "params": ckpt.inventory(ckpt.model_state(whole)),
                "weights": {"storage": ckpt.weight_storage(numerics_for(self.cfg.precision).param_dtype)},
                "data": {**self.data.fingerprint(), "data.seed": int(self.cfg.data.seed)}}

    def _resume_identity(self) -> dict:
        """self.expected, less the data fingerprint under checkpoint.allow_data_change (then a
        checkpoint trained on other data is resumed, with a warning naming the difference)."""
        if not self.cfg.checkpoint.allow_data_change:
            return self.expected
        found = ckpt.list_complete(self._ckpt_root())
        path = self.cfg.checkpoint.resume if self.cfg.checkpoint.resume not in ("auto", "none") else \
            (found[-1][1] if found and self.cfg.checkpoint.resume == "auto" else None)
        try:
            diff = ckpt.incompatibility({"data": ckpt.read_meta(path)["data"]}, self.expected) if path else None
        except (OSError, ValueError, KeyError):
            diff = None
        if diff and self.is_main:
            print(f"warning: checkpoint.allow_data_change: resuming {path} on other data ({diff})", flush=True)
        return {k: v for k, v in self.expected.items() if k != "data"}

    def _guard_run_dir(self) -> None:
        """Before any process group: refuse to resume another run's checkpoint, and never write over
        or prune another run's checkpoints and metrics (checkpoint.overwrite=true moves them aside)."""
        c, run_dir = self.cfg.checkpoint, self.cfg.run.dir
        found = ckpt.list_complete(self._ckpt_root())
        metrics = os.path.join(run_dir, "metrics.jsonl")
        has_metrics = os.path.exists(metrics) and os.path.getsize(metrics) > 0
        how = ("use a new run.dir, or checkpoint.resume=none checkpoint.overwrite=true to move the old run "
               f"into {run_dir}/replaced_<n>/ and start over")
        problem = None
        if c.resume not in ("auto", "none"):
            if not os.path.exists(os.path.join(c.resume, "meta.json")):
                raise ckpt.CheckpointError(f"checkpoint.resume: {c.resume} is not a complete checkpoint (no meta.json)")
            diff = ckpt.incompatibility(ckpt.read_meta(c.resume), self.resume_identity)
            if diff:
                raise ckpt.CheckpointError(f"checkpoint.resume: {c.resume} is not this run's checkpoint: {diff}")
            return
        if c.resume == "auto" and found:
            try:
                diff = ckpt.incompatibility(ckpt.read_meta(found[-1][1]), self.resume_identity)
            except (OSError, ValueError):
                diff = None  # unreadable: load_newest names it and tries an older one
            if diff:
                problem = f"checkpoint.resume=auto: {found[-1][1]} is another run's checkpoint: {diff}"
        elif found or has_metrics:  # resume=none, or auto with metrics but no checkpoint to continue from
            what = f"{len(found)} checkpoint(s)" if found else "metrics.jsonl but no checkpoint"
            problem = f"checkpoint.resume={c.resume}: run.dir {run_dir} already holds a run ({what})"
        if problem is None:
            return
        if not c.overwrite:
            raise ckpt.CheckpointError(f"{problem}; {how}")
        if self.is_main:
            moved = ckpt.move_aside(run_dir)
            print(f"checkpoint.overwrite: moved the previous run into {moved}", flush=True)

    def _resume(self) -> int:
        self.samples = 0  # global samples consumed before the next step
        mode = self.cfg.checkpoint.resume
        if mode == "none":
            return 0
        explicit = None if mode == "auto" else mode
        found = ckpt.load_newest(self._ckpt_root(), self._state, explicit, self.resume_identity)
        if found is None:
            return 0
        meta, path = found
        self.lineage = meta.get("lineage", self.lineage)
        # the data position is the samples consumed (older checkpoints: steps × their batch)
        self.samples = int(meta.get("samples_seen", int(meta["step"]) * int(meta.get("global_batch", 0))))
        if meta.get("global_batch") != self.cfg.train.global_batch and self.is_main:
            print(f"resume: train.global_batch={self.cfg.train.global_batch} (checkpoint: {meta.get('global_batch')}); "
                  f"the sample stream continues at sample {self.samples}", flush=True)
        if self.ema is not None:
            self.ema.num_updates = int(meta.get("ema_updates", 0))
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        if self.is_main:
            print(f"resumed from {path}", flush=True)
        return int(meta["step"])

    def _save(self, step: int) -> float:
        """Checkpoint of the state after `step`; returns the seconds the loop was blocked."""
        if self.ema is not None:
            self.ema.wait()
        meta = {
            "global_batch": self.cfg.train.global_batch,
            "samples_seen": self.samples,
            "layout": {"pp": self.layout.pp, "dp": self.layout.dp, "ep": self.layout.ep,
                       "schedule": self.cfg.parallel.schedule},
            "ema_updates": self.ema.num_updates if self.ema is not None else 0,
            "lineage": self.lineage,
            **self.expected,
            "skipped_steps": self.skipped_steps,
        }
        return self.writer.save(step, self._state(), meta, after_write=self.faults.in_checkpoint(step))

    def _close_writer(self, err: BaseException | None) -> None:
        """Wait for the save in flight before exiting, unless the run crashed (a collective or a
        rank failed): then its uncommitted step_N.tmp is simply never renamed."""
        if err is None or isinstance(err, (Preempted, step_guard.NonFiniteError)):
            self.writer.close()

    def _agree_on_step(self, step_no: int, losses) -> step_guard.StepVerdict:
        """Before the optimizer step: one verdict on every rank about non-finite values and a
        pending preemption. train.on_nonfinite=stop raises NonFiniteError naming the first bad
        parameter; skip returns the verdict and the loop leaves the state untouched."""
        named, world = self.engine.named_parameters(), self.layout.world_size
        bad = step_guard.local_nonfinite([float(losses.lm), float(losses.mtp)], named)
        verdict = step_guard.agree(bad, self.preemption.requested, self.rank, world)
        if verdict.nonfinite and self.cfg.train.on_nonfinite == "stop":
            name = step_guard.first_nonfinite_name(named, self._named_modules()) if bad else ""
            names = step_guard.gather_names(name, world)
            raise step_guard.NonFiniteError(step_guard.stop_message(step_no, verdict, names))
        return verdict

    def _maybe_inject_nonfinite(self, step_no: int) -> None:
        d = self.cfg.debug
        if d.inject_nonfinite_at_step == step_no and d.inject_nonfinite_rank == self.rank:
            name = step_guard.inject_nonfinite(self.engine.named_parameters(), self._named_modules())
            print(f"debug: rank {self.rank} puts a NaN into the gradient of {name} at step {step_no}", flush=True)

    # ------------------------------------------------------------------ the loop
    def _micro_batches(self, first: int, global_batch: int, split: str = "train") -> list[torch.Tensor]:
        """This rank's micro-batches of the global samples first … first + global_batch - 1."""
        t, dp_rank = self.cfg.train, (self.topo.dp_rank if self.topo is not None else 0)
        per_rank = global_batch // self.layout.dp
        first += dp_rank * per_rank
        tokens = torch.from_numpy(self.data.batch(range(first, first + per_rank), split)).to(self.device)
        return list(tokens.split(t.micro_batch))

    def _use_batch(self, global_batch: int) -> None:
        """Point the pipeline engine at the schedule of this global batch's micro-batch count."""
        if self.schedule is None:
            return
        n = global_batch // (self.layout.dp * self.cfg.train.micro_batch)
        if n not in self._pipeline_schedules:
            self._pipeline_schedules[n] = get_schedule(self.cfg.parallel.schedule, self.layout.pp, n)
        self.engine.set_schedule(self._pipeline_schedules[n])

    def evaluate(self) -> dict[str, float]:
        """Validation losses of the current weights and, with train.ema_decay > 0, of the EMA
        weights (swapped in, then restored bit-exactly): means over train.eval_batches global
        batches of the held-out split, the same samples at every evaluation so that successive
        values compare. val_loss = val_lm_loss + λ·val_mtp_loss (no balance loss)."""
        self._use_batch(self.cfg.train.global_batch)
        out = self._eval_losses("")
        if self.ema is not None:
            with self.ema.swapped_into(dict(self.engine.named_parameters())):
                out.update(self._eval_losses("_ema"))
        return out

    def _eval_losses(self, suffix: str) -> dict[str, float]:
        t = self.cfg.train
        lm = mtp = 0.0
        for k in range(t.eval_batches):
            losses = self.engine.evaluate(self._micro_batches(k * t.global_batch, t.global_batch, split="val"))
            lm, mtp = lm + float(losses.lm), mtp + float(losses.mtp)
        lm, mtp = (v / (self.layout.dp * t.eval_batches) for v in self._sum_over_ranks([lm, mtp]))
        return {f"val_loss{suffix}": lm + self.mtp_lambda * mtp,
                f"val_lm_loss{suffix}": lm, f"val_mtp_loss{suffix}": mtp}

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        """One all-reduce (SUM over every rank) for all of a step's logged numbers."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.topo is not None:
            dist.all_reduce(t)
        return t.tolist()

    @contextlib.contextmanager
    def _collective(self, what: str, step: int):
        """Name the rank, its coordinates and the operation when a collective fails or times out
        (parallel.timeout_s), instead of a bare backend error from somewhere inside the step."""
        if self.topo is None:
            yield
            return
        try:
            yield
        except (RuntimeError, dist.DistError) as err:
            t = self.topo
            where = f"rank {self.rank} (pp {t.pp_rank}, dp {t.dp_rank}, ep {t.ep_rank})"
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            msg = f"{where}: {what} failed at step {step + 1}: {first}"
            print(f"error: {msg}", file=sys.stderr, flush=True)
            raise CollectiveError(msg) from err

    def _maybe_fail(self, step: int) -> None:
        d = self.cfg.debug
        if d.fail_at_step == step and d.fail_rank == self.rank:
            attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
            if not d.fail_once or attempt == 0:
                if d.fail_mode == "hang":  # the others' next collective times out (parallel.timeout_s)
                    print(f"debug: rank {self.rank} hangs at step {step} (attempt {attempt})", flush=True)
                    time.sleep(10 * self.cfg.parallel.timeout_s)
                print(f"debug: rank {self.rank} fails hard at step {step} (attempt {attempt})", flush=True)
                os._exit(13)

    def _begin_step(self, now: dict) -> None:
        """This step's schedules: lr into the optimizer, the pipeline schedule of its global
        batch, λ for the logged losses (the engine gets λ and γ as arguments); the
        saved-activation meter restarts."""
        for g in self.optimizer.param_groups:
            g["lr"] = now["lr"]
        self.activations.reset()
        self.mtp_lambda = now["mtp_lambda"]
        self._use_batch(now["global_batch"])

    def _step(self, step: int, now: dict):
        """One optimizer step, in the paper's order: this rank's samples → forward/backward →
        gradient reduction (DP, expert-DP) → grad norm, the ranks' agreed verdict, clipping →
        AdamW (ZeRO-1) → router biases from the global expert load (→ EMA).
        Returns (StepLosses, grad norm, StepVerdict, StepStats)."""
        batch = now["global_batch"]
        with self._collective("forward/backward (pipeline p2p, expert all-to-all)", step):
            losses = self.engine.forward_backward(self._micro_batches(self.samples, batch), now["mtp_lambda"])
        self.samples += batch
        sharded = self.topo is not None and self.grad_reduce == "reduce_scatter"
        if sharded:  # each rank keeps the reduced range its ZeRO-1 optimizer updates
            with self._collective("gradient reduce-scatter over DP / expert-DP", step):
                reduce_scatter_gradients(self.optimizer.zero_parts(), self.topo)
        elif self.topo is not None:
            with self._collective("gradient all-reduce over DP / expert-DP", step):
                allreduce_gradients(self.modules, self.topo)
        self._maybe_inject_nonfinite(step + 1)
        with self._collective("grad-norm all-reduce", step):
            grad_norm = self.engine.grad_norm(sharded=sharded)
        with self._collective("non-finite / preemption agreement all-reduce", step):
            verdict = self._agree_on_step(step + 1, losses)
        self.skipped_steps += verdict.nonfinite  # on_nonfinite=skip: no update of any state
        if not verdict.nonfinite:
            clip_grads_(self.engine.parameters(), grad_norm, self.cfg.train.grad_clip)
            with self._collective("optimizer step (ZeRO-1 parameter broadcast)", step):
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with self._collective("expert-load all-reduce", step):  # + router biases, MoE counters
            moe = self.engine.end_step(update_biases=not verdict.nonfinite, gamma=now["bias_update_gamma"])
        if self.ema is not None and not verdict.nonfinite:
            self.ema.update(dict(self.engine.named_parameters()))
        return losses, grad_norm, verdict, moe

    def _summed_metrics(self, losses, moe: StepStats) -> tuple[float, float, float, dict]:
        """(lm, mtp, aux losses, {a2a bytes, memory bytes}) of the step over all ranks: losses
        summed over the ranks of each replica (forward_backward's contract), then averaged over
        the DP replicas; a2a bytes the total over all ranks (one all-reduce for all of them)."""
        lm, mtp, aux, intra, inter = self._sum_over_ranks([float(losses.lm), float(losses.mtp), moe.aux_loss,
                                                           moe.a2a_bytes_intra_node, moe.a2a_bytes_inter_node])
        a2a = {"a2a_bytes_intra_node": int(intra), "a2a_bytes_inter_node": int(inter)}
        dp = self.layout.dp
        return lm / dp, mtp / dp, aux / dp, {**a2a, **self._memory_bytes()}

    def train(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        start = self._resume()
        if start >= t.steps:  # e.g. `make train` again after it finished: keep the run as it is
            if self.is_main:
                print(f"nothing to train: {cfg.run.dir} is at step {start} of train.steps={t.steps}", flush=True)
            self.engine.close()
            self.writer.close()
            if self.ema is not None:
                self.ema.close()
            return
        sink = None
        if self.is_main:
            os.makedirs(cfg.run.dir, exist_ok=True)
            OmegaConf.save(cfg, os.path.join(cfg.run.dir, "config.yaml"))
            sink = MetricsSink(cfg.run.dir, cfg.logging, OmegaConf.to_container(cfg, resolve=True), self.steps, start)
        try:
            self.preemption.install()
            for step in range(start, self.steps):
                step_no = step + 1
                self._maybe_fail(step_no)
                self.faults.at_step_start(step_no)
                t0 = time.perf_counter()
                now = self.schedules.at(step, self.samples)  # lr, global batch, λ, γ of this step
                lr, batch = now["lr"], now["global_batch"]
                self._begin_step(now)
                losses, grad_norm, verdict, moe = self._step(step, now)
                if cfg.debug.record_timeline and self.schedule is not None and step == start:
                    self.engine.save_timeline(cfg.run.dir)
                    self.engine.timeline.enabled = False
                lm, mtp, aux, summed = self._summed_metrics(losses, moe)
                dt = time.perf_counter() - t0
                val = {}
                if t.eval_every and (step_no % t.eval_every == 0 or step_no == self.steps):
                    with self._collective("evaluation (forward-only pipeline p2p, expert all-to-all)", step):
                        val = self.evaluate()
                saved = verdict.preempt or (bool(cfg.checkpoint.every) and step_no % cfg.checkpoint.every == 0)
                block_s = self._save(step_no) if saved else 0.0
                if sink is not None:
                    sink.log(step_no, {**self._record(lm, mtp, aux, grad_norm, lr, batch * t.seq_len / dt, dt, moe.loads),
                                       "global_batch": batch, "samples": self.samples, **summed, **val,
                                       "skipped_steps": self.skipped_steps, "checkpoint_block_s": block_s},
                             extra=self._per_layer_load(moe.loads) if cfg.logging.log_expert_load_per_layer else None)
                if verdict.preempt and step_no < self.steps:
                    raise Preempted(step_no)
                if t.exit_after_steps and step_no - start >= t.exit_after_steps and step_no < self.steps:
                    if not saved:
                        self._save(step_no)
                    return
            if cfg.checkpoint.final and not (cfg.checkpoint.every and self.steps % cfg.checkpoint.every == 0):
                self._save(self.steps)
        finally:
            self.preemption.restore()
            self._close_writer(sys.exc_info()[1])
            if sink is not None:
                sink.close()
            if self.ema is not None:
                self.ema.close()
            self.engine.close()

    def _record(self, lm, mtp, aux, grad_norm, lr, tokens_per_s, dt, loads) -> dict:
        cvs = [_load_cv(l) for l in loads.values()]
        mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * self.layout.world_size)
        return {
            "loss": lm + self.mtp_lambda * mtp + aux,
            "lm_loss": lm,
            "mtp_loss": mtp,
            "aux_loss": aux,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "expert_load_cv": float(np.mean(cvs)) if cvs else 0.0,
            "step_time_s": dt,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "saved_activation_bytes": self.activations.peak,
        }

    def _memory_bytes(self) -> dict:
        """param/grad/optimizer-state bytes of this rank (rank 0's are the plain keys) and their
        max and min over all ranks, from one all-gather of every rank's figures. The first step
        this process logs also writes the whole table to run.dir/rank_bytes.json (global rank →
        param/grad/optimizer-state/saved-activation bytes): the measured side of launch.plan's
        per_rank entries, rank by rank."""
        keys = ("param_bytes", "grad_bytes", "optimizer_state_bytes", "saved_activation_bytes")
        mine = torch.tensor([self.param_bytes, self.optimizer.grad_bytes, self.optimizer.state_bytes(),
                             self.activations.peak], dtype=torch.float64)
        table = [mine]
        if self.topo is not None:
            table = [torch.empty_like(mine) for _ in range(self.layout.world_size)]
            dist.all_gather(table, mine)
        rows = [dict(zip(keys, (int(v) for v in t.tolist()))) for t in table]
        if self.is_main and not self._rank_bytes_written:
            os.makedirs(self.cfg.run.dir, exist_ok=True)
            with open(os.path.join(self.cfg.run.dir, "rank_bytes.json"), "w") as f:
                json.dump([{"rank": r, **row} for r, row in enumerate(rows)], f)
            self._rank_bytes_written = True
        out = {k: rows[self.rank][k] for k in keys[:3]}
        for k in keys[:3]:
            out[f"{k}_max"], out[f"{k}_min"] = max(r[k] for r in rows), min(r[k] for r in rows)
        return out

    @staticmethod
    def _per_layer_load(loads) -> dict:
        out = {}
        for name, l in loads.items():
            frac = l / l.sum().clamp_min(1)
            out[f"expert_load/{name}/min"] = float(frac.min())
            out[f"expert_load/{name}/max"] = float(frac.max())
            out[f"expert_load/{name}/cv"] = _load_cv(l)
        return out


def _load_cv(load: torch.Tensor) -> float:
    """Coefficient of variation of one MoE layer's tokens per expert (0 = perfectly balanced)."""
    return float(load.std(unbiased=False) / load.mean().clamp_min(1e-9))
