"""Prompt-once packing: the prompt of a group once, then its completions; same numbers as packing each
(prompt + completion) on its own."""

import pytest
import torch
from rptfast.kernels import policy_loss

from rptfast.model import (
    PolicyLogprob,
    Sequence,
    collate,
    collate_shared,
    load_policy,
    pack,
    pack_shared,
    resolve_attn,
    shares_prompts,
)
from rptfast.model import attention as attention_module
from rptfast.model.flash_shared import ATEN, VarlenKernels, varlen_shared_attention
from rptfast.model.shared_prompt import VarlenSeqs, shared_attention

CPU = torch.device("cpu")


def groups_of(G: int, prompt_lens: list[int], seed: int) -> list[Sequence]:
    """One group of G completions per prompt length; irregular completion lengths 1..13, random tokens."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for P in prompt_lens:
        prompt = torch.randint(0, 500, (P,), generator=g).tolist()
        for _ in range(G):
            R = int(torch.randint(1, 14, (1,), generator=g))
            seqs.append(Sequence(prompt + torch.randint(0, 500, (R,), generator=g).tolist(), P,
                                 float(torch.randn(1, generator=g)), (-6 - torch.rand(R, generator=g)).tolist()))
    return seqs


def policy(tiny_dir, attn: str, checkpointing: bool = False, monkeypatch=None):
    """attn = "standin": per_seq, its prompt-once rows through the CUDA path's code (flash_shared) on STANDIN."""
    if attn == "standin":
        monkeypatch.setattr(attention_module, "shared_attention", lambda q, k, v, layout, scaling:
                            varlen_shared_attention(q, k, v, layout, scaling, STANDIN))
        attn = "per_seq"
    lm = load_policy(tiny_dir, dtype=torch.float32, attn=resolve_attn(attn, CPU, torch.float32),
                     trust_remote_code=False, gradient_checkpointing=checkpointing)
    return PolicyLogprob(lm)


def run_batches(pol, seqs, bins, collate_fn):
    """Per-sequence log-probs, the summed clipped loss (token-mean over all micro-batches) and every gradient."""
    pol.zero_grad()
    n_tokens = sum(s.n_scored for s in seqs)
    per_seq: dict[int, torch.Tensor] = {}
    total = 0.0
    for b in bins:
        mb = collate_fn(seqs, b, CPU)
        logp, _ = pol(mb, 0.9)
        for k, i in enumerate(b):
            per_seq[i] = logp.detach()[mb.seq_ids == k]
        old = logp.detach() + 0.05 * torch.sin(mb.targets * 1.7)  # ratios off 1 (clipping active), per token
        loss, _ = policy_loss(logp, old, mb.advantages, mb.mask, eps_low=0.2, eps_high=0.28,
                                      aggregation="token-mean", seq_ids=mb.seq_ids, normalizer=n_tokens)
        loss.backward()
        total += loss.item()
    grads = {n: p.grad.clone() for n, p in pol.named_parameters()}
    return per_seq, total, grads


@pytest.mark.parametrize("G, attn, budget, checkpointing, prompts", [
    (2, "per_seq", 4096, False, [17, 5, 30, 9]),
    (8, "per_seq", 4096, False, [17, 5, 30, 9]),
    (8, "per_seq", 4096, False, [17, 5, 17, 30, 17]),  # units of equal prompt length share attention calls
    (8, "sdpa", 4096, False, [17, 5, 30, 9]),
    (8, "per_seq", 60, False, [17, 5, 30, 9]),  # groups split across micro-batches: the prompt repeated once per part
    (2, "per_seq", 4096, True, [17, 5, 30, 9]),  # the layout reaches the attention through checkpointed layers
    (8, "standin", 4096, False, [17, 5, 17, 30, 17]),  # the CUDA path's two varlen calls, on the fp64 stand-in
    (8, "standin", 60, False, [17, 5, 30, 9]),
    (2, "standin", 4096, True, [17, 5, 30, 9]),
])
def test_shared_equals_unshared(tiny_dir, monkeypatch, G, attn, budget, checkpointing, prompts):
    seqs = groups_of(G, prompts, seed=G + budget)
    pol = policy(tiny_dir, attn, checkpointing, monkeypatch)
    shared_bins = pack_shared(seqs, budget)
    if budget < 4096:  # a real split: some prompt in two micro-batches
        assert any(sum(seqs[i].start == 30 for i in b) not in (0, G) for b in shared_bins)
    else:
        assert len(shared_bins) == 1
    lp_sh, loss_sh, g_sh = run_batches(pol, seqs, shared_bins, collate_shared)
    lp_un, loss_un, g_un = run_batches(pol, seqs, pack(seqs, budget), collate)
    for i in range(len(seqs)):
        torch.testing.assert_close(lp_sh[i], lp_un[i], rtol=0, atol=1e-5, msg=f"sequence {i}")
    assert loss_sh == pytest.approx(loss_un, rel=1e-4, abs=1e-7)
    for n in g_un:
        torch.testing.assert_close(g_sh[n], g_un[n], rtol=1e-4, atol=1e-7, msg=n)


