"""What every kernel family shares: where a call runs, vocabulary block sizes, argument checks.

Dispatch (DESIGN.md, "Where the work runs"): CUDA tensors go to the compiled Triton kernels; CPU
tensors go to a torch implementation with the same numerics and memory discipline, except under
TRITON_INTERPRET=1, where they go to the Triton kernels run by Triton's interpreter (how tests reach
the kernels without a GPU).
"""

import math
import os

import torch
import triton

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


def use_triton(t: torch.Tensor) -> bool:
    """True when `t` goes to the Triton kernels (compiled on CUDA, interpreted under TRITON_INTERPRET=1)."""
    return t.is_cuda or INTERPRET


def vocab_block(vocab: int) -> int:
    """Power-of-two block covering the vocabulary in as few steps as MAX_BLOCK_V allows (at least 16)."""
    return min(max(triton.next_power_of_2(vocab), 16), MAX_BLOCK_V)


def vocab_warps(block: int) -> int:
    return 8 if block >= 4096 else 4


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


def check_targets(targets: torch.Tensor, n_rows: int, vocab: int, device: torch.device) -> None:
    """Shape, dtype, device and range [0, vocab). The range check reads one flag back (a device sync)."""
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.shape[0] != n_rows:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be a 1-D tensor of length N={n_rows}, got {shape}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets has dtype {targets.dtype}; pass token ids as int64 (or int32)")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but the logits are on {device}; move it there")
    if n_rows and bool(((targets < 0) | (targets >= vocab)).any()):
        raise ValueError(
            f"targets has ids outside [0, {vocab}); every position needs a real token id "
            "(use 0 at masked positions and mask the result)"
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
