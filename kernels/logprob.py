"""Selective log-probabilities: log_softmax(logits / T)[target] per row, without an fp32 [N, V] tensor.

Torch, plainly (reference.selective_logprob): log_softmax in fp32 writes an fp32 [N, V] tensor and
its backward another; at N=32768, V=151936 that is 20 GB each.
Here: the forward reads the logits once (N*V elements) with an online logsumexp over vocabulary
blocks and writes three floats per row (logprob, logsumexp, entropy); the backward reads the logits
once more and writes the gradient once, in the logits dtype (into the logits' own storage with
inplace_backward=True), and skips the read for rows whose upstream gradient is 0.

Left out, on purpose: ignore_index (every target must be a real token id; mask the result instead),
label smoothing and z-loss (the RL loss uses neither), fp64 in the Triton kernels (the torch path
takes fp64, which is what gradcheck needs).
"""

import torch
import triton
import triton.language as tl

from ._utils import (
    LOG_FLOOR,
    backward_warps,
    check_logits,
    check_targets,
    check_temperature,
    compute_dtype,
    cpu_rows,
    unit_stride_rows,
    use_triton,
    vocab_block,
    vocab_warps,
)


@triton.jit
def _stats_block(row_ptr, cols, V, inv_temp, m, s, t, WITH_ENTROPY: tl.constexpr, MASKED: tl.constexpr):
    """One block's update of the online (max m, sum s, entropy sum t) state; see _softmax_stats."""
    if MASKED:
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"))
    else:
        z = tl.load(row_ptr + cols)
    z = z.to(tl.float32) * inv_temp
    m_new = tl.maximum(m, tl.max(z, axis=0))
    # reference point for the exponentials: m_new, or 0 while every logit so far is -inf (then
    # exp(-inf - -inf) would be NaN; with 0 the block contributes exp(-inf) = 0 and s stays 0)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_ref)
    e = tl.exp(z - m_ref)  # 0 outside the row and at -inf logits
    if WITH_ENTROPY:
        # move t's reference point from m to m_new; on the first finite block s == 0 and m == -inf
        shift = tl.where(s > 0, m - m_ref, 0.0)  # m_ref == m_new when s > 0; never -inf - -inf
        t = alpha * (t + s * shift) + tl.sum(e * tl.maximum(z - m_ref, LOG_FLOOR), axis=0)
    s = s * alpha + tl.sum(e, axis=0)
    return m_new, s, t


