"""Log-probabilities straight from hidden states and the lm_head, never a full [N, V] tensor.

Torch, plainly (reference.linear_logprob): logits = hidden @ weight.T is an [N, V] tensor (10 GB in
bf16 at N=32768, V=151936), then log_softmax writes another in fp32.
Here: rows go through in tiles of `tile_rows` rows. Forward, per tile: one matmul into a reused
[rows, V] buffer (cuBLAS on CUDA), then the selective_logprob kernel reads it once. Backward, per
tile: the matmul again (recompute instead of storing N*V logits), the selective_logprob backward
writes d logits over the same buffer in place, then grad_hidden = d logits @ weight and
grad_weight += d logits.T @ hidden. Memory beyond the inputs and gradients: one tile plus O(N)
floats, flat in N. FLOPs: forward one matmul (2*N*H*V), backward three, so forward + backward is
about 4x the forward, above DESIGN.md's 3.2x. When the loss is known before the forward (on-policy
batches), linear_loss.linear_policy_loss makes the gradient while the logits are live: three matmuls.

The backward leaves out the rows whose upstream gradients are all 0 (masked tokens): only the other
rows are gathered (index_select of hidden, tile by tile), and grad_hidden is 0 at the rest. Their
d logits would be exact zeros anyway, but in grad_weight += d logits.T @ hidden a NaN or inf in such a
row's hidden state would still leak (0 x NaN = NaN in a matmul); left out, it cannot, and their three
backward matmuls are saved. It costs one host sync per backward (the count of rows kept sizes the
tiles). The forward computes every row (it cannot know which ones the caller will mask).

Left out, on purpose: a bias (lm_heads have none), and a single Triton kernel doing the matmul and
the online logsumexp together (CCE-style): cuBLAS reaches the matmul rate today, and the tile round
trip costs 4*N*V bytes, about 400/H of the matmul time on an H100 (10% at H=4096, 20% at H=2048).
grad_weight accumulates in the weight dtype over tiles (one rounding per tile, as Liger-Kernel
does); an fp32 accumulator would add 4*V*H bytes.
"""

import torch

from ._utils import (
    CPU_TILE_ELEMENTS,
    KERNEL_DTYPES,
    check_targets,
    check_temperature,
    compute_dtype,
    use_triton,
)
from .logprob import selective_logprob_backward, selective_logprob_forward

# Bytes of the logits tile on CUDA: 256 MiB is ~860 rows at V=151936 in bf16, large enough for cuBLAS
# to run at its full rate, small next to the model.
CUDA_TILE_BYTES = 256 << 20


def tile_rows(n_rows: int, vocab: int, elem_size: int, device: torch.device, cuda_scale: int = 1) -> int:
    """Rows per tile: the [rows, V] logits tile fits the budget, cuda_scale x CUDA_TILE_BYTES on CUDA (there
    a multiple of 128 rows)."""
    if device.type == "cuda":
        rows = cuda_scale * CUDA_TILE_BYTES // (vocab * elem_size)
        rows = rows // 128 * 128 if rows >= 128 else max(rows, 1)
    else:
        rows = max(CPU_TILE_ELEMENTS // vocab, 1)
    return max(1, min(rows, n_rows))


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """hidden [N, H] and weight [V, H]: 2-D, same H, dtype and device, a kernel dtype, V >= 1."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor ([N, H] for hidden, [V, H] for weight)")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden is [N, {hidden.shape[1]}] but weight is [V, {weight.shape[1]}]; "
            "weight must be the lm_head weight [V, H] (not transposed)"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one to the other")
    allowed = KERNEL_DTYPES if use_triton(hidden) else KERNEL_DTYPES + (torch.float64,)
    if hidden.dtype not in allowed:
        raise ValueError(f"hidden/weight have dtype {hidden.dtype}; pass bf16, fp16 or fp32")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight on {weight.device}; move them together")
    if weight.shape[0] == 0:
        raise ValueError("weight has V=0 rows; it needs a vocabulary of at least one token")


class LinearLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, return_entropy):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        dtype = compute_dtype(hidden.dtype)
        logp = torch.empty(n_rows, dtype=dtype, device=hidden.device)  # [N]
        lse = torch.empty_like(logp)  # [N]
        entropy = torch.empty_like(logp) if return_entropy else None  # [N]
        rows = tile_rows(n_rows, vocab, hidden.element_size(), hidden.device)
        tile = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)  # [rows, V]
        for start in range(0, n_rows, rows):
            chunk = slice(start, start + rows)
            h = hidden[chunk]  # [n, H]
            logits = torch.mm(h, weight.t(), out=tile[: h.shape[0]])  # [n, V]
            logp[chunk], lse[chunk], ent = selective_logprob_forward(
                logits, targets[chunk], temperature, return_entropy
            )
            if return_entropy:
                entropy[chunk] = ent
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature = temperature
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        vocab = weight.shape[0]
        grad_logp = grad_logp.contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.contiguous()
        active = grad_logp != 0  # [N] rows with an upstream gradient (masked tokens have none)
        if grad_entropy is not None:
            active |= grad_entropy != 0
        rows_idx = active.nonzero().squeeze(1)  # [M]; the one host sync
        pick = lambda t: None if t is None else t.index_select(0, rows_idx)  # noqa: E731
        targets, lse, entropy, grad_logp, grad_entropy = map(pick, (targets, lse, entropy, grad_logp, grad_entropy))
        n_active = rows_idx.numel()
        grad_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if need_weight else None
        rows = tile_rows(n_active, vocab, hidden.element_size(), hidden.device)
        tile = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)  # [rows, V]
        for start in range(0, n_active, rows):
            chunk = slice(start, start + rows)
            idx = rows_idx[chunk]  # [n]
            h = hidden.index_select(0, idx)  # [n, H]
            logits = torch.mm(h, weight.t(), out=tile[: h.shape[0]])  # [n, V], recomputed
            dlogits = selective_logprob_backward(
                logits,
                targets[chunk],
                lse[chunk],
                None if entropy is None else entropy[chunk],
                grad_logp[chunk],
                None if grad_entropy is None else grad_entropy[chunk],
                ctx.temperature,
                out=logits,
            )
            if need_hidden:
                grad_hidden.index_copy_(0, idx, dlogits @ weight)
            if need_weight:
                grad_weight.addmm_(dlogits.t(), h)
        return grad_hidden, grad_weight, None, None, None


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(hidden @ weight.T / temperature)[targets]: [N, H] x [V, H] -> [N] fp32.

    hidden [N, H] and weight [V, H] share a dtype (bf16/fp16/fp32; fp64 on the CPU torch path, which
    then returns fp64) and a device; any strides (they only meet matmuls). targets [N] int64/int32 in
    [0, V). With return_entropy, also the entropy [N] of the tempered distribution; both outputs are
    differentiable, with gradients to hidden and weight (in their dtype). The logits are rounded to
    the input dtype, as the model's own lm_head would round them; softmax math is fp32. Autocast does
    not apply (every matmul writes into a buffer): cast hidden and weight to the dtype you want.
    Pass the full (unsharded) lm_head weight. Rows whose upstream gradients are all 0 (masked tokens)
    are left out of the backward: their gradients are exactly 0 and NaN or inf in their hidden states
    cannot leak into grad_weight (one host sync per backward).
    """
    check_linear_inputs(hidden, weight)
    check_targets(targets, hidden.shape[0], weight.shape[0], hidden.device)
    temperature = check_temperature(temperature)
    return LinearLogprobFunction.apply(hidden, weight, targets.contiguous(), temperature, bool(return_entropy))