def test_pack_shared_counts_prompts_once(tiny_dir):
    seqs = groups_of(8, [17, 5, 30, 9, 22], seed=1)
    for budget in (4096, 64, 48):
        bins = pack_shared(seqs, budget)
        assert sorted(i for b in bins for i in b) == list(range(len(seqs)))
        n_tokens = 0
        for b in bins:
            mb = collate_shared(seqs, b, CPU)
            assert mb.n_tokens <= budget
            n_tokens += mb.n_tokens
            # the scored tokens are those of collate, in the same order
            ref = collate(seqs, b, CPU)
            assert torch.equal(mb.targets, ref.targets) and torch.equal(mb.seq_ids, ref.seq_ids)
            assert torch.equal(mb.position_ids[mb.pred_idx], ref.position_ids[ref.pred_idx])
        sum_r = sum(s.n_scored for s in seqs)
        sum_p = sum(seqs[i].start for i in range(0, len(seqs), 8))
        if budget == 4096:
            assert n_tokens == sum_p + sum_r  # each prompt once
        else:
            assert sum_p + sum_r < n_tokens < 8 * sum_p + sum_r  # split prompts paid once per part
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        pack_shared(seqs, 35)  # prompt 30 + a completion of up to 13


def test_empty_prompts_and_keyless_queries_are_refused():
    """An empty prompt would give its completion's first token the previous unit's last position as its
    predictor (or wrap to the row's end): both packers refuse it, naming the sequence. A varlen call whose query
    sequence has no keys would get a log-sum-exp of +inf from FlashAttention and NaN from the merge: refused
    where its lengths are made. Completions of any length, empty ones included, still pack."""
    seqs = groups_of(2, [5], seed=2) + [Sequence([7, 8, 9], 0, 0.5, [-1.0] * 3)] + groups_of(2, [3], seed=4)
    for fn in (collate, collate_shared):
        with pytest.raises(ValueError, match="sequence 2 has an empty prompt"):
            fn(seqs, list(range(len(seqs))), CPU)
        mb = fn(seqs, [0, 1, 3, 4], CPU)  # without it: fine
        assert int(mb.pred_idx.min()) >= 0
    empty_completion = [Sequence([4, 5, 6], 3, 0.1, []), *groups_of(2, [3], seed=5)]
    mb = collate_shared(empty_completion, [0, 1, 2], CPU)
    assert mb.targets.numel() == sum(s.n_scored for s in empty_completion[1:])
    assert min(length for _, length, _, _ in mb.shared.segments) > 0
    with pytest.raises(ValueError, match="no keys"):
        VarlenSeqs.of([3, 2], [4, 0], CPU)
    assert VarlenSeqs.of([0, 2], [0, 3], CPU).max_k == 3  # an empty query sequence needs no keys


def test_mask_completions_see_prompt_not_each_other(tiny_dir):
    """Changing a token of completion j changes nothing in completion k's log-probs; changing a prompt
    token changes every completion's."""
    seqs = groups_of(4, [12], seed=7)
    seqs = [s for s in seqs if s.n_scored >= 3] + groups_of(3, [8], seed=8)  # a second group beside it
    pol = policy(tiny_dir, "per_seq")
    idx = list(range(len(seqs)))

    def logprobs(ss):
        with torch.no_grad():
            mb = collate_shared(ss, idx, CPU)
            lp, _ = pol(mb, 1.0)
        return [lp[mb.seq_ids == k] for k in idx]

    base = logprobs(seqs)
    j = 1
    changed = [Sequence(list(s.tokens), s.start, s.advantage, s.rollout_logprobs) for s in seqs]
    changed[j].tokens[changed[j].start + 1] = (changed[j].tokens[changed[j].start + 1] + 1) % 500
    after = logprobs(changed)
    for k in idx:
        if k == j:
            assert (after[k] - base[k]).abs().max() > 1e-4  # its own log-probs move
        else:
            assert torch.equal(after[k], base[k]), k
    prompt_changed = [Sequence(list(s.tokens), s.start, s.advantage, s.rollout_logprobs) for s in seqs]
    first_group = [k for k in idx if seqs[k].start == 12]
    for k in first_group:  # one prompt: the same change in every sequence that holds it
        prompt_changed[k].tokens[3] = (prompt_changed[k].tokens[3] + 7) % 500
    after = logprobs(prompt_changed)
    for k in idx:
        if k in first_group:
            assert (after[k] - base[k]).abs().max() > 1e-4, k
        else:
            assert torch.equal(after[k], base[k]), k  # the other group's prompt did not change