@triton.jit
def _softmax_stats(row_ptr, V, inv_temp, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """One online pass over a row of z = x * inv_temp: returns (logsumexp(z), entropy of softmax(z)).

    Keeps the running max m, s = sum exp(z - m) and t = sum exp(z - m) * (z - m); the entropy is
    log(s) - t / s, which has no cancellation against large logits. -inf logits (masked vocabularies,
    top-k/top-p processed logits) are exact zeros of the distribution, also in a block holding nothing
    else; a row whose logits are all -inf has no distribution and gives NaN.

    Full blocks load without a mask and a masked tail follows: with a row stride divisible by 16, the
    full blocks use 16-byte vector loads even when V is not (151655, 50257), since a mask `cols < V`
    with V % 16 != 0 would make every load scalar.
    """
    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    t = 0.0
    v_full = V // BLOCK_V * BLOCK_V
    for start in range(0, v_full, BLOCK_V):
        m, s, t = _stats_block(row_ptr, start + offs, V, inv_temp, m, s, t, WITH_ENTROPY, False)
    if v_full < V:
        m, s, t = _stats_block(row_ptr, v_full + offs, V, inv_temp, m, s, t, WITH_ENTROPY, True)
    log_s = tl.log(s)
    return m + log_s, log_s - t / s


@triton.jit
def _grad_block(
    src_ptr, dst_ptr, cols, V, target, lse, entropy, g_logp, g_ent, inv_temp,
    WITH_ENTROPY: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One block of _write_logprob_grad. Each thread stores exactly the elements it loaded (same layout),
    so in place (dst == src) no thread can overwrite a value another thread has yet to read."""
    if MASKED:
        z = tl.load(src_ptr + cols, mask=cols < V, other=0.0)
    else:
        z = tl.load(src_ptr + cols)
    logp = tl.maximum(z.to(tl.float32) * inv_temp - lse, LOG_FLOOR)  # floored: see LOG_FLOOR
    p = tl.exp(logp)
    grad = g_logp * (tl.where(cols == target, 1.0, 0.0) - p)
    if WITH_ENTROPY:
        grad -= g_ent * p * (logp + entropy)
    grad = (grad * inv_temp).to(dst_ptr.dtype.element_ty)
    if MASKED:
        tl.store(dst_ptr + cols, grad, mask=cols < V)
    else:
        tl.store(dst_ptr + cols, grad)


@triton.jit
def _write_logprob_grad(
    src_ptr,
    dst_ptr,
    V,
    target,
    lse,
    entropy,
    g_logp,
    g_ent,
    inv_temp,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """dst = d(g_logp * logp + g_ent * entropy) / dx for one row; dst may be src (in place).

    d logp / dz_v = [v == target] - p_v;  d entropy / dz_v = -p_v (log p_v + entropy);  dz/dx = 1/T.
    Full blocks, then a masked tail, as in _softmax_stats.
    """
    offs = tl.arange(0, BLOCK_V)
    v_full = V // BLOCK_V * BLOCK_V
    for start in range(0, v_full, BLOCK_V):
        _grad_block(
            src_ptr, dst_ptr, start + offs, V, target, lse, entropy, g_logp, g_ent, inv_temp, WITH_ENTROPY, False
        )
    if v_full < V:
        _grad_block(
            src_ptr, dst_ptr, v_full + offs, V, target, lse, entropy, g_logp, g_ent, inv_temp, WITH_ENTROPY, True
        )


@triton.jit
def _write_zero_row(dst_ptr, V, BLOCK_V: tl.constexpr):
    """dst = 0 for one row, without reading anything (a row whose upstream gradient is 0)."""
    offs = tl.arange(0, BLOCK_V)
    zeros = tl.zeros([BLOCK_V], dtype=dst_ptr.dtype.element_ty)
    v_full = V // BLOCK_V * BLOCK_V
    for start in range(0, v_full, BLOCK_V):
        tl.store(dst_ptr + start + offs, zeros)
    if v_full < V:
        tl.store(dst_ptr + v_full + offs, zeros, mask=v_full + offs < V)


@triton.jit
def _selective_logprob_fwd_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    logp_ptr,
    lse_ptr,
    entropy_ptr,
    V,
    inv_temp,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    lse, entropy = _softmax_stats(row_ptr, V, inv_temp, WITH_ENTROPY, BLOCK_V)
    target = tl.load(targets_ptr + row)
    z_target = tl.load(row_ptr + target).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, z_target - lse)
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, entropy)


@triton.jit
def _selective_logprob_bwd_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,
    stride_grad_row,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    V,
    inv_temp,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row of the backward. A row whose upstream gradients are both 0 (a masked token) gets zeros
    without reading its logits: equal to the formula for finite logits, and no NaN or inf there leaks."""
    row = tl.program_id(0).to(tl.int64)
    dst_ptr = grad_ptr + row * stride_grad_row
    g_logp = tl.load(grad_logp_ptr + row)
    g_ent = 0.0
    if WITH_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + row)
    if (g_logp != 0.0) | (g_ent != 0.0):
        target = tl.load(targets_ptr + row)
        lse = tl.load(lse_ptr + row)
        entropy = 0.0
        if WITH_ENTROPY:
            entropy = tl.load(entropy_ptr + row)
        _write_logprob_grad(
            logits_ptr + row * stride_row,
            dst_ptr,
            V,
            target,
            lse,
            entropy,
            g_logp,
            g_ent,
            inv_temp,
            WITH_ENTROPY,
            BLOCK_V,
        )
    else:
        _write_zero_row(dst_ptr, V, BLOCK_V)


def selective_logprob_forward(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logprob [N], logsumexp [N], entropy [N] or None), fp32 (fp64 for fp64 logits on the torch path).

    `logits` [N, V] must have unit stride along V (any row stride); inputs are already checked.
    """
    n_rows, vocab = logits.shape
    dtype = compute_dtype(logits.dtype)
    logp = torch.empty(n_rows, dtype=dtype, device=logits.device)  # [N]
    lse = torch.empty_like(logp)  # [N]
    entropy = torch.empty_like(logp) if with_entropy else None  # [N]
    if n_rows == 0:
        return logp, lse, entropy
    inv_temp = 1.0 / temperature
    if use_triton(logits):
        block = vocab_block(vocab)
        _selective_logprob_fwd_kernel[(n_rows,)](
            logits,
            logits.stride(0),
            targets,
            logp,
            lse,
            entropy if with_entropy else lse,
            vocab,
            inv_temp,
            WITH_ENTROPY=with_entropy,
            BLOCK_V=block,
            num_warps=vocab_warps(block),
        )
        return logp, lse, entropy
    step = cpu_rows(vocab)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        z = logits[rows].to(dtype) * inv_temp  # [n, V] fp32 tile
        lse[rows] = torch.logsumexp(z, dim=-1)
        logp[rows] = z.gather(1, targets[rows, None].long()).squeeze(1) - lse[rows]
        if with_entropy:
            z -= lse[rows, None]  # log p, in place
            z.clamp_(min=torch.finfo(dtype).min)  # -inf logits: p log p = 0, not 0 * -inf (LOG_FLOOR)
            entropy[rows] = -(z.exp() * z).sum(-1)
    return logp, lse, entropy


def selective_logprob_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Writes d(sum grad_logp * logp + grad_entropy * entropy) / d logits into `out` [N, V] and returns it.

    `out` may be `logits` itself (in place: each block is read before it is written). `grad_logp` and
    `grad_entropy` are contiguous [N]; entropy terms are skipped when `entropy` is None.
    """
    n_rows, vocab = logits.shape
    with_entropy = entropy is not None
    if n_rows == 0:
        return out
    inv_temp = 1.0 / temperature
    if use_triton(logits):
        block = vocab_block(vocab)
        _selective_logprob_bwd_kernel[(n_rows,)](
            logits,
            logits.stride(0),
            out,
            out.stride(0),
            targets,
            lse,
            entropy if with_entropy else lse,
            grad_logp,
            grad_entropy if with_entropy else grad_logp,
            vocab,
            inv_temp,
            WITH_ENTROPY=with_entropy,
            BLOCK_V=block,
            num_warps=backward_warps(block, logits.device),
        )
        return out
    dtype = lse.dtype
    floor = torch.finfo(dtype).min
    step = cpu_rows(vocab)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        logp = (logits[rows].to(dtype) * inv_temp - lse[rows, None]).clamp_(min=floor)  # [n, V] fp32 tile
        p = logp.exp()
        g_logp = grad_logp[rows, None].to(dtype)  # [n, 1]
        grad = p * -g_logp
        grad.scatter_add_(1, targets[rows, None].long(), g_logp)
        active = g_logp != 0  # [n, 1] rows with an upstream gradient; the others get zeros (as the kernel)
        if with_entropy:
            logp += entropy[rows, None]
            g_ent = grad_entropy[rows, None].to(dtype)
            grad -= g_ent * p * logp
            active |= g_ent != 0
        out[rows] = torch.where(active, grad * inv_temp, 0.0)
    return out


class SelectiveLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, return_entropy, inplace_backward):
        logp, lse, entropy = selective_logprob_forward(logits, targets, temperature, return_entropy)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, targets, lse, entropy = ctx.saved_tensors
        if ctx.inplace_backward:
            grad = logits  # [N, V] the logits' own storage
        else:
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # [N, V]
        selective_logprob_backward(
            logits,
            targets,
            lse,
            entropy,
            grad_logp.contiguous(),
            None if grad_entropy is None else grad_entropy.contiguous(),
            ctx.temperature,
            out=grad,
        )
        if ctx.inplace_backward:
            # the kernel wrote through a raw pointer; bump the version so that any other autograd node that
            # saved these logits raises on unpacking them instead of computing with a gradient
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None


