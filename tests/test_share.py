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
from rptfast.model.shared_prompt import shared_attention

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


def policy(tiny_dir, attn: str, checkpointing: bool = False):
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
])
def test_shared_equals_unshared(tiny_dir, G, attn, budget, checkpointing, prompts):
    seqs = groups_of(G, prompts, seed=G + budget)
    pol = policy(tiny_dir, attn, checkpointing)
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
