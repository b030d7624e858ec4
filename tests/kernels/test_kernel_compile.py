"""Every Triton kernel compiles for an H100 (sm_90) and an A100 (sm_80) at the shapes real runs use, without
register spills, checked on a machine without a GPU.

Triton's interpreter runs kernels as numpy and accepts programs the compiler rejects (non-power-of-2
blocks, dtype mismatches in loop-carried values, Python control flow on tensors). Here the public
API runs on CPU tensors with every launch redirected: instead of running, each launch is compiled to
a cubin by Triton's own compiler (ptxas ships with Triton), specialised the way JITFunction.run would
specialise it on that GPU (divisibility by 16 of pointers, strides and ints; the BLOCK_V and num_warps the
launcher picks, with Hopper's choices for sm_90 only). The outputs are then garbage, which is fine: only
compilation is checked. Each cubin's registers and local memory are read back with the cuobjdump that
ships with Triton; any LOCAL or STACK bytes (spills) fail the test, and `pytest -s` prints them all.

Production shapes (`production` below): vocabularies 151936 (Qwen2/3), 128256 (Llama 3) and 49152 (SmolLM),
all multiples of 16 (so one specialisation between them), and the odd 151655 (Qwen2.5's tokenizer) and
50257 (GPT-2), as contiguous rows and inside a row stride padded to 16; bf16 and fp32 logits and hidden
states; every kernel with its constexpr flags off and all on (the common case and the largest); the token
kernels at N = 32768 and an odd N, group advantages at the trainer's group sizes. H (4096, 2048) reaches no
Triton kernel: the lm_head matmuls are cuBLAS's, and the row kernels see only the [rows, V] tile.
test_hidden_size_reaches_no_kernel checks that (an H argument would change its divisibility between H = 16
and H = 24), so the linear paths run here at H = 16 rather than with a [V, H] weight of 1.2-2.5 GB.

Each distinct specialisation (target, kernel, argument types and divisibility, constexprs, num_warps: the key
JITFunction.run caches on) is compiled once per session, and Triton's on-disk cache keeps the cubins across
sessions. Coverage is checked, not listed: every @triton.jit function defined in rptfast.kernels (found by
walking the package) must be launched, or called by a launched kernel, on each target.

Runs on the plain CPU test run; on a GPU the kernels are compiled for real, and under
TRITON_INTERPRET=1 there is nothing to compile. The specialisation uses three Triton internals
(create_function_from_signature, JITFunction._pack_args, make_backend): if an upgrade removes one, the
test fails naming it rather than compile something a real launch would not.
"""

import ast
import contextlib
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import rptfast.kernels
import torch
import triton
import triton.compiler
import triton.runtime.jit
from kernel_checks import DEVICE, randint, randn
from rptfast.kernels import (
    _utils,
    fused_policy_loss_from_logits,
    group_advantages,
    linear_logprob,
    linear_policy_loss,
    policy_loss,
    selective_logprob,
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

TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}  # H100/H200, A100

# (V, row stride): multiples of 16 as contiguous rows; the odd vocabularies contiguous and in a padded stride
# (what a padded lm_head leaves when its logits are sliced to the tokenizer's size)
VOCABS = [(151936, 151936), (128256, 128256), (49152, 49152), (151655, 151655), (151655, 151664), (50257, 50257),
          (50257, 50272)]  # fmt: skip
TOKENS = [32768, 32771]  # packed tokens per micro-batch, and an odd count
GROUPS = [(8, 8), (256, 8), (37, 16)]  # (prompts B, completions per prompt G)


@dataclass(frozen=True)
class Compiled:
    """One distinct specialisation, compiled: what the launches that share it are checked against."""

    kernel: str
    target: str
    constexprs: tuple
    dtype: str  # of the first argument (the logits, tile, log-probs or rewards)
    num_warps: int
    regs: int
    stack: int
    local: int
    vector_loads: bool


_COMPILED: dict[tuple, Compiled] = {}  # specialisation key -> result: each specialisation compiles once a session


@dataclass(frozen=True)
class Launch:
    fn: JITFunction
    case: str  # the shape and dtype that launched it
    key: tuple  # its specialisation

    @property
    def compiled(self) -> Compiled:
        return _COMPILED[self.key]


