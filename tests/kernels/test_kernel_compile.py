"""Every kernel launch compiles for an H100 (sm_90), checked on a machine without a GPU.

Triton's interpreter runs kernels as numpy and accepts programs the compiler rejects (non-power-of-2
blocks, dtype mismatches in loop-carried values, Python control flow on tensors). Here the public
API runs on CPU tensors with every launch redirected: instead of running, each launch's exact
arguments are compiled to a cubin by Triton's own compiler (ptxas ships with Triton). The outputs
are then garbage, which is fine: only compilation is checked. Runs on the plain CPU test run; on a
GPU the kernels are compiled for real, and under TRITON_INTERPRET=1 there is nothing to compile.
"""

import pytest
import torch
import triton
from kernel_checks import DEVICE, randint, randn
from rptfast.kernels import (
    _utils,
    advantages,
    fused_policy_loss_from_logits,
    group_advantages,
    linear_logprob,
    lm_head,
    logprob,
    loss,
    policy_loss,
    selective_logprob,
    topk,
    topk_entropy,
)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

pytestmark = [
    pytest.mark.skipif(
        _utils.INTERPRET or DEVICE.type == "cuda",
        reason="compiles for CUDA from a CPU-only, uninterpreted run",
    ),
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset"),  # triton 3.9's notice
]

TYPES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
    torch.int32: "i32", torch.uint8: "u8",
}  # fmt: skip


def _signature(fn: JITFunction, args, kwargs) -> tuple[dict, dict]:
    values = dict(zip(fn.arg_names, args, strict=False)) | {k: kwargs[k] for k in fn.arg_names if k in kwargs}
    signature, constexprs = {}, {}
    for param in fn.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AssertionError(f"{fn.__name__}: unexpected argument {param.name}={value!r}")
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    return signature, constexprs


@pytest.fixture
def compiled(monkeypatch):
    """Redirects launches to the compiler; yields the list of (kernel name, constexprs) compiled."""
    done = []

    def compile_instead(self, *args, grid, warmup, **kwargs):
        signature, constexprs = _signature(self, args, kwargs)
        options = {k: v for k, v in kwargs.items() if k not in self.arg_names}
        kernel = triton.compile(ASTSource(self, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                options=options)  # fmt: skip
        assert kernel.asm["cubin"], f"{self.__name__} produced no cubin"
        done.append((self.__name__, tuple(sorted(constexprs.items()))))

    monkeypatch.setattr(JITFunction, "run", compile_instead)
    for module in (_utils, logprob, lm_head, loss, advantages, topk):
        monkeypatch.setattr(module, "use_triton", lambda t: True)
    return done


def test_every_launch_compiles_for_sm90(compiled):
    n, v, h = 6, 300, 16
    for dtype in (torch.bfloat16, torch.float32):
        x = randn(n, v, seed=1, dtype=dtype).requires_grad_()
        t = randint(v, n, seed=2)
        lp, ent = selective_logprob(x, t, 0.7, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
        selective_logprob(x, t.int()).sum().backward()
        hidden, weight = randn(n, h, seed=3, dtype=dtype).requires_grad_(), randn(v, h, seed=4, dtype=dtype)
        linear_logprob(hidden, weight, t).sum().backward()
        topk_entropy(x.detach(), 5)
        old, adv, mask = randn(n, seed=5), randn(n, seed=6), randn(n, seed=7) > 0
        full = dict(dual_clip=3.0, ref_logprobs=old, kl_coef=0.1, rollout_logprobs=old, tis_cap=2.0)
        for options in ({}, full):
            lp = randn(n, seed=8, dtype=dtype).requires_grad_()
            policy_loss(lp, old, adv, mask, **options)[0].backward()
            fused_policy_loss_from_logits(x.detach().clone(), t, old, adv, mask, **options)
    for scale in ("group", "none"):
        group_advantages(randn(24, seed=9), 4, scale)
        group_advantages(randn(4096 * 2, seed=10), 4096, scale)
    names = {name for name, _ in compiled}
    assert names == {
        "_selective_logprob_fwd_kernel", "_selective_logprob_bwd_kernel", "_policy_loss_kernel",
        "_fused_policy_loss_kernel", "_group_advantages_kernel", "_topk_entropy_kernel",
    }, names  # fmt: skip
