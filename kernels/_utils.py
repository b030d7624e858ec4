"""What every kernel family shares: where a call runs, vocabulary block sizes, argument checks.

Dispatch (DESIGN.md, "Where the work runs"): CUDA tensors go to the compiled Triton kernels; CPU
tensors go to a torch implementation with the same numerics and memory discipline, except under
TRITON_INTERPRET=1, where they go to the Triton kernels run by Triton's interpreter (how tests reach
the kernels without a GPU).
"""

import functools
import math
import os

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. at import; it is read here at import
# too, so that a value set later cannot send CPU tensors to kernels that were compiled for CUDA.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

# Largest vocabulary block one program holds at a time (fp32 registers: BLOCK_V / (32 * num_warps)
# values per thread). Untuned: set it from bench/kernels.py on the GPU.
MAX_BLOCK_V = 8192

# The torch (CPU) paths work on row chunks of at most this many elements, so their fp32 temporaries
# stay at a few tens of MB whatever N is.
CPU_TILE_ELEMENTS = 1 << 22

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Floor for log-probabilities and centred logits in products with a probability: an -inf logit has p = 0
# and log p = -inf, and 0 * -inf is NaN; clamped to the most negative fp32, the product is 0, as the limit
# p log p -> 0 says. Used the same way by the torch paths (torch.finfo(dtype).min).
LOG_FLOOR = tl.constexpr(-3.4028234663852886e38)


def use_triton(t: torch.Tensor) -> bool:
    """True when `t` goes to the Triton kernels (compiled on CUDA, interpreted under TRITON_INTERPRET=1)."""
    return t.is_cuda or INTERPRET


def vocab_block(vocab: int) -> int:
    """Power-of-two block covering the vocabulary in as few steps as MAX_BLOCK_V allows (at least 16)."""
    return min(max(triton.next_power_of_2(vocab), 16), MAX_BLOCK_V)


def vocab_warps(block: int) -> int:
    return 8 if block >= 4096 else 4


@functools.lru_cache
def is_hopper(device: torch.device) -> bool:
    """True on a CUDA device of compute capability 9.x or later (cached: a driver query, not a sync)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def backward_warps(block: int, device: torch.device) -> int:
    """Warps for the kernels that write a gradient row (read x, write dx, with little math in between).

    On Hopper a full 8192-element block takes 32 warps: 8 elements (one 16-byte bf16 vector) per thread,
    so each SM keeps 4x as many loads in flight as with 8 warps; elsewhere, and for smaller blocks, the
    forward's count. Untuned: confirm with bench/kernels.py on the GPU.
    """
    return 32 if block >= MAX_BLOCK_V and is_hopper(device) else vocab_warps(block)


def cpu_rows(n_cols: int) -> int:
    """Rows per chunk for the torch paths: CPU_TILE_ELEMENTS / n_cols, at least one."""
    return max(1, CPU_TILE_ELEMENTS // max(n_cols, 1))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every kernel dtype; fp64 stays fp64 (accepted by the torch paths only)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be a 2-D [N, V] tensor, got {shape}; flatten leading dims first")
    allowed = KERNEL_DTYPES if use_triton(logits) else KERNEL_DTYPES + (torch.float64,)
    if logits.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{name} has dtype {logits.dtype}; pass one of {names}")
    if logits.shape[1] == 0:
        raise ValueError(f"{name} has an empty vocabulary (V=0); it needs V >= 1")


def check_ids(ids: torch.Tensor, ok: torch.Tensor, message: str) -> None:
    """Raises ValueError(message) unless the bool tensor `ok` is all true, without a host sync on CUDA.

    On the CPU the flag is read back (free: nothing to wait for). On CUDA reading it would block the
    stream and break CUDA-graph capture on every call, so it becomes a device-side assert instead:
    a bad id still stops the process (CUDA error "device-side assert triggered", naming this message
    when CUDA_LAUNCH_BLOCKING=1), before the kernel that would read out of bounds runs.
    """
    if ids.is_cuda:
        torch._assert_async(ok.all(), message)
    elif not bool(ok.all()):
        raise ValueError(message)


def check_targets(targets: torch.Tensor, n_rows: int, vocab: int, device: torch.device) -> None:
    """Shape, dtype, device and range [0, vocab) (on CUDA a device-side assert, not a sync: see check_ids)."""
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.shape[0] != n_rows:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be a 1-D tensor of length N={n_rows}, got {shape}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets has dtype {targets.dtype}; pass token ids as int64 (or int32)")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but the logits are on {device}; move it there")
    if n_rows:
        check_ids(
            targets,
            (targets >= 0) & (targets < vocab),
            f"targets has ids outside [0, {vocab}); every position needs a real token id "
            "(use 0 at masked positions and mask the result)",
        )


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a Python float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when its rows are unit-stride (any row stride is fine), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()