def test_dense_mask_matches_rule():
    """The sdpa mask against a brute-force reading of the rule, on a row with a split group."""
    seqs = groups_of(3, [4, 2], seed=3)
    mb = collate_shared(seqs, list(range(len(seqs))), CPU)
    T = mb.n_tokens
    # (owner prompt start, completion id) of each token, from the segments
    owner, comp = [0] * T, [0] * T
    for c, (start, length, p_start, p_len) in enumerate(mb.shared.segments):
        for t in range(start, start + length):
            owner[t], comp[t] = p_start, (0 if p_len == 0 else c)
    want = torch.tensor([[owner[q] == owner[k] and k <= q and (comp[k] == 0 or comp[k] == comp[q])
                          for k in range(T)] for q in range(T)])
    assert torch.equal(mb.shared.dense_mask(CPU), want)
    assert mb.shared.attention_pairs == int(want.sum())


def naive_attention(q, k, v, allowed, scale):
    """softmax(q k^T scale, masked) v in fp64, GQA by repeating each kv head: q [Hq, T, D], k/v [Hkv, T, D]."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    scores = (q @ k.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))  # [Hq, T, T]
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("G, heads, kv_heads", [(2, 4, 2), (8, 2, 1), (8, 3, 3)])
def test_shared_attention_against_fp64(G, heads, kv_heads):
    """_SharedAttention against a naive fp64 masked softmax on random q, k, v with a random upstream gradient.

    In fp64 the two-part form must agree to 1e-10 (it is exact; what remains is rounding). In fp32, the output
    must be within twice the error of torch's own fp32 dense-mask attention, and the q/k/v gradients within 10x:
    the backward recomputes probabilities from the merged log-sum-exp, which is rounded to fp32 once more than a
    single kernel's, and the parts' gradients are rounded before they are added (1-8x was seen over 12 seeds).
    """
    seqs = groups_of(G, [23, 6, 23, 11, 23], seed=heads)  # three units of prompt 23: batched, padded queries
    layout = collate_shared(seqs, list(range(len(seqs))), CPU).shared
    assert any(pad.shape[0] > 1 and pad.any() for _, _, _, _, pad in layout.cross)
    T, D = layout.segments[-1][0] + layout.segments[-1][1], 64
    g = torch.Generator().manual_seed(G)
    q, k, v = (torch.randn(h, T, D, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    d_out = torch.randn(heads, T, D, generator=g, dtype=torch.float64)
    allowed = layout.dense_mask(CPU)
    scale = 0.37

    def grads(fn, q, dtype):
        x = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
        out = fn(*x)
        out.backward(d_out.to(dtype))
        return [out.detach().double()] + [t.grad.double() for t in x]

    def naive(q, k, v):
        return naive_attention(q, k, v, allowed, scale)

    def shared(q, k, v):
        return shared_attention(q[None], k[None], v[None], layout, scale)[0][0].transpose(0, 1)  # [H, T, D]

    def dense_fp32(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                                                enable_gqa=kv_heads != heads)

    want, torch_fp32, got = grads(naive, q, torch.float64), grads(dense_fp32, q, torch.float32), grads(shared, q,
                                                                                                       torch.float32)
    for name, w, t, x, factor in zip(["out", "dq", "dk", "dv"], want, torch_fp32, got, [2, 10, 10, 10]):
        assert (x - w).abs().max().item() <= factor * (t - w).abs().max().item() + 1e-7, name
    # token 0 is what padding queries read: with its scores huge (exp(120) overflows fp32), padding must still add
    # exactly nothing
    q[:, 0] *= 40
    want = grads(naive, q, torch.float64)
    for name, w, x64, x32 in zip(["out", "dq", "dk", "dv"], want, grads(shared, q, torch.float64),
                                 grads(shared, q, torch.float32)):
        torch.testing.assert_close(x64, w, rtol=0, atol=1e-10, msg=name)
        assert x32.isfinite().all(), name


def test_per_seq_shares_prompts_on_cpu_only(tiny_dir):
    """_SharedAttention calls the CPU flash kernels: per_seq off the CPU runs unshared (the trainer says so)."""
    lm = policy(tiny_dir, "per_seq").lm
    assert shares_prompts(lm)
    assert not shares_prompts(lm.to("meta"))


# ---------------------------------------------------------------- the CUDA path (model/flash_shared.py) on the CPU


def _standin_sequences(cu_q, cu_k, max_q, max_k):
    bounds = [(int(a), int(b), int(c), int(d)) for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:])]
    assert all(b - a <= max_q and d - c <= max_k for a, b, c, d in bounds)
    return bounds


def _standin_scores(q, k, causal, scale):
    """One sequence's scores [Hq, Lq, Lk] in fp64, kv heads repeated for GQA; causal aligned bottom-right."""
    rep = q.shape[1] // k.shape[1]
    s = q.double().transpose(0, 1) @ k.double().repeat_interleave(rep, 1).permute(1, 2, 0) * scale
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[1:], dtype=torch.bool).tril(s.shape[2] - s.shape[1]), float("-inf"))
    return s


