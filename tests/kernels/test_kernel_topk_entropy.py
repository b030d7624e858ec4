import pytest
import torch
from kernel_checks import DEVICE, SLOW, assert_close, gen, randn
from rptfast.kernels import reference, topk_entropy

SHAPES = [(1, 1, 1), (3, 7, 5), (37, 4099, 16), (4, 70001, 16), (2, 151936, 7)] + (
    [(40, 300, 16)] if SLOW else [(423, 1000, 16)]
)


@pytest.mark.parametrize("n,v,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_fp64_reference(n, v, k, dtype):
    logits = randn(n, v, seed=n + v, scale=3.0, dtype=dtype)
    ours = topk_entropy(logits, k)
    assert ours.dtype == torch.float32 and ours.shape == (n,)
    assert_close(
        ours,
        reference.topk_entropy(logits.double(), k),
        reference.topk_entropy(logits, k),
        what=f"topk entropy n={n} v={v} k={k} {dtype}",
    )


def test_ties_and_sorted_rows():
    """Repeated values (bf16 logits tie often), ascending and descending rows: the k largest by value."""
    v = 3000
    up = torch.linspace(-5, 5, v, dtype=torch.float64)
    rows = torch.stack(
        [
            up,
            up.flip(0),
            torch.full((v,), 2.0, dtype=torch.float64),
            torch.randint(0, 4, (v,), generator=gen(1)).double(),
        ]
    ).to(DEVICE)
    for k in (1, 3, 16):
        torch.testing.assert_close(
            topk_entropy(rows.float(), k).double(), reference.topk_entropy(rows, k), rtol=1e-5, atol=1e-6
        )
    uniform = topk_entropy(rows.float(), 16)[2].item()
    assert abs(uniform - torch.log(torch.tensor(16.0)).item()) < 1e-5


def test_k_equals_vocab_is_full_entropy():
    logits = randn(5, 24, seed=3)
    full = -(logits.double().softmax(-1) * logits.double().log_softmax(-1)).sum(-1)
    torch.testing.assert_close(topk_entropy(logits, 24).double(), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [0, 9, 2.0])
def test_bad_k_raises(k):
    with pytest.raises(ValueError, match=r"k must be an int in \[1, V=8\]"):
        topk_entropy(randn(2, 8, seed=4), k)


def test_bad_logits_raise():
    with pytest.raises(ValueError, match="2-D"):
        topk_entropy(randn(8, seed=5))
    with pytest.raises(ValueError, match="dtype"):
        topk_entropy(torch.ones(2, 8, dtype=torch.int64, device=DEVICE))