def selective_logprob(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    inplace_backward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(logits / temperature)[targets] per row: [N, V] -> [N] fp32; grad to logits.

    logits [N, V] bf16/fp16/fp32 (fp64 on the CPU torch path, which then returns fp64), any V; rows
    may have any stride, but a non-unit stride along V costs one contiguous copy. targets [N] int64
    or int32 in [0, V). With return_entropy, also the entropy [N] of softmax(logits / temperature).

    Both outputs are differentiable: the entropy gradient, -p (log p + H) / T, costs one fused term
    in the same backward pass, and lets a caller add an entropy bonus. The gradient is written in
    the logits dtype; no fp32 [N, V] tensor is made on any path. Rows whose upstream gradients are
    both 0 (masked tokens) get a zero gradient without being read, so NaN or inf logits there cannot
    leak into it. -inf logits (masked vocabularies, top-k/top-p processed logits) are zeros of the
    distribution and give finite results; a row of only -inf logits gives NaN.

    inplace_backward=True writes the gradient into the logits' own storage instead of a new [N, V]
    tensor (V * N * itemsize bytes saved at the backward's peak). Only for logits that are dead after
    this call: nothing else may read them afterwards (autograd raises if another node saved them and
    unpacks them after this backward; a plain read of the tensor would see the gradient).
    """
    check_logits(logits)
    check_targets(targets, logits.shape[0], logits.shape[1], logits.device)
    temperature = check_temperature(temperature)
    return SelectiveLogprobFunction.apply(
        unit_stride_rows(logits), targets.contiguous(), temperature, bool(return_entropy), bool(inplace_backward)
    )
