"""Counted FLOPs of a forward, for MFU: weights, lm_head and the attention pairs a mask lets through."""

from __future__ import annotations

from torch import nn

from rptfast.model.packing import MicroBatch


def attention_pairs(mb: MicroBatch) -> int:
    """(query, key) pairs the micro-batch's mask lets through: what exact attention computes."""
    if mb.shared is not None:
        return mb.shared.attention_pairs
    lens = (mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).long()
    return int((lens * (lens + 1) // 2).sum())


def flop_rates(lm: nn.Module) -> tuple[int, int, int]:
    """Forward FLOPs of lm (per token, per scored token, per attended (query, key) pair).

    Per token: 2 per weight of the decoder's matrices (the embedding lookup is free). Per scored
    token: 2 V H for lm_head (only scored positions reach it). Per pair: 4 per query-head
    dimension per layer (QK^T and PV). Norms, rotary and activations are left out (small).
    """
    c = lm.config
    body = sum(p.numel() for n, p in lm.named_parameters()
               if p.dim() == 2 and "embed_tokens" not in n and "lm_head" not in n)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * body, 2 * c.vocab_size * c.hidden_size, 4 * c.num_hidden_layers * c.num_attention_heads * head_dim


def forward_flops(rates: tuple[int, int, int], mb: MicroBatch) -> int:
    """Counted forward FLOPs of one micro-batch (see flop_rates); its backward counts twice as many."""
    per_token, per_scored, per_pair = rates
    return per_token * mb.n_tokens + per_scored * int(mb.mask.numel()) + per_pair * attention_pairs(mb)
