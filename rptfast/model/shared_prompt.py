"""Prompt-once packing: a group's prompt once in a row, then its G completions, and attention over it.

A group's G completions share one prompt, so a packed row holds the prompt once and its
completions after it (`train.share_prompts`). Positions continue from the prompt; the prompt
attends causally to itself, each completion to the whole prompt and causally to itself, never to
another completion. `pack_shared` and `collate_shared` build such rows; `SharedLayout` cuts one
into segments; `_SharedAttention` is the per_seq backend's exact attention over it (each segment
causally against its own keys, and each prompt's completions all at once against the prompt's keys,
merged by log-sum-exp: no work on the masked blocks, the prompt's keys read once). The varlen and
flash backends run the same two parts through FlashAttention's varlen kernels (model/flash_shared.py).
The sdpa backend runs the same rule as a dense [T, T] boolean mask (SharedLayout.dense_mask: exact, O(T^2)).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from rptfast.model.packing import MicroBatch, Sequence, check_prompts, context_positions, ntp_tensors


class VarlenSeqs(NamedTuple):
    """The sequences of one FlashAttention varlen call: cumulative lengths [N + 1] int32, and the longest."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int

    @classmethod
    def of(cls, q_lens: list[int], k_lens: list[int], device: torch.device) -> VarlenSeqs:
        """A query sequence with no keys has nothing to attend to: FlashAttention gives it a log-sum-exp of +inf,
        which the merge turns into NaN (exp(lse - inf) with inf - inf); refused here, where the lengths are known."""
        if any(k <= 0 < q for q, k in zip(q_lens, k_lens, strict=True)):
            raise ValueError(f"a varlen call with a query sequence that has no keys (q lengths {q_lens}, k lengths "
                             f"{k_lens}): every sequence's queries need at least one key")
        cu = lambda x: torch.tensor([0, *itertools.accumulate(x)], dtype=torch.int32, device=device)  # noqa: E731
        return cls(cu(q_lens), cu(k_lens), max(q_lens, default=0), max(k_lens, default=0))