def _internal(owner, name: str):
    """A Triton internal the specialisation needs, or a failure that names it."""
    value = getattr(owner, name, None)
    if value is None:
        pytest.fail(
            f"triton {triton.__version__} has no {getattr(owner, '__name__', owner)}.{name}; the compile test "
            "uses it to specialise launches as JITFunction.run does: port _specialise to the new API"
        )
    return value


def _specialise(fn: JITFunction, target: GPUTarget, args, kwargs):
    """(cache key, ASTSource, options) of a launch of `fn` on `target`: the signature, constexprs and
    divisibility attributes that JITFunction.run derives from these arguments (Triton's own binder)."""
    backend = _internal(triton.compiler, "make_backend")(target)
    binder = _internal(triton.runtime.jit, "create_function_from_signature")(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    key = (target.arch, fn.cache_key, str(specialization), str(options))  # as JITFunction.run's cache key
    pack = _internal(JITFunction, "_pack_args")
    options, signature, constexprs, attrs = pack(fn, backend, kwargs, bound, specialization, options)
    return key, triton.compiler.ASTSource(fn, signature, constexprs, attrs), options


def _resources(kernel) -> dict:
    """REG (per thread), LOCAL and STACK bytes (spills live there) of a compiled kernel, from its cubin."""
    tool = _internal(triton.knobs.nvidia, "cuobjdump").path
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{kernel.metadata.name}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert found, f"cuobjdump -res-usage printed no resource line for {kernel.metadata.name}:\n{out}"
    regs, stack, _, local = map(int, found.groups())
    return dict(regs=regs, stack=stack, local=local, vector_loads="ld.global.v4" in kernel.asm["ptx"])


def _compile(fn: JITFunction, target_name: str, source, options, constexprs: tuple) -> Compiled:
    kernel = triton.compile(source, target=TARGETS[target_name], options=options.__dict__)
    assert kernel.asm["cubin"], f"{fn.__name__} produced no cubin for {target_name}"
    dtype = next(iter(source.signature.values())).lstrip("*")
    return Compiled(fn.__name__, target_name, constexprs, dtype, kernel.metadata.num_warps, **_resources(kernel))


def _compile_new(pending: dict) -> None:
    """Compiles the specialisations in `pending` (key -> _compile's arguments) that this session has not, one
    thread per usable core (Triton's own AsyncCompileMode compiles in executor threads too)."""
    todo = {key: job for key, job in pending.items() if key not in _COMPILED}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with ThreadPoolExecutor(max_workers=max(1, min(cores or 1, len(todo)))) as pool:
        for key, compiled in zip(todo, pool.map(lambda job: _compile(*job), todo.values()), strict=True):
            _COMPILED[key] = compiled


def _kernel_modules() -> list:
    package = rptfast.kernels
    return [importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]


def _jit_functions() -> set[JITFunction]:
    """Every @triton.jit function defined in rptfast.kernels (imported names are counted where they are defined)."""
    return {
        value
        for module in _kernel_modules()
        for value in vars(module).values()
        if isinstance(value, JITFunction) and value.__module__ == module.__name__
    }


def _callees(fn: JITFunction) -> set[JITFunction]:
    """The @triton.jit functions that `fn`'s source names (the helpers it calls)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    return {fn.__globals__[name] for name in names if isinstance(fn.__globals__.get(name), JITFunction)}


def _reached(launched: set[JITFunction]) -> set[JITFunction]:
    seen, todo = set(), list(launched)
    while todo:
        fn = todo.pop()
        if fn not in seen:
            seen.add(fn)
            todo.extend(_callees(fn))
    return seen


@contextlib.contextmanager
def _redirected(mp: pytest.MonkeyPatch, target_name: str, compile_: bool = True):
    """Within: every launch is specialised for `target_name` instead of running, with the launchers' choices
    for that GPU; on leaving, the new specialisations are compiled (unless compile_=False). Yields (launches,
    case): the list of Launch records, filled as launches happen, and a one-item list holding their label."""
    launches, case, pending = [], [""], {}

    def specialise_instead(self, *args, grid, warmup, **kwargs):
        key, source, options = _specialise(self, TARGETS[target_name], args, kwargs)
        constexprs = tuple((p.name, kwargs[p.name]) for p in self.params if p.is_constexpr)
        pending[key] = (self, target_name, source, options, constexprs)
        launches.append(Launch(self, case[0], key))

    mp.setattr(JITFunction, "run", specialise_instead)
    for module in _kernel_modules():
        if hasattr(module, "use_triton"):
            mp.setattr(module, "use_triton", lambda t: True)
    mp.setattr(_utils, "is_hopper", lambda device: TARGETS[target_name].arch >= 90)  # the launchers' choices
    yield launches, case
    if compile_:
        _compile_new(pending)


def _full_options(old: torch.Tensor) -> dict:
    """Every loss option on: each constexpr flag of the loss kernels set."""
    return dict(dual_clip=3.0, ref_logprobs=old, kl_coef=0.1, rollout_logprobs=old, tis_cap=2.0)


def _vocab_launches(vocab: int, stride: int, dtype: torch.dtype, hidden_size: int = 16) -> None:
    """What a run launches over rows of `vocab` logits in a row stride `stride`: selective_logprob with and
    without entropy (forward and backward), the fused loss from logits, topk_entropy, and, for contiguous
    rows (their [rows, V] tile always is), linear_logprob and the fused linear loss on- and off-policy."""
    n = 4
    x = randn(n, stride, seed=1, dtype=dtype)[:, :vocab].requires_grad_()  # [n, V] in a row stride
    t = randint(vocab, n, seed=2)
    lp, ent = selective_logprob(x, t, 0.7, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    selective_logprob(x, t).sum().backward()
    old, adv = randn(n, seed=3), randn(n, seed=4)
    mask = torch.tensor([True, False, True, True])
    for options in ({}, _full_options(old)):
        fused_policy_loss_from_logits(x.detach(), t, old, adv, mask, **options)  # launches only: x is not written
    topk_entropy(x.detach(), 16)
    if stride == vocab:
        hidden = randn(n, hidden_size, seed=5, dtype=dtype).requires_grad_()
        weight = randn(vocab, hidden_size, seed=6, dtype=dtype).requires_grad_()
        lp, ent = linear_logprob(hidden, weight, t, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
        linear_policy_loss(hidden, weight, t, None, adv, mask)[0].backward()
        linear_policy_loss(hidden, weight, t, old, adv, mask, **_full_options(old))[0].backward()


def _token_launches() -> None:
    """The per-token kernels at a micro-batch's token counts, and group advantages at the trainer's groups."""
    for n in TOKENS:
        lp, old, adv, mask = randn(n, seed=7), randn(n, seed=8), randn(n, seed=9), randn(n, seed=10) > 0
        for options in ({}, _full_options(old)):
            policy_loss(lp, old, adv, mask, **options)
    for b, g in GROUPS:
        for scale in ("group", "none"):
            group_advantages(randn(b * g, seed=11), g, scale)


def _name(fns) -> list[str]:
    return sorted(f"{fn.__module__}.{fn.__name__}" for fn in fns)


def _assert_every_kernel_compiled(launches: list[Launch], target: str) -> None:
    missing = _jit_functions() - _reached({launch.fn for launch in launches})
    assert not missing, f"never compiled for {target} (add a launch of them to this test): {_name(missing)}"


def _assert_no_spills(launches: list[Launch]) -> None:
    for launch in launches:
        c = launch.compiled
        assert c.local == 0 and c.stack == 0, (
            f"{c.kernel} ({c.target}, {launch.case}, {dict(c.constexprs)}, {c.num_warps} warps) spills: "
            f"{c.local} B local, {c.stack} B stack, {c.regs} registers"
        )


@pytest.fixture(scope="module", params=sorted(TARGETS))
def production(request) -> tuple[str, list[Launch]]:
    """(target, every launch of the production shapes compiled for it)."""
    with pytest.MonkeyPatch.context() as mp, _redirected(mp, request.param) as (launches, case):
        for dtype in (torch.bfloat16, torch.float32):
            for vocab, stride in VOCABS:
                case[0] = f"V={vocab} stride={stride} {str(dtype).removeprefix('torch.')}"
                _vocab_launches(vocab, stride, dtype)
        case[0] = "tokens"
        _token_launches()
    return request.param, launches


def test_production_shapes_compile_every_kernel_without_spills(production):
    """Every kernel compiles at the production shapes without spills; `pytest -s` prints registers per thread."""
    target, launches = production
    _assert_every_kernel_compiled(launches, target)
    _assert_no_spills(launches)
    first = {}  # specialisation key -> the first launch that made it
    for launch in launches:
        first.setdefault(launch.key, launch)
    print(f"\n{target}: {len(launches)} launches, {len(first)} specialisations")
    for launch in sorted(first.values(), key=lambda la: -la.compiled.regs):
        c = launch.compiled
        flags = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in c.constexprs)
        print(f"  {c.regs:3d} registers, {c.local} B local: {c.kernel} {c.dtype} warps={c.num_warps} {flags}, "
              f"e.g. {launch.case}")  # fmt: skip


def test_production_launch_choices(production):
    """The loss path's row kernels read 16-byte vectors wherever the row stride allows it (the full blocks
    are unmasked), and on Hopper the gradient-writing kernels take 32 warps at a full 8192 block."""
    target, launches = production
    loss_path = {"_selective_logprob_fwd_kernel", "_selective_logprob_bwd_kernel", "_fused_policy_loss_kernel",
                 "_linear_loss_rows_kernel"}  # fmt: skip
    for launch in launches:
        c = launch.compiled
        stride = re.search(r"stride=(\d+)", launch.case)
        if c.kernel in loss_path and stride and int(stride.group(1)) % 16 == 0:
            assert c.vector_loads, f"{c.kernel} ({target}, {launch.case}): no 16-byte vector loads"
        if c.kernel in ("_selective_logprob_bwd_kernel", "_fused_policy_loss_kernel"):
            assert c.num_warps == (32 if target == "sm_90" else 8), (c.kernel, target, c.num_warps)


def test_every_launch_compiles_at_small_shapes(monkeypatch):
    """Small vocabularies (BLOCK_V below the maximum, 4 warps), every flag on and off, int32 targets, bf16
    log-probs: the specialisations a test or a toy run makes, for sm_90."""
    n, v, h = 6, 300, 16
    with _redirected(monkeypatch, "sm_90") as (launches, _):
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
            for options in ({}, _full_options(old)):
                lp = randn(n, seed=8, dtype=dtype).requires_grad_()
                policy_loss(lp, old, adv, mask, **options)[0].backward()
                fused_policy_loss_from_logits(x.detach().clone(), t, old, adv, mask, **options)
                linear_policy_loss(hidden, weight, t, old, adv, mask, **options)[0].backward()
        for scale in ("group", "none"):
            group_advantages(randn(24, seed=9), 4, scale)
            group_advantages(randn(4096 * 2, seed=10), 4096, scale)
    _assert_every_kernel_compiled(launches, "sm_90")
    _assert_no_spills(launches)


def test_hidden_size_reaches_no_kernel(monkeypatch):
    """The linear paths launch the same specialisations at H = 16 and H = 24 (24 % 16 != 0, so a kernel taking
    H, or a stride of hidden, would differ): the production H need not be compiled separately."""
    keys = {}
    for h in (16, 24):
        with _redirected(monkeypatch, "sm_90", compile_=False) as (launched, _):
            n, v = 5, 4099
            hidden, weight = randn(n, h, seed=1).requires_grad_(), randn(v, h, seed=2).requires_grad_()
            t, old, adv = randint(v, n, seed=3), randn(n, seed=4), randn(n, seed=5)
            lp, ent = linear_logprob(hidden, weight, t, return_entropy=True)
            (lp.sum() + ent.sum()).backward()
            linear_policy_loss(hidden, weight, t, old, adv, adv > -1, **_full_options(old))[0].backward()
        keys[h] = launched
    # linear_logprob's forward and backward, the linear loss's row kernel
    assert len(keys[16]) == 3 and [la.key for la in keys[16]] == [la.key for la in keys[24]]


def test_kernel_discovery_is_not_vacuous():
    """The coverage check's inputs: the package walk finds kernels and helpers of every module, and a kernel's
    helpers are found through its source (so a helper counts as compiled with the kernel that calls it)."""
    found = {fn.__name__: fn for fn in _jit_functions()}
    kernels = {"_linear_loss_rows_kernel", "_selective_logprob_bwd_kernel", "_policy_loss_kernel",
               "_group_advantages_kernel", "_topk_entropy_kernel"}  # fmt: skip
    assert kernels | {"_softmax_stats", "_token_loss", "_write_zero_row"} <= set(found), sorted(found)
    assert _callees(found["_linear_loss_rows_kernel"]) == {found["_softmax_stats"], found["_token_loss"]}
    assert found["_stats_block"] in _reached({found["_linear_loss_rows_kernel"]})
