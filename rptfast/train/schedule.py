"""Schedules over the global step: the learning rate of each phase, the thought budget; the length term."""

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


def budget_at(cfg: config.Config, step: int) -> int:
    """The thought budget (rollout.max_tokens) at a global RL step: constant, or decayed from
    rollout.max_tokens at the first RL step to rollout.max_tokens_end at the last, linearly or along
    half a cosine, rounded to whole tokens. The length term of the reward is separate (algorithm.length_coef)."""
    r = cfg.rollout
    if r.budget_schedule == "constant":
        return r.max_tokens
    frac = min(1.0, max(0, step - cfg.train.ntp_steps) / max(1, cfg.train.steps - 1))
    if r.budget_schedule == "linear":
        value = r.max_tokens + (r.max_tokens_end - r.max_tokens) * frac
    else:
        value = r.max_tokens_end + (r.max_tokens - r.max_tokens_end) * 0.5 * (1 + math.cos(math.pi * frac))
    return round(value)


def length_penalty(cfg: config.Config, n_tokens: int) -> float:
    """algorithm.length_coef per completion token beyond algorithm.length_target (subtracted from the reward)."""
    a = cfg.algorithm
    return a.length_coef * max(0, n_tokens - a.length_target)