def standin_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """FlashAttention's varlen forward as plain fp64 math, sequence by sequence; outputs poisoned first."""
    rep = q.shape[1] // k.shape[1]
    out = torch.full_like(q, float("nan"))  # [Tq, Hq, D]
    lse = torch.full((q.shape[1], q.shape[0]), float("nan"), dtype=torch.promote_types(q.dtype, torch.float32))
    for a, b, c, d in _standin_sequences(cu_q, cu_k, max_q, max_k):
        s = _standin_scores(q[a:b], k[c:d], causal, scale)
        out[a:b] = (s.softmax(-1) @ v[c:d].double().repeat_interleave(rep, 1).transpose(0, 1)).transpose(0, 1)
        lse[:, a:b] = s.logsumexp(-1)
    return out, lse


def standin_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    """FlashAttention's varlen backward as plain fp64 math: probabilities exp(s - lse) from the lse it is given,
    dS = P * (dP - rowsum(dO * O)) with the O it is given; kv-head gradients summed over their query heads."""
    rep = q.shape[1] // k.shape[1]
    dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
    for a, b, c, d in _standin_sequences(cu_q, cu_k, max_q, max_k):
        p = (_standin_scores(q[a:b], k[c:d], causal, scale) - lse[:, a:b].double()[..., None]).exp()  # [Hq, Lq, Lk]
        do, o, qh = (x[a:b].double().transpose(0, 1) for x in (dout, out, q))  # [Hq, Lq, D]
        kh, vh = (x[c:d].double().repeat_interleave(rep, 1).transpose(0, 1) for x in (k, v))  # [Hq, Lk, D]
        ds = p * (do @ vh.transpose(1, 2) - (do * o).sum(-1, keepdim=True))
        dq[a:b] = (ds @ kh * scale).transpose(0, 1)
        dk[c:d] = (ds.transpose(1, 2) @ qh * scale).unflatten(0, (-1, rep)).sum(1).transpose(0, 1)
        dv[c:d] = (p.transpose(1, 2) @ do).unflatten(0, (-1, rep)).sum(1).transpose(0, 1)
    return dq, dk, dv


STANDIN = VarlenKernels("fp64 stand-in", standin_forward, standin_backward)