@dataclass
class SharedLayout:
    """How a prompt-once row is cut into segments, and the index tensors of the attention calls over it.

    A segment is a prompt (keys: its own tokens, causal) or a completion (keys: its prompt, then
    its own tokens, causal bottom-right aligned). Segments tile the row in order; a unit is a prompt
    and the completions after it.
    """

    segments: list[tuple[int, int, int, int]]  # (start, length, prompt start, prompt length); prompt length 0: a prompt
    # _SharedAttention (CPU): per segment length L: (L, token indices [n * L]), n segments of that length
    own: list[tuple[int, torch.Tensor]]
    # per batch of units of equal prompt length: (p_len, q_len, prompt token indices [n * p_len], completion token
    # indices [n * q_len] (padding reads token 0), padding [n, 1, q_len] bool)
    cross: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]
    # flash_shared (CUDA): the own call runs over the row as it lies, cut at the segments; the cross call over the
    # units that have completion tokens, in row order: their completion tokens [Q] as queries (a unit's completions
    # one query sequence), their prompts' tokens [K] as keys
    own_varlen: VarlenSeqs
    cross_varlen: VarlenSeqs
    cross_q: torch.Tensor  # [Q] long
    cross_k: torch.Tensor  # [K] long

    PAD_FRACTION = 0.25  # a cross batch takes another unit only while its padding queries stay below this share

    @classmethod
    def build(cls, segments: list[tuple[int, int, int, int]], device: torch.device) -> SharedLayout:
        """Index tensors of each batched call, made once per micro-batch (every layer uses them)."""
        by_len: dict[int, list[int]] = {}
        units: dict[int, list[int]] = {}  # prompt start -> its completions' tokens, in row order
        p_lens: dict[int, int] = {}
        for start, length, p_start, p_len in segments:
            by_len.setdefault(length, []).extend(range(start, start + length))
            if p_len:
                units.setdefault(p_start, []).extend(range(start, start + length))
                p_lens[p_start] = p_len
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        own = [(length, t(idx)) for length, idx in by_len.items()]
        by_p: dict[int, list[int]] = {}
        for p_start in units:
            by_p.setdefault(p_lens[p_start], []).append(p_start)
        cross = []
        for p_len, starts in by_p.items():
            starts.sort(key=lambda s: -len(units[s]))
            batches: list[list[int]] = []
            for s in starts:  # longest first, so a batch's first unit sets its padded length
                b = batches[-1] if batches else []
                real = sum(len(units[u]) for u in b) + len(units[s])  # queries with s added; padded: (n + 1) q_len
                if b and real >= (1 - cls.PAD_FRACTION) * (len(b) + 1) * len(units[b[0]]):
                    b.append(s)
                else:
                    batches.append([s])
            for b in batches:
                q_len = len(units[b[0]])
                k_idx = [i for s in b for i in range(s, s + p_len)]
                q_idx = [i for s in b for i in units[s] + [0] * (q_len - len(units[s]))]
                pad = [[i >= len(units[s]) for i in range(q_len)] for s in b]
                cross.append((p_len, q_len, t(k_idx), t(q_idx), torch.tensor(pad, device=device).unsqueeze(1)))
        lens = [length for _, length, _, _ in segments]
        return cls(segments, own, cross, VarlenSeqs.of(lens, lens, device),
                   VarlenSeqs.of([len(units[s]) for s in units], [p_lens[s] for s in units], device),
                   t([i for s in units for i in units[s]]), t([i for s in units for i in range(s, s + p_lens[s])]))

    def token_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token: its unit (a prompt and the completions after it) and its completion (0: the prompt)."""
        unit, comp = [], []
        units: dict[int, int] = {}  # prompt start -> unit id
        n_comp: dict[int, int] = {}
        for start, length, p_start, p_len in self.segments:
            if p_len == 0:
                units[start], n_comp[start] = len(units), 0
            else:
                n_comp[p_start] += 1
            unit += [units[p_start]] * length
            comp += [n_comp[p_start]] * length
        return torch.tensor(unit), torch.tensor(comp)

    def dense_mask(self, device: torch.device) -> torch.Tensor:
        """[T, T] bool, True where a query (row) may attend to a key (column): same unit, key not
        after the query, and the key in the prompt or in the query's own completion."""
        unit, comp = (x.to(device) for x in self.token_ids())
        idx = torch.arange(unit.numel(), device=device)
        return ((unit[:, None] == unit[None, :]) & (idx[None, :] <= idx[:, None])
                & ((comp[None, :] == 0) | (comp[None, :] == comp[:, None])))

    @property
    def attention_pairs(self) -> int:
        return sum(length * p_len + length * (length + 1) // 2 for _, length, _, p_len in self.segments)


# the CPU flash-attention kernels that scaled_dot_product_attention dispatches to, called directly for
# their log-sum-exp: [B, Hq, Lq, D] x [B, Hkv, Lk, D] -> out [B, Hq, Lq, D], lse [B, Hq, Lq] fp32 (GQA native)
_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _rows(x: torch.Tensor, idx: torch.Tensor, length: int) -> torch.Tensor:
    """x [H, T, ...] at flat token indices idx [n * length] -> [n, H, length, ...]."""
    return x.index_select(1, idx).unflatten(1, (idx.numel() // length, length)).transpose(0, 1)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[n, H, length, ...] -> [H, n * length, ...], the inverse of _rows's reshape."""
    return x.transpose(0, 1).flatten(1, 2)


def shared_attention(query, key, value, layout: SharedLayout, scaling=None):
    """Attention over a prompt-once row (per_seq backend): query [1, Hq, T, D], key/value [1, Hkv, T, D]
    -> [1, T, Hq, D]. See _SharedAttention."""
    out = _SharedAttention.apply(query[0], key[0], value[0], layout, scaling)  # [Hq, T, D]
    return out.transpose(0, 1)[None], None


class _SharedAttention(torch.autograd.Function):
    """Exact attention over a prompt-once row in two parts, merged by log-sum-exp.

    own:   every segment (a prompt or a completion) against its own keys, causal; segments of equal
           length in one flash call.
    cross: a unit's completions (all of them, one after another) against its prompt's keys, no mask;
           units of equal prompt length in one call, their completion queries padded to the batch's
           longest (padding at most 1/4 of a batch's queries, else a new batch).
    A completion token's output is (e^lse_own o_own + e^lse_cross o_cross) / (e^lse_own + e^lse_cross),
    in fp32; a prompt token's is its own part alone. Nothing is masked inside a call, so the masked-out
    blocks (other completions, other units) are never computed and the prompt's keys and values are read
    once per unit, not gathered once per completion.

    The CPU flash kernels return a log-sum-exp but no gradient through it, so the backward is written
    here: each part's backward is the kernel's, given the merged output and merged log-sum-exp (the
    probabilities it recomputes, exp(s - lse), are then those of the full softmax over both parts, and
    its rowsum(dO * O) term is the full one), and the parts' gradients add up.
    Left out: dropout (the trainer sets it to 0) and sliding windows (shares_prompts refuses them).
    """

    @staticmethod
    def forward(ctx, q, k, v, layout: SharedLayout, scale: float | None):
        # q [Hq, T, D], k/v [Hkv, T, D]
        H, T, D = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)  # the merge's dtype: fp32 (fp64 for fp64 inputs)
        out = q.new_empty(H, T, D, dtype=acc)  # [Hq, T, D]: the own part, then merged in place at completion tokens
        lse = q.new_empty(H, T, dtype=acc)  # [Hq, T]
        for length, idx in layout.own:
            o, lse_own = _flash_fwd(*(_rows(x, idx, length) for x in (q, k, v)), 0.0, True, scale=scale)
            out.index_copy_(1, idx, _flat(o).to(acc))
            lse.index_copy_(1, idx, _flat(lse_own))
        for p_len, q_len, k_idx, q_idx, pad in layout.cross:
            o, lse_x = _flash_fwd(_rows(q, q_idx, q_len), _rows(k, k_idx, p_len), _rows(v, k_idx, p_len), 0.0, False,
                                  scale=scale)
            real = ~pad.flatten()
            dst = q_idx[real]  # [Q] completion tokens, each in exactly one cross batch
            o, lse_x = _flat(o)[:, real].to(acc), _flat(lse_x)[:, real]  # [Hq, Q, D], [Hq, Q]
            lse_own = lse[:, dst]
            lse_m = torch.logaddexp(lse_own, lse_x)
            merged = ((lse_own - lse_m).exp()[..., None] * out[:, dst]
                      + (lse_x - lse_m).exp()[..., None] * o)  # [Hq, Q, D]
            out.index_copy_(1, dst, merged)
            lse.index_copy_(1, dst, lse_m)
        out = out.to(q.dtype)  # one rounding to the compute dtype, after the merge
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale = layout, scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        d_out = d_out.contiguous()
        acc = torch.promote_types(q.dtype, torch.float32)  # the parts' gradients add up in fp32
        # every token is in exactly one own-part call, so these are all written
        dq, dk, dv = (torch.empty_like(x, dtype=acc) for x in (q, k, v))
        for length, idx in layout.own:
            g = _flash_bwd(*(_rows(x, idx, length) for x in (d_out, q, k, v, out, lse)), 0.0, True, scale=scale)
            for grad, part in zip((dq, dk, dv), g):
                grad.index_copy_(1, idx, _flat(part).to(acc))
        for p_len, q_len, k_idx, q_idx, pad in layout.cross:
            # padding queries: zero gradient and output, and a log-sum-exp of +inf (probabilities exp(s - inf) = 0
            # whatever the scores), so they add exactly zero to dq, dk and dv
            gq, gk, gv = _flash_bwd(_rows(d_out, q_idx, q_len).masked_fill(pad[..., None], 0), _rows(q, q_idx, q_len),
                                    _rows(k, k_idx, p_len), _rows(v, k_idx, p_len),
                                    _rows(out, q_idx, q_len).masked_fill(pad[..., None], 0),
                                    _rows(lse, q_idx, q_len).masked_fill(pad, float("inf")), 0.0, False, scale=scale)
            dq.index_add_(1, q_idx, _flat(gq).to(acc))
            dk.index_add_(1, k_idx, _flat(gk).to(acc))
            dv.index_add_(1, k_idx, _flat(gv).to(acc))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def pack_shared(seqs: list[Sequence], budget: int) -> list[list[int]]:
    """Group sequence indices into prompt-once micro-batches of at most `budget` tokens.

    Sequences with the same prompt (the tokens before Sequence.prompt_len, which is `start` unless the
    sequence says otherwise) form a unit that costs the prompt once plus each completion. A unit larger
    than the budget is split into parts, first-fit decreasing on completion lengths, each part paying for
    its own copy of the prompt; the parts are then packed first-fit decreasing like sequences. Two parts
    of one prompt never land in one micro-batch (they would have been one part), so collate_shared can
    regroup a bin by prompt.
    """
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(seqs):
        by_prompt.setdefault(tuple(s.tokens[:s.prompt_len]), []).append(i)
    units: list[tuple[int, list[int]]] = []  # (tokens, sequence indices)
    for prompt, members in by_prompt.items():
        P = len(prompt)
        parts: list[list[int]] = []
        room: list[int] = []
        for i in sorted(members, key=lambda i: P - len(seqs[i].tokens)):
            n = len(seqs[i].tokens) - P
            if P + n > budget:
                raise ValueError(f"a sequence of {P + n} tokens does not fit train.micro_batch_tokens = {budget}; "
                                 f"raise it to at least {P + n} (prompt + rollout.max_tokens)")
            for b, r in enumerate(room):
                if n <= r:
                    parts[b].append(i)
                    room[b] -= n
                    break
            else:
                parts.append([i])
                room.append(budget - P - n)
        units += [(budget - r, part) for part, r in zip(parts, room)]
    bins: list[list[int]] = []
    room = []
    for n, part in sorted(units, key=lambda u: -u[0]):
        for b, r in enumerate(room):
            if n <= r:
                bins[b] += part
                room[b] -= n
                break
        else:
            bins.append(list(part))
            room.append(budget - n)
    return [sorted(b) for b in bins]


def collate_shared(seqs: list[Sequence], idx: list[int], device: torch.device) -> MicroBatch:
    """seqs[idx] as one prompt-once row: per distinct prompt, the prompt, then each completion.

    Positions: the prompt's 0..P-1, every completion's P..P+R-1. The prompt's last hidden state
    predicts the first token of every completion. Scored tokens lie in the completion (start >= prompt_len;
    start > prompt_len scores only its tail, as the information-gain reward scores the truth after a
    thought). Scored tokens come in the order of `idx`,
    sequence by sequence, as in `collate`, so both give the same [R] layout for the same idx.
    """
    check_prompts(seqs, idx, shared=True)  # so every unit's prompt, the keys of its completions' cross part, is
    # non-empty
    units: dict[tuple[int, ...], list[int]] = {}
    for i in idx:
        units.setdefault(tuple(seqs[i].tokens[:seqs[i].prompt_len]), []).append(i)
    ids: list[int] = []
    pos: list[int] = []
    segments: list[tuple[int, int, int, int]] = []
    where: dict[int, tuple[int, int]] = {}  # sequence -> (its prompt's first position, its completion's first)
    for prompt, members in units.items():
        p0, P = len(ids), len(prompt)
        ids += prompt
        pos += range(P)
        segments.append((p0, P, p0, 0))
        for i in members:
            completion = seqs[i].tokens[P:]
            where[i] = (p0, len(ids))
            if completion:
                segments.append((len(ids), len(completion), p0, P))
                pos += range(P, P + len(completion))
                ids += completion
    pred, tgt, sid, adv, rlp, ntp_idx, ntp_tgt = [], [], [], [], [], [], []
    for k, i in enumerate(idx):
        s = seqs[i]
        p0, first = where[i]
        P = s.prompt_len
        if s.context is not None:  # the context lies in the row's one copy of the prompt
            ntp_idx += context_positions(s, p0)
            ntp_tgt += s.tokens[max(1, s.context[0]):s.context[1]]
        scored = s.scored
        # row position of token j: in the prompt's copy (j < P) or in this sequence's completion
        pred += [p0 + j - 1 if j - 1 < P else first + j - 1 - P for j in scored]
        tgt += [s.tokens[j] for j in scored]
        sid += [k] * s.n_scored
        adv += [s.advantage] * s.n_scored
        rlp += s.rollout_logprobs if s.rollout_logprobs is not None else [0.0] * s.n_scored
    cu = [0]
    for _, length, _, _ in segments:
        cu.append(cu[-1] + length)
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    return MicroBatch(t(ids, torch.long), t(pos, torch.long), t(cu, torch.int32), max(s[1] for s in segments),
                      t(pred, torch.long), t(tgt, torch.long), t(sid, torch.long), t(adv, torch.float32),
                      t(rlp, torch.float32), torch.ones(len(tgt), dtype=torch.bool, device=device),
                      None, *ntp_tensors(ntp_idx, ntp_tgt, any(seqs[i].context is not None for i in idx), device),
                      shared=SharedLayout.build(segments, device))
