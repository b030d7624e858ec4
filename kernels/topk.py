"""Entropy of the renormalised top-k next-token distribution, the data filter's proxy for difficulty.

    H_k = -sum_{i in top k} q_i log q_i,   q = softmax over the k largest logits of the row

Torch, plainly (reference.topk_entropy): torch.topk, then a softmax over [N, k]. Here: one program per
row streams the vocabulary in blocks and keeps the k largest values seen so far in a K-slot register
array (K = k rounded up to a power of two, at least 16; spare slots hold +inf and never take part). For each
block it counts the values above the running k-th largest and inserts that many (at most k), largest
first, each replacing the current minimum. After the first blocks few values qualify, so the work is
close to one read of the logits; nothing but N floats is written.

Left out, on purpose: a gradient (the filter only ranks data) and a temperature (the filter scores
the model's own distribution). A sort-based merge was tried first: exact too, but a bitonic sort per
block made Triton's interpreter (the CPU test path) a hundred times slower.
"""

import torch
import triton
import triton.language as tl

from ._utils import LOG_FLOOR, check_logits, cpu_rows, unit_stride_rows, use_triton, vocab_block, vocab_warps


@triton.jit
def _topk_entropy_kernel(logits_ptr, stride_row, out_ptr, V, k, K: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    slots = tl.arange(0, K)
    best = tl.where(slots < k, float("-inf"), float("inf"))  # [K] running top k (unordered)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)  # [BLOCK_V]
        lowest = tl.min(best, axis=0)
        n_insert = tl.minimum(tl.sum((x > lowest).to(tl.int32), axis=0), k)
        for _ in range(n_insert):
            v, at = tl.max(x, axis=0, return_indices=True)
            lowest, slot = tl.min(best, axis=0, return_indices=True)
            # replace the smallest kept value by v if v beats it (else rewrite it unchanged)
            best = tl.where(slots == slot, tl.maximum(v, lowest), best)
            x = tl.where(offs == at, float("-inf"), x)
    keep = slots < k
    m = tl.max(tl.where(keep, best, float("-inf")), axis=0)
    # kept -inf values (rows with fewer than k finite logits, e.g. top-k processed ones) have q = 0; the
    # floor turns their 0 * -inf into 0 (see LOG_FLOOR)
    shifted = tl.where(keep, tl.maximum(best - m, LOG_FLOOR), 0.0)
    e = tl.where(keep, tl.exp(shifted), 0.0)
    s = tl.sum(e, axis=0)
    # H = -sum q log q with q = e / s and log q = shifted - log s
    tl.store(out_ptr + row, tl.log(s) - tl.sum(e * shifted, axis=0) / s)


def topk_entropy(logits: torch.Tensor, k: int = 16) -> torch.Tensor:
    """logits [N, V] (bf16/fp16/fp32; fp64 on the CPU torch path) -> fp32 [N]: entropy of softmax over
    each row's k largest logits (ties broken arbitrarily: equal values give the same entropy).

    1 <= k <= V. Rows must be unit-stride along V (else one contiguous copy). No gradient. -inf logits
    count as probability 0 (a row with fewer than k finite logits has the entropy of those); a row of
    only -inf logits gives NaN.
    """
    check_logits(logits)
    n_rows, vocab = logits.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, V={vocab}], got {k!r}")
    logits = unit_stride_rows(logits.detach())
    out = torch.empty(n_rows, dtype=torch.float32, device=logits.device)  # [N]
    if n_rows == 0:
        return out
    if use_triton(logits):
        block = vocab_block(vocab)
        _topk_entropy_kernel[(n_rows,)](
            logits,
            logits.stride(0),
            out,
            vocab,
            k,
            K=max(triton.next_power_of_2(k), 16),
            BLOCK_V=block,
            num_warps=vocab_warps(block),
        )
        return out
    step = cpu_rows(vocab)
    for start in range(0, n_rows, step):
        top = logits[start : start + step].topk(k, dim=-1).values.float()  # [n, k]
        logq = torch.log_softmax(top, dim=-1).clamp_(min=torch.finfo(torch.float32).min)  # -inf: see LOG_FLOOR
        out[start : start + step] = -(logq.exp() * logq).sum(-1)
    return out
