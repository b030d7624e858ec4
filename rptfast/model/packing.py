"""Packing: sequences into micro-batches of at most `train.micro_batch_tokens` tokens.

The default packs each micro-batch into one row of T tokens with position ids restarting at every
sequence and no padding (`pack`: first-fit decreasing; `collate`: the row and its index tensors).
`train.packing = "padded"` makes [B, L] rows instead, the ablation. Prompt-once rows, where a
group's completions share one copy of its prompt, are in model/shared_prompt.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rptfast.model.shared_prompt import SharedLayout


@dataclass
class Sequence:
    """One prompt + completion (or context + target) as the trainer sees it."""

    tokens: list[int]  # prompt then completion
    start: int  # index of the first scored token (the completion's first)
    advantage: float = 0.0
    rollout_logprobs: list[float] | None = None  # the engine's logprob of each scored token
    context: tuple[int, int] | None = None  # tokens[a:b] also scored by the next-token loss (algorithm.ntp_coef)
    prompt: int | None = None  # tokens[:prompt] shared with the group's other sequences (prompt-once rows); None: start
    skip: tuple[int, ...] = ()  # positions at or after start left unscored (a warm-up's inserted thought spans)

    @property
    def prompt_len(self) -> int:
        return self.start if self.prompt is None else self.prompt

    @property
    def scored(self) -> list[int]:
        """Positions of the scored tokens, in order."""
        if not self.skip:
            return list(range(self.start, len(self.tokens)))
        skip = set(self.skip)
        return [j for j in range(self.start, len(self.tokens)) if j not in skip]

    @property
    def n_scored(self) -> int:
        return len(self.tokens) - self.start - len(self.skip)


@dataclass
class MicroBatch:
    """Sequences for one forward: packed into one row of T tokens (the default), or padded
    to [B, L] (the ablation); R scored tokens in S sequences either way."""

    input_ids: torch.Tensor  # packed: [T]; padded: [B, L]
    position_ids: torch.Tensor  # same shape; packed positions restart at 0 for every sequence
    cu_seqlens: torch.Tensor  # [S + 1] int32 sequence boundaries in the packed row
    max_len: int
    pred_idx: torch.Tensor  # [R] flat position whose hidden state predicts each scored token
    targets: torch.Tensor  # [R] the scored tokens
    seq_ids: torch.Tensor  # [R] index of each scored token's sequence within this micro-batch
    advantages: torch.Tensor  # [R]
    rollout_logprobs: torch.Tensor  # [R] (zeros when the sequences carry none)
    mask: torch.Tensor  # [R] bool: False only in the padding micro-batch of a rank with fewer
    attention_mask: torch.Tensor | None = None  # padded only: [B, L]
    ntp_idx: torch.Tensor | None = None  # [C] flat position predicting each context token (Sequence.context), if any
    ntp_targets: torch.Tensor | None = None  # [C] the context tokens
    shared: SharedLayout | None = None  # prompt-once rows only (collate_shared); cu_seqlens then holds segments

    @property
    def n_tokens(self) -> int:
        """Real tokens (padding excluded)."""
        return int(self.cu_seqlens[-1])


def pack(seqs: list[Sequence], budget: int, padded: bool = False) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most `budget` tokens, longest first.

    Packed: first-fit decreasing on lengths. Padded: a micro-batch costs its size times its
    longest sequence, so runs of similar lengths are cut where the next one would not fit.
    """
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].tokens))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(seqs[i].tokens)
        if n > budget:
            raise ValueError(f"a sequence of {n} tokens does not fit train.micro_batch_tokens = {budget}; "
                             f"raise it to at least {n} (prompt + rollout.max_tokens)")
        if padded:
            if bins and (len(bins[-1]) + 1) * len(seqs[bins[-1][0]].tokens) <= budget:
                bins[-1].append(i)
            else:
                bins.append([i])
            continue
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(budget - n)
    return [sorted(b) for b in bins]


def check_prompts(seqs: list[Sequence], idx: list[int], shared: bool = False) -> None:
    """Every sequence has a token before its first scored one: a causal LM scores token t from the hidden state
    at t - 1, and with an empty prompt that index would fall on the previous sequence's last token (or wrap to
    the row's end) and score the token against an unrelated context. In a prompt-once row (`shared`) the prompt
    is what a sequence shares with its group (Sequence.prompt_len), which must hold a token too."""
    for i in idx:
        n = seqs[i].prompt_len if shared else seqs[i].start
        if n < 1:
            raise ValueError(f"sequence {i} has an empty prompt ({'prompt' if shared else 'start'} = {n}): its "
                             "first token has no hidden state before it to be scored from; give every prompt at "
                             "least one token (a BOS)")


def collate(seqs: list[Sequence], idx: list[int], device: torch.device, masked: bool = False,
            padded: bool = False) -> MicroBatch:
    """seqs[idx] as one micro-batch (masked=True: one that contributes nothing)."""
    check_prompts(seqs, idx)
    L = max(len(seqs[i].tokens) for i in idx)
    ids, pos, cu, pred, tgt, sid, adv, rlp, ntp_idx, ntp_tgt = [], [], [0], [], [], [], [], [], [], []
    for k, i in enumerate(idx):
        s = seqs[i]
        off = k * L if padded else cu[-1]
        ids += s.tokens + ([0] * (L - len(s.tokens)) if padded else [])
        pos += list(range(len(s.tokens))) + ([0] * (L - len(s.tokens)) if padded else [])
        cu.append(cu[-1] + len(s.tokens))
        scored = s.scored
        pred += [off + j - 1 for j in scored]
        tgt += [s.tokens[j] for j in scored]
        sid += [k] * s.n_scored
        adv += [s.advantage] * s.n_scored
        rlp += s.rollout_logprobs if s.rollout_logprobs is not None else [0.0] * s.n_scored
        if s.context is not None:
            ntp_idx += context_positions(s, off)
            ntp_tgt += s.tokens[max(1, s.context[0]):s.context[1]]
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    attention_mask = None
    ids_t, pos_t = t(ids, torch.long), t(pos, torch.long)
    if padded:
        ids_t, pos_t = ids_t.view(len(idx), L), pos_t.view(len(idx), L)
        attention_mask = (torch.arange(L, device=device)[None, :] <
                          t([len(seqs[i].tokens) for i in idx], torch.long)[:, None]).long()
    return MicroBatch(ids_t, pos_t, t(cu, torch.int32), L, t(pred, torch.long), t(tgt, torch.long),
                      t(sid, torch.long), t(adv, torch.float32), t(rlp, torch.float32),
                      torch.full((len(tgt),), not masked, dtype=torch.bool, device=device), attention_mask,
                      *ntp_tensors(ntp_idx, ntp_tgt, any(seqs[i].context is not None for i in idx), device))


def context_positions(s: Sequence, first: int) -> list[int]:
    """Flat positions predicting s.tokens[a:b] (a >= 1: token 0 has nothing before it), s starting at `first`."""
    a, b = s.context
    return list(range(first + max(1, a) - 1, first + b - 1))


def ntp_tensors(idx: list[int], targets: list[int], wanted: bool, device: torch.device):
    """(ntp_idx, ntp_targets) of a micro-batch: None, None unless one of its sequences has a context."""
    if not wanted:
        return None, None
    return (torch.tensor(idx, dtype=torch.long, device=device), torch.tensor(targets, dtype=torch.long, device=device))
