"""Liger-Kernel's fused-linear GRPO loss beside ours: the peer a user would pick for rptfast.kernels.linear_policy_loss.

liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss (liger-kernel 0.8.5, pinned in pyproject's dev extra) takes
[B, T, H] hidden states, the [V, H] lm_head weight, [B, T] token ids and mask, one advantage per sequence; per chunk
of sequences it streams the vocabulary in chunks of 4096 (logits, then recomputed logits in the backward: four
matmuls), with the loss math under torch.compile (compiled=True, its default) and the gradients computed in the
forward. Ours takes the same tokens flat ([B * T]), with the advantage repeated per token, and makes three matmuls.

Matched: on-policy (old log-probs = the forward's own, detached: ratio 1), clip eps_low 0.2 / eps_high 0.28, a k3
KL term (beta = kl_coef = 0.04) to reference log-probs given as data (Liger's use_ref_model=True with
ref_per_token_logps, so neither runs a reference model), temperature 1, token-mean over all tokens (Liger's
loss_type "bnpo": the sum over unmasked tokens / their count). Every token is scored (mask of ones), as in Liger's
own benchmark; a masked token would cost Liger its matmuls and ours nothing.

On the CPU Liger runs too (its chunked loss is torch; compiled=False there: inductor would need a C++ toolchain and
minutes), which is how tests/kernels/test_kernel_liger_peer.py holds both to an fp64 reference.
"""

from __future__ import annotations

import torch
from rptfast.kernels import linear_logprob, linear_policy_loss, reference

OPTIONS = dict(eps_low=0.2, eps_high=0.28, kl_coef=0.04)


def inputs(b: int, t: int, h: int, v: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """hidden [B*T, H] ~ N(0, 1), weight [V, H] with logits of std ~3, targets, per-sequence advantages, and
    reference log-probs within ~0.1 nat of the policy's (a realistic KL term)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b * t, h, generator=g).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) * 3 * h**-0.5).to(device, dtype)
    targets = torch.randint(0, v, (b * t,), generator=g).to(device)
    adv = torch.randn(b, generator=g).to(device)
    with torch.no_grad():
        logp = linear_logprob(hidden, weight, targets).float()
    ref = logp + 0.1 * torch.randn(b * t, generator=g).to(device)
    return dict(b=b, t=t, hidden=hidden, weight=weight, targets=targets, adv=adv, ref=ref)


def ours(x: dict, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    return linear_policy_loss(hidden, weight, x["targets"], None, x["adv"].repeat_interleave(x["t"]), mask,
                              ref_logprobs=x["ref"], **OPTIONS)[0]


def liger_loss(compiled: bool):
    """The Liger module configured as the module docstring says, or None when liger-kernel does not import."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    return LigerFusedLinearGRPOLoss(beta=OPTIONS["kl_coef"], compiled=compiled, use_ref_model=True, chunk_size=1,
                                    epsilon_low=OPTIONS["eps_low"], epsilon_high=OPTIONS["eps_high"],
                                    loss_type="bnpo", temperature=1.0)


def liger(module, x: dict, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    b, t = x["b"], x["t"]
    mask = torch.ones(b, t, device=hidden.device)
    return module(hidden.view(b, t, -1), weight, x["targets"].view(b, t), mask, x["adv"],
                  ref_per_token_logps=x["ref"].view(b, t))[0]


def gold(x: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad hidden, grad weight) of kernels/reference.py's plain torch loss in `dtype` (fp64 on the CPU,
    fp32 on a GPU) on the same (rounded) inputs."""
    h, w = (x[k].detach().to(dtype).requires_grad_() for k in ("hidden", "weight"))
    mask = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    loss = reference.linear_policy_loss(h, w, x["targets"], None, x["adv"].repeat_interleave(x["t"]).to(dtype), mask,
                                        ref_logprobs=x["ref"].to(dtype), **OPTIONS)[0]
    loss.backward()
    return loss.detach(), h.grad, w.grad


def loss_and_grads(fn, x: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, w = (x[k].detach().clone().requires_grad_() for k in ("hidden", "weight"))
    loss = fn(x, h, w)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def compare(b: int, t: int, h: int, v: int, device: torch.device, dtype: torch.dtype, compiled: bool) -> dict:
    """Time of forward + backward (median; CUDA: do_bench), peak memory beyond the inputs (CUDA), and each loss's
    and gradient's relative error against the reference (fp32 on a GPU, fp64 on the CPU)."""
    from kernels import peak_extra_mb, timeit

    x = inputs(b, t, h, v, device, dtype)
    module = liger_loss(compiled)
    impls = {"ours": ours} | ({"liger": lambda x, hd, w: liger(module, x, hd, w)} if module is not None else {})
    want = gold(x, torch.float64 if device.type == "cpu" else torch.float32)
    out: dict = {"liger_kernel": _version(), "liger_compiled": compiled}
    losses, grads = {}, {}
    for name, fn in impls.items():
        losses[name], *grads[name] = loss_and_grads(fn, x)
        out[f"{name}_loss_rel_err"] = abs(losses[name].double().item() - want[0].double().item()) / abs(want[0].item())
        out[f"{name}_grad_hidden_rel_err"] = rel(grads[name][0], want[1])
        out[f"{name}_grad_weight_rel_err"] = rel(grads[name][1], want[2])
        h_, w_ = (x[k].detach().clone().requires_grad_() for k in ("hidden", "weight"))

        def step(fn=fn, h_=h_, w_=w_):
            h_.grad = w_.grad = None
            fn(x, h_, w_).backward()

        out[f"{name}_ms"] = timeit(step, device)
        out[f"{name}_peak_mb"] = peak_extra_mb(step, device)
        del h_, w_
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "liger" in losses:  # the two against each other, besides each against the reference
        a, b = losses["ours"].item(), losses["liger"].item()
        out["ours_vs_liger_loss_rel"] = abs(a - b) / abs(b)
        out["ours_vs_liger_grad_hidden_rel"] = rel(grads["ours"][0], grads["liger"][0])
        out["ours_vs_liger_grad_weight_rel"] = rel(grads["ours"][1], grads["liger"][1])
    for k in ("liger_ms", "liger_peak_mb"):
        out.setdefault(k, None)
    if out["liger_ms"]:
        out["x_liger_time"] = out["liger_ms"] / out["ours_ms"]
    if out["liger_peak_mb"] and out["ours_peak_mb"]:
        out["x_liger_memory"] = out["liger_peak_mb"] / out["ours_peak_mb"]
    return out


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:  # not installed: the comparison says so instead of failing
        return "not installed"
