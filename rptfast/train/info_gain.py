"""RLP's information-gain reward (arXiv 2510.01265): a thought is worth what it adds to the log-probability of
the true next token(s), and the no-think baseline is an exponential moving average of the policy.

    r(c) = log p_theta(x_t .. x_t+k-1 | prompt, c, "</think>\\boxed{")  -  log p_ema(x_t .. x_t+k-1 | x_<t)

The first term: the policy, teacher-forced, scores the ground-truth tokens (the document's own token ids,
data.info_gain_tokens of them, log-probs summed) after its thought, closed by data.think_close, and the
answer's opening `\\boxed{` (the format the RPT templates ask for and the toy's demonstrations use); with the
inline template (RLP's own format, `x_<t <think> c </think> x_t`) the truth follows the close directly. The second: the
same tokens after the raw context the prompt kept (no template, no thought), under the EMA weights
(phi <- decay phi + (1 - decay) theta after every optimizer step, algorithm.ema_decay; optimize.ema_update).
Both run through the packed forward and the fused log-prob kernel (no [tokens, vocab] tensor) at temperature
1 (the models' own distributions), after the engine has gone to sleep; the baseline once per position, not
per completion, and the policy's prompt once per group (prompt-once rows, train.share_prompts: the G scoring
sequences of a group share the prompt as the update's rows do; exact, tests/test_rpt_family.py).
The reward then takes the length term (algorithm.length_coef) and group-relative advantages, as RPT's does.

What it leaves out, and why:
- The baseline is the same for every completion of a group, so group-relative advantages (RLP's, and
  GRPO's here) cancel it: it gives the reward its meaning and scale (nats of information, logged) but does
  not change an update. RLP's EMA is kept because the logged gain is the method's own measure of progress.
- Only the thought gets gradient: each completion is cut after its `</think>` before the update. A thought
  cut at the budget (no `</think>`) is closed for scoring and trained on what was sampled.
- Sampling runs past `</think>` (the engines take no stop string); those tokens feed only the task's
  prefix-match accuracy, which is still logged as `accuracy`.
- EMA weights are fp32 (bf16 could not take a 0.001 x step: its spacing is 2^-8 of a weight), on the
  trainer's device and sharded like the policy; their forward computes in the policy's compute dtype.
"""

from __future__ import annotations

import torch

from rptfast.data.templates import PromptBuilder
from rptfast.distributed import all_sum
from rptfast.kernels import group_advantages
from rptfast.model import PolicyLogprob, Sequence
from rptfast.train.groups import Group, trained_part
from rptfast.train.optimize import indexed_micro_batches
from rptfast.train.run import Run
from rptfast.train.schedule import length_penalty

ANSWER_OPEN = "\\boxed{"


def scoring_sequences(groups: list[Group], build: PromptBuilder, answer: list[int], k: int,
                      eos: int | None) -> tuple[list[Sequence], list[Sequence], list[int]]:
    """(policy sequences, one per completion: prompt + thought + close + answer + truth[:k], scored on the truth,
    the prompt shared by the group; baseline sequences, one per group: context + truth[:k]; each completion's
    thought length). A thought cut at the budget (or ended by EOS) without a close is closed here, for scoring."""
    think, plain, lengths = [], [], []
    for g in groups:
        truth, context = g.prompt.meta["truth_ids"][:k], g.prompt.meta["context_ids"]
        plain.append(Sequence(context + truth, len(context)))
        for c in g.completions:
            body, n, _ = build.thought(c.token_ids, eos)
            head = g.prompt.token_ids + body + build.close + answer
            think.append(Sequence(head + truth, len(head), prompt=len(g.prompt.token_ids)))
            lengths.append(n)
    return think, plain, lengths


@torch.no_grad()
def logprob_sums(run: Run, module: PolicyLogprob, seqs: list[Sequence]) -> torch.Tensor:
    """[len(seqs)] fp64: each sequence's scored tokens' log-probs (temperature 1), summed."""
    out = torch.zeros(len(seqs), dtype=torch.float64)
    for idx, mb in indexed_micro_batches(run, seqs):
        logp = module(mb, 1.0)[0]  # [R]
        if idx:
            sums = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, mb.seq_ids.cpu(), logp.double().cpu())
            out[idx] = sums
    return out


def rescore(run: Run, groups: list[Group]) -> dict:
    """Rewards and advantages of `groups` replaced by the information gain (minus the length term), completions
    cut to their thoughts; returns the step's metrics of it (means over every rank)."""
    cfg, tok, build = run.cfg, run.tokenizer, run.task.build
    answer = [] if build.inline else tok.encode(ANSWER_OPEN, add_special_tokens=False)
    think, plain, lengths = scoring_sequences(groups, build, answer, cfg.data.info_gain_tokens, tok.eos_token_id)
    with_thought = logprob_sums(run, run.policy, think)
    without = logprob_sums(run, run.ema, plain)
    n = cfg.rollout.n
    gain = with_thought - without.repeat_interleave(n)  # [P * G]
    rewards = (gain - torch.tensor([length_penalty(cfg, len(c.token_ids)) for g in groups for c in g.completions],
                                   dtype=torch.float64)).float()
    adv, all_equal = group_advantages(rewards, n, scale=cfg.algorithm.adv_scale, eps=cfg.algorithm.adv_eps)
    for i, g in enumerate(groups):
        part = slice(i * n, (i + 1) * n)
        g.rewards, g.advantages, g.all_equal = rewards[part], adv[part], bool(all_equal[i])
        g.completions = [trained_part(c, m) for c, m in zip(g.completions, lengths[part])]
    s_n, s_r, s_gain, s_think, s_plain, s_len, s_eq = all_sum(
        [gain.numel(), rewards.double().sum().item(), gain.sum().item(), with_thought.sum().item(),
         without.sum().item() * n, sum(lengths), int(all_equal.sum())], run.d)
    s_n = max(s_n, 1)
    # all_equal_frac replaces the rollout's, which counted the prefix-match rewards these replace
    return {"reward": s_r / s_n, "info_gain": s_gain / s_n, "logp_think": s_think / s_n,
            "logp_nothink": s_plain / s_n, "thought_len": s_len / s_n, "all_equal_frac": s_eq * n / s_n}

