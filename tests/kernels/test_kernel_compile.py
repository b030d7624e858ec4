"""Every kernel launch compiles for an H100 (sm_90), checked on a machine without a GPU.

Triton's interpreter runs kernels as numpy and accepts programs the compiler rejects (non-power-of-2
blocks, dtype mismatches in loop-carried values, Python control flow on tensors). Here the public
API runs on CPU tensors with every launch redirected: instead of running, each launch is compiled to
a cubin by Triton's own compiler (ptxas ships with Triton), specialised the way JITFunction.run would
specialise it on a GPU (divisibility by 16 of pointers, strides and ints; the BLOCK_V and num_warps the
launcher picks, with the Hopper choices). The outputs are then garbage, which is fine: only
compilation is checked. Each cubin's registers and local memory (spills) are read back with the
cuobjdump that ships with Triton, and printed (`pytest -s`).

Runs on the plain CPU test run; on a GPU the kernels are compiled for real, and under
TRITON_INTERPRET=1 there is nothing to compile. The specialisation uses three Triton internals
(create_function_from_signature, JITFunction._pack_args, make_backend): if an upgrade removes one, the
test fails naming it rather than compile something a real launch would not.
"""

import re
import subprocess

import pytest
import torch
import triton
import triton.compiler
import triton.runtime.jit
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
from triton.runtime.jit import JITFunction

pytestmark = [
    pytest.mark.skipif(
        _utils.INTERPRET or DEVICE.type == "cuda",
        reason="compiles for CUDA from a CPU-only, uninterpreted run",
    ),
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset"),  # triton 3.9's notice
]

H100 = GPUTarget("cuda", 90, 32)


def _internal(owner, name: str):
    """A Triton internal the specialisation needs, or a failure that names it."""
    value = getattr(owner, name, None)
    if value is None:
        pytest.fail(
            f"triton {triton.__version__} has no {getattr(owner, '__name__', owner)}.{name}; the compile test "
            "uses it to specialise launches as JITFunction.run does: port _compile_like_a_launch to the new API"
        )
    return value


def _compile_like_a_launch(fn: JITFunction, args, kwargs):
    """Compiles `fn` for sm_90 with the signature, constexprs and divisibility attributes that
    JITFunction.run derives from these arguments (Triton's own binder, not a copy of its rules)."""
    backend = _internal(triton.compiler, "make_backend")(H100)
    binder = _internal(triton.runtime.jit, "create_function_from_signature")(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    pack = _internal(JITFunction, "_pack_args")
    options, signature, constexprs, attrs = pack(fn, backend, kwargs, bound, specialization, options)
    source = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=H100, options=options.__dict__)


def _resources(kernel, tmp_path) -> dict:
    """REG (per thread), LOCAL and STACK bytes (spills live there) of a compiled kernel, from its cubin."""
    cubin = tmp_path / f"{kernel.metadata.name}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    tool = _internal(triton.knobs.nvidia, "cuobjdump").path
    out = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert found, f"cuobjdump -res-usage printed no resource line for {kernel.metadata.name}:\n{out}"
    regs, stack, shared, local = map(int, found.groups())
    ptx = kernel.asm["ptx"]
    return dict(regs=regs, stack=stack, shared=shared, local=local, vector_loads="ld.global.v4" in ptx)


@pytest.fixture
def compiled(monkeypatch, tmp_path):
    """Redirects launches to the compiler, as on an H100; returns the list of compiled launches
    (kernel name, constexprs, num_warps, resources), filled as the test launches."""
    done = []

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = _compile_like_a_launch(self, args, kwargs)
        assert kernel.asm["cubin"], f"{self.__name__} produced no cubin"
        constexprs = {p.name: kwargs[p.name] for p in self.params if p.is_constexpr}
        done.append((self.__name__, constexprs, kernel.metadata.num_warps, _resources(kernel, tmp_path)))

    monkeypatch.setattr(JITFunction, "run", compile_instead)
    for module in (_utils, logprob, lm_head, loss, advantages, topk):
        monkeypatch.setattr(module, "use_triton", lambda t: True)
    monkeypatch.setattr(_utils, "is_hopper", lambda device: True)  # the launchers' sm_90 choices
    return done


def _assert_no_spills(compiled) -> None:
    for name, constexprs, _, res in compiled:
        assert res["local"] == 0 and res["stack"] == 0, f"{name} {constexprs} spills to local memory: {res}"


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
    _assert_no_spills(compiled)
    names = {name for name, *_ in compiled}
    assert names == {
        "_selective_logprob_fwd_kernel", "_selective_logprob_bwd_kernel", "_policy_loss_kernel",
        "_fused_policy_loss_kernel", "_group_advantages_kernel", "_topk_entropy_kernel",
    }, names  # fmt: skip


# Real vocabularies: Qwen2/3 (151936, a multiple of 16 and 128), Llama 3 (128256), Qwen2.5's tokenizer
# size (151655) and GPT-2's (50257), both odd: as contiguous rows, and inside a row stride padded to 16
# (what a padded lm_head leaves when its logits are sliced to the tokenizer's size).
PRODUCTION = [(151936, 151936), (128256, 128256), (151655, 151655), (151655, 151664), (50257, 50257), (50257, 50272)]


@pytest.mark.parametrize("vocab,stride", PRODUCTION)
def test_production_launches_compile_without_spills(compiled, vocab, stride, capsys):
    """The loss-path kernels at real vocabularies, bf16, exactly as launched on an H100: no spills, and
    16-byte vector loads whenever the row stride allows them (the full blocks are unmasked)."""
    n = 4
    rows = randn(n, stride, seed=1, dtype=torch.bfloat16)
    x = rows[:, :vocab].requires_grad_()
    t = randint(vocab, n, seed=2)
    lp, ent = selective_logprob(x, t, 0.7, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    old, adv, mask = randn(n, seed=3), randn(n, seed=4), randn(n, seed=5) > 0
    fused_policy_loss_from_logits(x.detach(), t, old, adv, mask)
    topk_entropy(x.detach(), 16)
    names = [name for name, *_ in compiled]
    assert names == [
        "_selective_logprob_fwd_kernel", "_selective_logprob_bwd_kernel", "_fused_policy_loss_kernel",
        "_topk_entropy_kernel",
    ], names  # fmt: skip
    with capsys.disabled():
        for name, constexprs, warps, res in compiled:
            print(
                f"\nsm_90 V={vocab} stride={stride} {name} BLOCK_V={constexprs['BLOCK_V']} warps={warps}: "
                f"{res['regs']} registers, {res['local']} B local, vector loads {res['vector_loads']}"
            )
    _assert_no_spills(compiled)
    warps = {name: w for name, _, w, _ in compiled}
    assert warps["_selective_logprob_bwd_kernel"] == warps["_fused_policy_loss_kernel"] == 32  # Hopper's backward
    if stride % 16 == 0:
        for name, _, _, res in compiled[:3]:  # the loss path; topk_entropy keeps a masked loop (not a loss kernel)
            assert res["vector_loads"], f"{name} at V={vocab}, stride {stride}: no 16-byte vector loads"
