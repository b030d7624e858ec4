"""Schedules over the global step: the learning rate of each phase."""

from __future__ import annotations

import math

from rptfast import config


def lr_at(cfg: config.Config, step: int) -> float:
    """Learning rate at a global step: each phase warms up linearly, then constant or cosine."""
    t = cfg.train
    if step < t.ntp_steps:
        peak, i, n = t.ntp_lr, step, t.ntp_steps
    else:
        peak, i, n = t.lr, step - t.ntp_steps, t.steps
    if i < t.warmup_steps:
        return peak * (i + 1) / (t.warmup_steps + 1)
    if t.schedule == "cosine":
        frac = (i - t.warmup_steps) / max(1, n - t.warmup_steps)
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    return peak
