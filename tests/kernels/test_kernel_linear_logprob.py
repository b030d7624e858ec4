import pytest
import torch
from kernel_checks import DEVICE, SLOW, assert_close, host_if_cuda, randint, randn
from rptfast.kernels import _utils as kernel_utils
from rptfast.kernels import linear_logprob, reference
from rptfast.kernels import lm_head as linear_module

# (N, H, V): single row and token; 423 rows; V not a multiple of a block; V > 65536 with tiny N.
SHAPES = [(1, 16, 1), (37, 64, 1000), (4, 8, 70001)] + ([(45, 32, 517)] if SLOW else [(423, 32, 517)])


def _run(fn, hidden, weight, targets, temperature, g_logp, g_ent):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, ent = fn(h, w, targets, temperature, return_entropy=True)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp, ent, h.grad, w.grad


def _check(n, h, v, dtype, temperature, seed=0):
    hidden = randn(n, h, seed=seed + 1, dtype=dtype)
    weight = randn(v, h, seed=seed + 2, scale=h**-0.5 * 3, dtype=dtype)
    targets = randint(v, n, seed=seed + 3)
    g_logp, g_ent = randn(n, seed=seed + 4), randn(n, seed=seed + 5)
    ours = _run(linear_logprob, hidden, weight, targets, temperature, g_logp, g_ent)
    gold = _run(
        reference.linear_logprob,
        hidden.double(),
        weight.double(),
        targets,
        temperature,
        g_logp.double(),
        g_ent.double(),
    )
    base = _run(reference.linear_logprob, hidden, weight, targets, temperature, g_logp.to(dtype), g_ent.to(dtype))
    assert [t.dtype for t in ours] == [torch.float32, torch.float32, dtype, dtype]
    for name, a, g, b in zip(("logprob", "entropy", "grad_hidden", "grad_weight"), ours, gold, base, strict=True):
        assert_close(a, g, b, what=f"{name} n={n} h={h} v={v} {dtype} T={temperature}")


@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_fp64_reference(n, h, v, dtype):
    _check(n, h, v, dtype, temperature=0.8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_row_tiles(monkeypatch, dtype):
    """Force tiles of a few rows, so grad_weight accumulates over many of them."""
    monkeypatch.setattr(kernel_utils, "CPU_TILE_ELEMENTS", 3 * 300)
    monkeypatch.setattr(linear_module, "CPU_TILE_ELEMENTS", 3 * 300)
    monkeypatch.setattr(linear_module, "CUDA_TILE_BYTES", 3 * 300 * 4)
    assert linear_module.tile_rows(61, 300, 4, DEVICE) == 3
    _check(61, 48, 300, dtype, temperature=1.0, seed=10)


def test_only_weight_needs_grad():
    hidden = randn(9, 16, seed=20)
    weight = randn(50, 16, seed=21).requires_grad_()
    targets = randint(50, 9, seed=22)
    linear_logprob(hidden, weight, targets).sum().backward()
    gold_w = weight.detach().double().requires_grad_()
    reference.linear_logprob(hidden.double(), gold_w, targets).sum().backward()
    torch.testing.assert_close(weight.grad.double(), gold_w.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="peak memory is measured on CUDA")
def test_memory_flat_in_rows():
    """Peak memory beyond inputs and gradients is about one logits tile, whatever N is."""
    h, v = 256, 32000
    weight = randn(v, h, seed=30, dtype=torch.bfloat16).requires_grad_()
    extra = []
    for n in (4096, 16384):
        hidden = randn(n, h, seed=31, dtype=torch.bfloat16).requires_grad_()
        targets = randint(v, n, seed=32)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        linear_logprob(hidden, weight, targets).sum().backward()
        torch.cuda.synchronize()
        grads = hidden.numel() * 2 + weight.numel() * 2
        extra.append(torch.cuda.max_memory_allocated() - base - grads)
        weight.grad = None
    tile = linear_module.CUDA_TILE_BYTES
    assert extra[1] <= extra[0] + 16 * 16384 * 4, f"extra memory grew with N: {extra}"
    assert extra[1] <= 1.25 * tile + 64 * 16384, f"extra memory {extra[1]} is more than one tile ({tile})"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda h, w, t: (h[0], w, t), "2-D"),
        (lambda h, w, t: (h, w.t(), t), "not transposed"),
        (lambda h, w, t: (h, w.double(), t), "cast"),
        (lambda h, w, t: (h.long(), w.long(), t), "dtype"),
        (lambda h, w, t: (h, w, t[:-1]), "length"),
        (lambda h, w, t: host_if_cuda(h, w, t + 40), r"outside \[0, 40\)"),
        (lambda h, w, t: (h, w[:0], t), "V=0"),
    ],
)
def test_bad_inputs_raise(make, match):
    h, w, t = randn(5, 8, seed=40), randn(40, 8, seed=41), randint(40, 5, seed=42)
    with pytest.raises(ValueError, match=match):
        linear_logprob(*make(h, w, t))


def test_bad_temperature_raises():
    h, w, t = randn(5, 8, seed=40), randn(40, 8, seed=41), randint(40, 5, seed=42)
    with pytest.raises(ValueError, match="temperature"):
        linear_logprob(h, w, t, temperature=0.0)