def test_standin_is_attention():
    """The stand-in against autograd through a naive masked softmax: uneven q and k lengths, GQA, both masks."""
    g = torch.Generator().manual_seed(0)
    cu_q, cu_k = torch.tensor([0, 3, 4, 11], dtype=torch.int32), torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    q = torch.randn(11, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(13, 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    d_out = torch.randn(11, 4, 8, generator=g, dtype=torch.float64)
    for causal in (True, False):
        parts = []
        for a, b, c, d in _standin_sequences(cu_q, cu_k, 7, 7):
            allowed = torch.ones(b - a, d - c, dtype=torch.bool)
            allowed = allowed.tril(d - c - (b - a)) if causal else allowed
            parts.append(naive_attention(*(x.transpose(0, 1) for x in (q[a:b], k[c:d], v[c:d])), allowed, 0.3))
        want = torch.cat(parts, 1).transpose(0, 1)  # [Tq, Hq, D]
        grads = torch.autograd.grad(want, (q, k, v), d_out)
        with torch.no_grad():
            out, lse = standin_forward(q, k, v, cu_q, cu_k, 7, 7, causal, 0.3)
            got = standin_backward(d_out, q, k, v, out, lse, cu_q, cu_k, 7, 7, causal, 0.3)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
        for name, w, x in zip("qkv", grads, got):
            torch.testing.assert_close(x, w, rtol=0, atol=1e-12, msg=f"d{name}, causal={causal}")


def _two_part_inputs(G, heads, kv_heads, prompts, seed):
    layout = collate_shared(groups_of(G, prompts, seed), list(range(G * len(prompts))), CPU).shared
    T, D = layout.segments[-1][0] + layout.segments[-1][1], 32
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(h, T, D, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    return layout, q, k, v, torch.randn(heads, T, D, generator=g, dtype=torch.float64)


def _out_and_grads(fn, q, k, v, d_out, dtype):
    x = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    out = fn(*x)
    out.backward(d_out.to(dtype))
    return [out.detach().double()] + [t.grad.double() for t in x]


@pytest.mark.parametrize("G, heads, kv_heads, prompts", [
    (2, 4, 2, [23, 6, 23, 11, 23]), (8, 2, 1, [23, 6, 23, 11, 23]), (3, 3, 3, [1, 40, 7]), (8, 6, 2, [9])])
def test_varlen_two_part_against_cpu_and_fp64(G, heads, kv_heads, prompts):
    """flash_shared on the fp64 stand-in: the same numbers as the CPU two-part attention and a naive fp64 masked
    softmax (1e-10 in fp64: exact up to rounding); in fp32 inputs, as close to the CPU path as the CPU path is to
    fp64 (the stand-in computes in fp64 inside, the CPU kernels in fp32)."""
    layout, q, k, v, d_out = _two_part_inputs(G, heads, kv_heads, prompts, seed=G * heads)
    allowed = layout.dense_mask(CPU)
    scale = 0.37

    def varlen(q, k, v):
        return varlen_shared_attention(q[None], k[None], v[None], layout, scale, STANDIN)[0][0].transpose(0, 1)

    def cpu(q, k, v):
        return shared_attention(q[None], k[None], v[None], layout, scale)[0][0].transpose(0, 1)

    want = _out_and_grads(lambda q, k, v: naive_attention(q, k, v, allowed, scale), q, k, v, d_out, torch.float64)
    got, exact = (_out_and_grads(f, q, k, v, d_out, torch.float64) for f in (varlen, cpu))
    for name, w, x, e in zip(["out", "dq", "dk", "dv"], want, got, exact):
        torch.testing.assert_close(x, w, rtol=0, atol=1e-10, msg=name)
        torch.testing.assert_close(x, e, rtol=0, atol=1e-10, msg=name)
    got32, exact32 = (_out_and_grads(f, q, k, v, d_out, torch.float32) for f in (varlen, cpu))
    for name, w, x, e in zip(["out", "dq", "dk", "dv"], want, got32, exact32):
        assert (x - e).abs().max() <= 2 * (e - w).abs().max() + 1e-6, name


def test_varlen_two_part_model_against_cpu_path(tiny_dir, monkeypatch):
    """The whole policy on prompt-once rows: flash_shared on the stand-in vs the CPU two-part path, log-probs and
    every gradient (fp32 model; measured: 9.5e-7 and 5.2e-8 apart at most, as far as either is from unshared rows)."""
    seqs = groups_of(5, [17, 5, 30, 9, 17], seed=11)
    bins = pack_shared(seqs, 4096)
    lp_cpu, loss_cpu, g_cpu = run_batches(policy(tiny_dir, "per_seq"), seqs, bins, collate_shared)
    lp_var, loss_var, g_var = run_batches(policy(tiny_dir, "standin", monkeypatch=monkeypatch), seqs, bins,
                                          collate_shared)
    for i in range(len(seqs)):
        torch.testing.assert_close(lp_var[i], lp_cpu[i], rtol=0, atol=1e-5, msg=f"sequence {i}")
    assert loss_var == pytest.approx(loss_cpu, rel=1e-5)
    for n in g_cpu:
        torch.testing.assert_close(g_var[n], g_cpu[n], rtol=1e-4, atol=1e-7, msg=n)


def test_aten_flash_calls_under_fake_cuda():
    """torch's flash ops as flash_shared calls them, on fake CUDA tensors (FakeTensorMode runs the ops' meta
    functions: shapes, dtypes, devices and argument order; no kernel runs): bf16, GQA, forward and backward.

    A CPU-only torch cannot record an autograd graph on CUDA tensors, fake ones included (the engine asks for the
    device's guard), so the backward is _VarlenShared.backward called on the forward's saved tensors directly. Python
    indexing and copy_ of fake CUDA tensors ask for it too: the code under test gathers with index_select and
    reshapes with squeeze/unsqueeze."""
    from types import SimpleNamespace

    from torch._subclasses.fake_tensor import FakeTensorMode

    from rptfast.model.flash_shared import _VarlenShared

    fwd, bwd = (op.default._schema.arguments for op in (torch.ops.aten._flash_attention_forward,
                                                           torch.ops.aten._flash_attention_backward))
    assert [a.name for a in fwd[:10]] == ["query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
                                          "dropout_p", "is_causal", "return_debug_mask"]
    assert [a.name for a in bwd[:12]] == ["grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q",
                                          "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal"]
    assert all(str(a.type) == "Tensor" for a in bwd[12:14])  # the dropout state: rng_state, unused (2.13's names)
    assert all(a.kwarg_only for a in fwd[10:] + bwd[14:]) and "scale" in [a.name for a in fwd[10:]]
    calls = []

    def recorded(fn):
        def call(*args):
            result = fn(*args)
            calls.append((fn.__name__, [(tuple(a.shape), a.dtype, a.device.type) for a in args
                                        if isinstance(a, torch.Tensor)], args[-2],
                          [(tuple(r.shape), r.dtype, r.device.type) for r in result]))
            return result
        return call

    seqs = groups_of(3, [23, 6, 11], seed=5)
    T_q = sum(s.n_scored for s in seqs)
    kernels = VarlenKernels("aten, recorded", recorded(ATEN.forward), recorded(ATEN.backward))
    with FakeTensorMode():
        cuda = torch.device("cuda")
        layout = collate_shared(seqs, list(range(len(seqs))), cuda).shared
        T = T_q + 23 + 6 + 11
        q = torch.empty(1, 8, T, 64, dtype=torch.bfloat16, device=cuda)  # as transformers passes them
        k, v = (torch.empty(1, 2, T, 64, dtype=torch.bfloat16, device=cuda) for _ in range(2))
        out, _ = varlen_shared_attention(q, k, v, layout, 0.125, kernels)
        assert (out.shape, out.dtype, out.device.type) == ((1, T, 8, 64), torch.bfloat16, "cuda")
        calls.clear()
        ctx = SimpleNamespace(save_for_backward=lambda *saved: setattr(ctx, "saved_tensors", saved))
        q, k, v = (x.squeeze(0).transpose(0, 1) for x in (q, k, v))  # [T, H, D]
        out = _VarlenShared.forward(ctx, q, k, v, layout, 0.125, kernels)
        grads = _VarlenShared.backward(ctx, torch.empty_like(out))[:3]
        assert all((g.shape, g.dtype, g.device.type) == (x.shape, x.dtype, "cuda") for g, x in zip(grads, (q, k, v)))
    bf16, i32, f32 = torch.bfloat16, torch.int32, torch.float32
    own = [((T, 8, 64), bf16, "cuda"), ((T, 2, 64), bf16, "cuda"), ((T, 2, 64), bf16, "cuda"),
           ((len(layout.segments) + 1,), i32, "cuda"), ((len(layout.segments) + 1,), i32, "cuda")]
    cross = [((T_q, 8, 64), bf16, "cuda"), ((40, 2, 64), bf16, "cuda"), ((40, 2, 64), bf16, "cuda"),
             ((4,), i32, "cuda"), ((4,), i32, "cuda")]
    assert [c[0] for c in calls] == ["_aten_forward", "_aten_forward", "_aten_backward", "_aten_backward"]
    assert calls[0][1:] == (own, True, [((T, 8, 64), bf16, "cuda"), ((8, T), f32, "cuda")])
    assert calls[1][1:] == (cross, False, [((T_q, 8, 64), bf16, "cuda"), ((8, T_q), f32, "cuda")])
    # backward: grad_out, q, k, v, out, lse, then the same cu_seqlens as the forward; grads shaped as q, k, v
    assert calls[2][1] == own[:1] + own[:3] + [own[0], ((8, T), f32, "cuda")] + own[3:] and calls[2][2] is True
    assert calls[3][1] == cross[:1] + cross[:3] + [cross[0], ((8, T_q), f32, "cuda")] + cross[3:]
    assert calls[3][2] is False and calls[3][3] == cross[:3]


def test_varlen_and_flash_share_prompts(monkeypatch):
    """shares_prompts on CUDA's backends (a stand-in model object: resolve_attn gives them only on CUDA; here the
    kernels are the fp64 stand-in, so flash_shared's start-up probe can run on the CPU), and the refusals: a
    sliding-window layer, logit softcapping."""
    from types import SimpleNamespace

    monkeypatch.setattr(attention_module.flash_shared, "varlen_kernels", lambda: STANDIN)

    def lm(backend, device="cpu", **config):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=backend, **config),
                               device=torch.device(device))

    assert shares_prompts(lm(attention_module.VARLEN)) and shares_prompts(lm("flash_attention_2"))
    assert not shares_prompts(lm(attention_module.PER_SEQ, "cuda"))  # the CPU flash kernels
    assert not shares_prompts(lm(attention_module.VARLEN, layer_types=["full_attention", "sliding_attention"]))
    assert not shares_prompts(lm("flash_attention_2", attn_logit_softcapping=50.0))


def _lse_padded(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """A build that returns the log-sum-exp [Tq, Hq] (ROCm's AOTriton and older flash-attn pad it per sequence)."""
    out, lse = standin_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
    return out, lse.t().contiguous()


def _lse_off(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """Right shapes, wrong log-sum-exp (off by one nat): the merge weights its parts wrongly."""
    out, lse = standin_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
    return out, lse + 1.0


@pytest.mark.parametrize("kernels, says", [
    (VarlenKernels("lse [Tq, Hq]", _lse_padded, standin_backward), "log-sum-exp of shape"),
    (VarlenKernels("lse off by 1", _lse_off, standin_backward), "disagrees with a dense fp32 softmax"),
    (ATEN, "NotImplementedError"),  # torch's CUDA kernels, asked to run on the CPU
])
def test_flash_shared_probe_falls_back_to_unshared(monkeypatch, kernels, says):
    """flash_shared's start-up probe: kernels that fail or disagree with a dense fp32 softmax make shares_prompts
    false (the trainer then packs each sequence whole, which is exact) and unshared_reason says why, in one line;
    the stand-in passes in bf16 and fp32."""
    from types import SimpleNamespace

    from rptfast.model import unshared_reason
    from rptfast.model.flash_shared import probe

    assert probe(CPU, STANDIN) is None and probe(CPU, STANDIN, torch.float32) is None
    monkeypatch.setattr(attention_module.flash_shared, "varlen_kernels", lambda: kernels)
    lm = SimpleNamespace(config=SimpleNamespace(_attn_implementation=attention_module.VARLEN), device=CPU)
    reason = unshared_reason(lm)
    assert not shares_prompts(lm) and says in reason and kernels.name in reason and "\n" not in reason


def test_flash_backend_routes_shared_rows(monkeypatch):
    """resolve_attn('flash') wraps transformers' flash_attention_2: prompt-once rows go to flash_shared, every other
    call to the original function unchanged; wrapping twice wraps once."""
    from transformers import AttentionInterface

    mapping = AttentionInterface._global_mapping
    monkeypatch.setitem(mapping, "flash_attention_2", lambda *args, **kwargs: ("original", args, kwargs))
    monkeypatch.setattr(attention_module, "varlen_shared_attention", lambda *args: ("shared", args))
    attention_module._register_flash()
    wrapper = mapping["flash_attention_2"]
    attention_module._register_flash()
    assert mapping["flash_attention_2"] is wrapper
    assert wrapper("m", "q", "k", "v", None, scaling=0.5, position_ids="p") == (
        "original", ("m", "q", "k", "v", None), {"scaling": 0.5, "position_ids": "p"})
    assert wrapper("m", "q", "k", "v", None, scaling=0.5, **{attention_module.SHARED: "layout"}) == (
        "shared", ("q", "k", "v", "layout", 0.5))
