"""Rollout: groups of G completions per prompt from the engine, scored by the task, with advantages.

Dynamic sampling (algorithm.dynamic_sampling) drops the groups whose rewards are all equal (zero
advantage, zero gradient) and draws more prompts until the batch is full or the tries run out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rptfast.distributed import all_gather_objects, all_max, all_sum
from rptfast.kernels import group_advantages
from rptfast.metrics import Timer
from rptfast.rollout import Completion, SamplingConfig, sample_seed
from rptfast.tasks import Prompt
from rptfast.train.guards import check_finite_outputs
from rptfast.train.run import Run
from rptfast.train.schedule import budget_at, length_penalty


@dataclass
class Group:
    prompt: Prompt
    completions: list  # rollout.Completion
    rewards: torch.Tensor  # [G]
    advantages: torch.Tensor  # [G]
    all_equal: bool


def trained_part(c: Completion, n: int) -> Completion:
    """The completion's first n tokens, with their rollout log-probs: what the update trains on."""
    return c if n == len(c.token_ids) else dataclasses.replace(c, token_ids=c.token_ids[:n], logprobs=c.logprobs[:n])


def rollout(run: Run, step: int, timer: Timer) -> tuple[list[Group], dict]:
    """Generate and score until the batch holds prompts_per_step useful groups (or tries run out).

    Without dynamic sampling, one try and every group is kept. With it, groups whose
    rewards are all equal (zero advantage, zero gradient) are dropped and the next
    prompts are drawn; across ranks, the first groups by global prompt index are kept,
    so the selection does not depend on the number of ranks.
    """
    cfg, d = run.cfg, run.d
    P, n = cfg.train.prompts_per_step, cfg.rollout.n
    per_rank = P // d.world
    budget = budget_at(cfg, step)
    sampling = SamplingConfig(cfg.rollout.temperature, cfg.rollout.top_p, budget)
    dynamic = cfg.algorithm.dynamic_sampling and step - cfg.train.ntp_steps >= cfg.algorithm.dynamic_sampling_from
    kept: list[Group] = []
    n_kept, tries = 0, cfg.algorithm.dynamic_sampling_tries if dynamic else 1
    rewards_all, correct, lengths, truncated, equal = [], [], [], 0, 0
    for _ in range(tries):
        with timer("generate"):
            prompts = run.task.prompts(run.cursor + d.rank * per_rank, per_rank)
            run.cursor += P
            seeds = [sample_seed(cfg.train.seed, step, p.index) for p in prompts]
            comps = run.engine.generate([p.token_ids for p in prompts], n, sampling, seeds)
            check_finite_outputs(comps, f"rollout of step {step + 1}")
        with timer("reward"):
            rewards = torch.tensor([run.task.score(prompts[c.prompt_index], c.token_ids) for c in comps])
            correct.append(rewards >= 1)  # the task's own verdict, before the length term
            if cfg.algorithm.length_coef:
                rewards = rewards - torch.tensor([length_penalty(cfg, len(c.token_ids)) for c in comps])
            adv, all_equal = group_advantages(rewards, n, scale=cfg.algorithm.adv_scale, eps=cfg.algorithm.adv_eps)
            rewards_all.append(rewards)
            lengths += [len(c.token_ids) for c in comps]
            truncated += sum(c.finish_reason == "length" for c in comps)
            if hasattr(run.task, "trained_length"):  # inline RPT: the thought and the prediction, not what follows
                comps = [trained_part(c, run.task.trained_length(prompts[c.prompt_index], c.token_ids)) for c in comps]
            groups = [Group(p, comps[i * n:(i + 1) * n], rewards[i * n:(i + 1) * n], adv[i * n:(i + 1) * n],
                            bool(all_equal[i])) for i, p in enumerate(prompts)]
            equal += int(all_equal.sum())
            if not dynamic:
                kept = groups
                break
            useful = [g for g in groups if not g.all_equal]
            everyone = sorted(i for idx in all_gather_objects([g.prompt.index for g in useful], d) for i in idx)
            take = set(everyone[:P - n_kept])
            kept += [g for g in useful if g.prompt.index in take]
            n_kept += len(take)
            if n_kept >= P:
                break
    with timer("reward"):
        r = torch.cat(rewards_all)
        s_r, s_acc, s_n, s_len, s_trunc, s_eq, s_groups = all_sum(
            [r.sum().item(), torch.cat(correct).sum().item(), r.numel(), sum(lengths), truncated, equal,
             len(rewards_all) * per_rank], d)
        (max_len,) = all_max([max(lengths)], d)
        stats = {"reward": s_r / s_n, "accuracy": s_acc / s_n, "response_len": s_len / s_n,
                 "response_len_max": max_len, "truncated_frac": s_trunc / s_n, "all_equal_frac": s_eq / s_groups,
                 "groups_kept": all_sum([len(kept)], d)[0], "generated_tokens": s_len, "budget": budget}
        if cfg.algorithm.length_coef:
            (s_pen,) = all_sum([sum(length_penalty(cfg, n_tok) for n_tok in lengths)], d)
            stats["length_penalty"] = s_pen / s_n
    return kept, stats
