"""Learning-rate schedule of DeepSeek-V3, scaled to the run: linear warm-up, constant, cosine decay."""
from __future__ import annotations

import math


def lr_at(step: int, *, peak: float, minimum: float, warmup: int, decay_start: float, total: int) -> float:
    """lr for optimizer step `step` (0-based): warm-up to `peak` over `warmup` steps, hold until
    `decay_start`·total, then cosine down to `minimum` at the last step."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    start = max(int(decay_start * total), warmup)
    if step < start or total - 1 <= start:
        return peak
    progress = min(1.0, (step - start) / (total - 1 - start))
    return minimum + 0.5 * (peak - minimum) * (1 + math.cos(math.pi * progress))
