import pytest
import torch
from kernel_checks import DEVICE, PATH, SLOW, assert_close, host_if_cuda, randint, randn
from rptfast.kernels import _utils as kernel_utils
from rptfast.kernels import reference, selective_logprob

# (N, V): one row and one token; V not a multiple of any block; 423 rows (Liger's odd count);
# V > 65536 (past a 16-bit block index) and a real vocabulary (151936), with tiny N.
SHAPES = [(1, 1), (1, 7), (37, 4099), (3, 70001), (2, 151936), (1, 262144)] + ([] if SLOW else [(423, 1000)])
if SLOW:
    SHAPES.append((423, 64))


def _run(fn, logits, targets, temperature, g_logp, g_ent):
    """Forward values and d(sum g_logp * logp + g_ent * entropy)/d logits for one implementation."""
    x = logits.detach().clone().requires_grad_()
    logp, ent = fn(x, targets, temperature, return_entropy=True)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp, ent, x.grad


@pytest.mark.parametrize("n,v", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_fp64_reference(n, v, dtype, temperature):
    logits = randn(n, v, seed=n * v, scale=3.0, dtype=dtype)
    targets = randint(v, n, seed=n + v)
    g_logp, g_ent = randn(n, seed=1), randn(n, seed=2)
    ours = _run(selective_logprob, logits, targets, temperature, g_logp, g_ent)
    gold = _run(reference.selective_logprob, logits.double(), targets, temperature, g_logp.double(), g_ent.double())
    base = _run(reference.selective_logprob, logits, targets, temperature, g_logp.to(dtype), g_ent.to(dtype))
    assert ours[0].dtype == torch.float32 and ours[2].dtype == dtype
    for name, a, g, b in zip(("logprob", "entropy", "grad"), ours, gold, base, strict=True):
        assert_close(a, g, b, what=f"{name} n={n} v={v} {dtype} T={temperature}")


def test_fp16_and_plain_sum_backward():
    """fp16 input; `.sum().backward()` sends a stride-0 upstream gradient; no entropy requested."""
    n, v = 29, 3001
    logits = randn(n, v, seed=3, scale=2.0, dtype=torch.float16).requires_grad_()
    targets = randint(v, n, seed=4)
    selective_logprob(logits, targets, 1.3).sum().backward()
    gold_x = logits.detach().double().requires_grad_()
    reference.selective_logprob(gold_x, targets, 1.3).sum().backward()
    base_x = logits.detach().clone().requires_grad_()
    reference.selective_logprob(base_x, targets, 1.3).sum().backward()
    assert_close(logits.grad, gold_x.grad, base_x.grad, what="fp16 grad")


def test_strided_rows_and_columns():
    """A row stride is taken as is; a column stride costs a copy; both give the contiguous result."""
    n, v = 11, 513
    wide = randn(n, v + 37, seed=5, scale=2.0)
    targets = randint(v, n, seed=6)
    expected = selective_logprob(wide[:, :v].contiguous(), targets)
    torch.testing.assert_close(selective_logprob(wide[:, :v], targets), expected, rtol=0, atol=0)
    transposed = wide[:, :v].t().contiguous().t()  # same values, stride (1, n)
    torch.testing.assert_close(selective_logprob(transposed, targets), expected, rtol=0, atol=0)


def test_entropy_alone_is_differentiable():
    n, v = 5, 300
    logits = randn(n, v, seed=7, dtype=torch.float32).requires_grad_()
    targets = randint(v, n, seed=8)
    _, ent = selective_logprob(logits, targets, 0.9, return_entropy=True)
    ent.sum().backward()
    gold_x = logits.detach().double().requires_grad_()
    reference.selective_logprob(gold_x, targets, 0.9, return_entropy=True)[1].sum().backward()
    torch.testing.assert_close(logits.grad.double(), gold_x.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(PATH != "torch", reason="fp64 and row chunking are torch-path features")
def test_torch_path_gradcheck_over_row_chunks(monkeypatch):
    monkeypatch.setattr(kernel_utils, "CPU_TILE_ELEMENTS", 64)  # 64 // 23 = 2 rows per chunk
    logits = randn(7, 23, seed=9, dtype=torch.float64).requires_grad_()
    targets = randint(23, 7, seed=10)
    fn = lambda x: selective_logprob(x, targets, 0.8, return_entropy=True)
    assert torch.autograd.gradcheck(fn, (logits,))


def test_empty_batch():
    logits = randn(0, 17, seed=11).requires_grad_()
    out = selective_logprob(logits, torch.zeros(0, dtype=torch.int64, device=DEVICE))
    out.sum().backward()
    assert out.shape == (0,) and logits.grad.shape == (0, 17)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, t: (x[0], t, 1.0), "2-D"),
        (lambda x, t: (x.long(), t, 1.0), "dtype"),
        (lambda x, t: (x, t[:-1], 1.0), "length"),
        (lambda x, t: (x, t.float(), 1.0), "int64"),
        (lambda x, t: host_if_cuda(x, t + 100, 1.0), r"outside \[0, 100\)"),
        (lambda x, t: host_if_cuda(x, t - 100, 1.0), r"outside \[0, 100\)"),
        (lambda x, t: (x, t, 0.0), "temperature"),
        (lambda x, t: (x, t, -1.0), "temperature"),
        (lambda x, t: (x, t, float("nan")), "temperature"),
        (lambda x, t: (x[:, :0], t, 1.0), "V=0"),
    ],
)
def test_bad_inputs_raise(make, match):
    x, t = randn(4, 100, seed=12), randint(100, 4, seed=13)
    with pytest.raises(ValueError, match=match):
        selective_logprob(*make(x, t))
