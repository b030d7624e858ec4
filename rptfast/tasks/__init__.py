"""Tasks: how prompts are made and completions scored. The trainer knows only `Task`.

A task's prompts are a pure function of their global index, so that resuming a run or
sharding prompts across ranks gives every rank the same prompts in the same places.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Prompt:
    index: int  # global index in the task's prompt stream
    token_ids: list[int]
    meta: dict[str, Any] = field(default_factory=dict)  # whatever score() needs (ground truth, ...)


class Task(Protocol):
    name: str

    def prompts(self, start: int, count: int) -> list[Prompt]:
        """Prompts start .. start+count-1 of the stream (deterministic, endless or wrapping)."""

    def score(self, prompt: Prompt, completion: list[int]) -> float:
        """Reward of one completion (token ids, EOS included if sampled)."""

    def evaluate(self, engine, count: int, seed: int) -> dict[str, float]:
        """Task metrics on `count` held-out prompts through the rollout engine."""

    # optional: pretrain_samples(start, count) -> list[model.Sequence], the sequences of the next-token phase
    # (train.ntp_steps); trained_length(prompt, completion) -> int, the completion tokens the update trains on
    # (all of them when a task has none: inline RPT trains on the thought and the prediction, not what follows)


def make_task(cfg, tokenizer, seed: int) -> Task:
    """The task named by data.task."""
    if cfg.data.task == "first_token":
        from rptfast.tasks.first_token import FirstTokenTask
        return FirstTokenTask(tokenizer, cfg.data, cfg.rollout, seed)
    if cfg.data.task == "parity":
        from rptfast.tasks.parity import ParityTask
        return ParityTask(tokenizer, cfg.data, cfg.rollout, seed)
    if cfg.data.task == "toy":
        from rptfast.tasks.toy import ToyTask
        return ToyTask(tokenizer, cfg.data, cfg.rollout, seed, cfg.train.ntp_sequences)
    from rptfast.tasks.rpt import RPTTask
    return RPTTask(tokenizer, cfg.data, cfg.rollout, seed)
