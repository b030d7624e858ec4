"""Shared helpers for the kernel tests (a module name of its own: without __init__.py files, pytest puts
this folder on sys.path, and a second `conftest` elsewhere in tests/ would shadow it).

The same tests run three ways: `pytest tests/kernels` on a CUDA machine (compiled Triton), on a CPU
machine (the torch paths), and with TRITON_INTERPRET=1 on a CPU machine (the Triton kernels in
Triton's interpreter, which is slow: SLOW shrinks the shapes and example counts there).
"""

import torch
from rptfast.kernels._utils import INTERPRET

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PATH = "triton" if DEVICE.type == "cuda" else ("interpreter" if INTERPRET else "torch")
SLOW = PATH == "interpreter"

# Floor of the tolerance, relative to the largest gold value: what both the kernel and torch may be
# off by through rounding alone (summation order over up to 262144 terms, exp/log ulps). For bf16 and
# fp16 it is about one ulp of the output dtype (gradients are written in the input dtype); for fp32,
# some 80 ulps, because an online logsumexp and torch's two-pass one round differently.
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-10, torch.float64: 1e-12}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """Seeded normal data made on the CPU (same numbers on every device), then moved to DEVICE."""
    return (torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale).to(DEVICE, dtype)


def randint(high: int, *shape, seed: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=gen(seed)).to(DEVICE)


def assert_close(actual, gold, baseline, *, what: str, factor: float = 2.0, dtype=None) -> None:
    """Kernel error against the fp64 gold <= factor x torch's own error at the kernel's dtype + floor.

    `baseline` is the reference computed at the kernel's input dtype (flash-attention's habit: the
    tolerance is measured, not guessed). Also asserts that nothing non-finite came out.
    """
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in the kernel output"
    gold = gold.detach().double()
    err = (actual.detach().double() - gold).abs().max().item() if gold.numel() else 0.0
    base = (baseline.detach().double() - gold).abs().max().item() if gold.numel() else 0.0
    scale = max(1.0, gold.abs().max().item()) if gold.numel() else 1.0
    floor = FLOOR[dtype or actual.dtype] * scale
    assert err <= factor * base + floor, (
        f"{what}: kernel error {err:.3g} > {factor} x torch error {base:.3g} + floor {floor:.3g}"
    )


def host_if_cuda(*args):
    """The arguments of a case with out-of-range ids, moved to the CPU when DEVICE is CUDA.

    On CUDA the id check is a device-side assert (kernels._utils.check_ids: no host sync), which ends
    the CUDA context of the whole test process: every later test would fail. There the ValueError path
    is checked on host copies, and test_kernel_bad_ids.py checks the assert in a child process.
    """
    return tuple(a.cpu() if DEVICE.type == "cuda" and isinstance(a, torch.Tensor) else a for a in args)
