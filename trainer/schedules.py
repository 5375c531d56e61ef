"""The training schedules, as pure functions of the optimizer step and the tokens consumed before it.

DeepSeek-V3 changes four things during pre-training, all at token boundaries: the learning rate
(warm-up in steps, constant, cosine, two constant tail stages), the global batch (ramped over the
first tokens), the router bias update speed γ and the MTP loss weight λ. The keys are generic
(token boundaries and values under ``train.*``), so a toy preset scales them down;
configs/train/deepseek_v3.yaml holds the report's values.

Data position is counted in samples: step ``s`` consumes the global sample indices
``samples_before(s) … + batch_at(s)``, so a batch-size change (ramp, or a resume under another
``train.global_batch``) continues the sample stream with nothing skipped or repeated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from model.config import ConfigError


def piecewise(stages: Sequence[Sequence[float]], tokens: float, default: float) -> float:
    """Value of a ``[[from_tokens, value], ...]`` schedule at ``tokens`` consumed: the value of the
    last stage whose ``from_tokens`` ≤ tokens; ``default`` before the first (or with no stages)."""
    value = default
    for start, v in stages:
        if tokens >= start:
            value = v
    return float(value)


def check_stages(key: str, stages: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    """Named error unless ``stages`` is a list of [from_tokens, value] pairs, boundaries ascending."""
    out = []
    for st in stages or []:
        if len(st) != 2:
            raise ConfigError(f"{key}: expected [[from_tokens, value], ...], got {list(stages)}")
        out.append((float(st[0]), float(st[1])))
    if any(b[0] <= a[0] for a, b in zip(out, out[1:])) or any(s < 0 for s, _ in out):
        raise ConfigError(f"{key}: token boundaries must be >= 0 and strictly increasing, got {out}")
    return out


@dataclass(frozen=True)
class LrSchedule:
    """Linear warm-up to ``peak`` over ``warmup`` steps; then either the step-based schedule
    (constant until ``decay_start``·total steps, cosine to ``minimum`` at the last step) or, with
    ``decay_end_tokens`` > 0, the token-based one: constant until ``decay_start_tokens``, cosine to
    ``minimum`` at ``decay_end_tokens``, then the ``tail`` stages ([from_tokens, lr]; ``minimum``
    where none applies)."""
    peak: float
    minimum: float
    warmup: int
    decay_start: float = 0.5
    total: int = 1
    decay_start_tokens: float = 0.0
    decay_end_tokens: float = 0.0
    tail: tuple = ()

    def __call__(self, step: int, tokens: float = 0.0) -> float:
        if self.warmup > 0 and step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.decay_end_tokens > 0:
            if tokens < self.decay_start_tokens:
                return self.peak
            if tokens < self.decay_end_tokens:
                progress = (tokens - self.decay_start_tokens) / (self.decay_end_tokens - self.decay_start_tokens)
                return self.minimum + 0.5 * (self.peak - self.minimum) * (1 + math.cos(math.pi * progress))
            return piecewise(self.tail, tokens, self.minimum)
        start = max(int(self.decay_start * self.total), self.warmup)
        if step < start or self.total - 1 <= start:
            return self.peak
        progress = min(1.0, (step - start) / (self.total - 1 - start))
        return self.minimum + 0.5 * (self.peak - self.minimum) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class BatchRamp:
    """Global batch (sequences) as a function of the samples consumed before the step, as
    Megatron's rampup_batch_size: from ``start`` up by ``increment`` in equal sample intervals over
    the first ``ramp_samples``, then ``final``. ``start`` = 0: no ramp (always ``final``)."""
    final: int
    start: int = 0
    increment: int = 0
    ramp_samples: float = 0.0

    def batch_at(self, samples: int) -> int:
        if not self.start or samples >= self.ramp_samples:
            return self.final
        n_increments = (self.final - self.start) // self.increment
        per_increment = self.ramp_samples / n_increments
        return min(self.final, self.start + self.increment * int(samples // per_increment))

    def sizes(self) -> list[int]:
        """Every global batch the run can use (the ramp's steps and the final one)."""
        if not self.start:
            return [self.final]
        return list(range(self.start, self.final, self.increment)) + [self.final]

    def samples_before(self, step: int) -> int:
        """Samples consumed by steps 0 … step-1 (a loop over the ramp, then closed form)."""
        samples = 0
        for s in range(step):
            b = self.batch_at(samples)
            if b == self.final:
                return samples + (step - s) * self.final
            samples += b
        return samples

    def steps_for_tokens(self, tokens: float, seq_len: int) -> int:
        """Steps until at least ``tokens`` tokens are consumed."""
        return sum(self.steps_per_batch(tokens, seq_len).values())

    def steps_per_batch(self, tokens: float, seq_len: int) -> dict[int, int]:
        """{global batch: steps run at it} until at least ``tokens`` tokens are consumed."""
        target, samples, out = tokens / seq_len, 0, {}
        while samples < target:
            b = self.batch_at(samples)
            if b == self.final:
                out[b] = out.get(b, 0) + math.ceil((target - samples) / self.final)
                break
            out[b] = out.get(b, 0) + 1
            samples += b
        return out


@dataclass(frozen=True)
class Schedules:
    """Everything that changes during a run, from ``train.*`` (validated with named errors)."""
    lr: LrSchedule
    batch: BatchRamp
    seq_len: int
    gamma: tuple = ()  # [from_tokens, γ] stages ...
    mtp_lambda: tuple = ()  # [from_tokens, λ] stages ...
    gamma_default: float = 1e-3  # ... and the values before the first stage (the model config's)
    mtp_lambda_default: float = 0.3

    @classmethod
    def from_config(cls, t, steps: int, model_cfg, unit: int = 1) -> "Schedules":
        """``t``: the train config; ``model_cfg``: γ and λ where no stage applies; ``unit``: what
        every global batch must be a multiple of (parallel.dp × train.micro_batch; DualPipe: twice
        that, for an even micro-batch count)."""
        if t.batch_ramp_start:
            inc = t.batch_ramp_increment or unit
            if not 0 < t.batch_ramp_start < t.global_batch:
                raise ConfigError(f"train.batch_ramp_start={t.batch_ramp_start} must be in (0, train.global_batch="
                                  f"{t.global_batch})")
            if t.batch_ramp_start % unit or inc % unit or (t.global_batch - t.batch_ramp_start) % inc:
                raise ConfigError(
                    f"train.batch_ramp_start={t.batch_ramp_start} and train.batch_ramp_increment={inc} must be "
                    f"multiples of {unit} (parallel.dp × train.micro_batch, ×2 for dualpipe) and the increment "
                    f"must divide train.global_batch - train.batch_ramp_start")
            if t.batch_ramp_tokens <= 0:
                raise ConfigError(f"train.batch_ramp_tokens: must be > 0 with a batch ramp, got {t.batch_ramp_tokens}")
            batch = BatchRamp(t.global_batch, t.batch_ramp_start, inc, t.batch_ramp_tokens / t.seq_len)
        else:
            batch = BatchRamp(t.global_batch)
        if t.lr_decay_end_tokens and not 0 <= t.lr_decay_start_tokens < t.lr_decay_end_tokens:
            raise ConfigError(f"train.lr_decay_start_tokens={t.lr_decay_start_tokens} must be in "
                              f"[0, train.lr_decay_end_tokens={t.lr_decay_end_tokens})")
        lr = LrSchedule(peak=t.lr, minimum=t.min_lr, warmup=t.warmup_steps, decay_start=t.decay_start, total=steps,
                        decay_start_tokens=t.lr_decay_start_tokens, decay_end_tokens=t.lr_decay_end_tokens,
                        tail=tuple(check_stages("train.lr_tail", t.lr_tail)))
        return cls(lr, batch, t.seq_len, tuple(check_stages("train.bias_update_gamma", t.bias_update_gamma)),
                   tuple(check_stages("train.mtp_lambda", t.mtp_lambda)),
                   float(model_cfg.bias_update_gamma), float(model_cfg.mtp_lambda))

    def at(self, step: int, samples: int) -> dict:
        """The values of step ``step`` that starts after ``samples`` consumed samples."""
        tokens = samples * self.seq_len
        return {"lr": self.lr(step, tokens), "global_batch": self.batch.batch_at(samples),
                "bias_update_gamma": piecewise(self.gamma, tokens, self.gamma_default),
                "mtp_lambda": piecewise(self.mtp_lambda, tokens, self.mtp_lambda_default)}
