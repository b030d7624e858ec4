"""Prompt-once attention alone, forward and forward+backward, on RPT-shaped rows (the CPU per_seq backend).

    python bench/shared_attention.py                       # P = 1021, G = 8, R in 200..400, 2 units, Hq 4, Hkv 2, D 64
    python bench/shared_attention.py --heads 2 --kv-heads 1 --threads 1 --csv bench/results/shared_attention.csv
    python bench/shared_attention.py --tiny                # toy sizes: proves the script runs, numbers mean nothing
    python bench/shared_attention.py --model runs/bench/tiny-qwen3-4k --heads 2 --kv-heads 1 --threads 1

The same random completions and q, k, v (fp32) through each variant:
- unshared:       the per_seq backend on unshared rows (every sequence its prompt + completion; G prompts per unit);
- gather + mask:  the previous prompt-once attention: the prompt's keys gathered once per completion, one SDPA
                  per (completion length, prompt length) with an explicit [R, P + R] mask (kept here as the before);
- dense mask:     the sdpa backend: one SDPA over the row with the [T, T] prompt-once mask;
- two-part, matmul: own part (causal) and cross part (completions vs prompt) as explicit fp32 matmuls and
                  logsumexp, merged by log-sum-exp, differentiated by autograd (the option the kernels were held to);
- two-part, flash: rptfast.model.shared_prompt.shared_attention (the CPU flash kernels, merged by log-sum-exp;
  the trainer's).
Counted FLOPs are those of exact attention on the variant's own rows (4 Hq D per attended (query, key) pair forward,
twice that backward), so unshared counts its G prompts; a variant that computes masked-out pairs gets no credit for
them. The roofline is an fp32 [2048, 2048] matmul in the same run. Times are medians over --reps after one warm-up;
the load average before and after is printed, since the CPU is shared. The last stdout line is JSON.

--model DIR also times the whole policy on the same sequences (PolicyLogprob: forward, and forward + backward
of the summed log-probs, no optimizer): unshared rows, prompt-once rows with the previous attention (gather + mask,
patched in), and prompt-once rows as the trainer runs them; with the model's counted FLOPs (model.forward_flops).
It isolates the update's compute from the engine and the optimizer, whose times swing with the machine's load.
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from rptfast import model
from rptfast.model import Sequence, collate, collate_shared
from rptfast.model import attention as attention_module
from rptfast.model.attention import _per_seq_unshared
from rptfast.model.shared_prompt import shared_attention
from rptfast.provenance import PROVENANCE, append_rows, stamp

ROOT = Path(__file__).resolve().parent.parent
FIELDS = [*PROVENANCE, "shape", "variant", "fwd_ms", "fwd_bwd_ms", "gflops_fwd_bwd", "roofline_pct",
          "x_unshared", "load_before", "load_after"]


def rows(P: int, G: int, units: int, r_min: int, r_max: int, seed: int) -> list[Sequence]:
    """`units` prompts of P tokens, each with G completions of random lengths in [r_min, r_max]."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for u in range(units):
        prompt = [u] * P  # tokens do not matter to attention alone
        for _ in range(G):
            R = int(torch.randint(r_min, r_max + 1, (1,), generator=g))
            seqs.append(Sequence(prompt + [0] * R, P))
    return seqs


def gather_mask(q, k, v, layout, scale):
    """The previous shared_attention: per (completion length, prompt length), the completions' queries against
    their prompt's keys gathered once per completion followed by their own, under an explicit [R, P + R] mask."""
    by_shape: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    for start, length, p_start, p_len in layout.segments:
        q_idx, k_idx = by_shape.setdefault((length, p_len), ([], []))
        q_idx += range(start, start + length)
        k_idx += [*range(p_start, p_start + p_len), *range(start, start + length)]
    q, k, v = q[0], k[0], v[0]  # [H, T, D]
    out = torch.zeros_like(q)
    for (q_len, p_len), (q_idx, k_idx) in by_shape.items():
        q_idx, k_idx = torch.tensor(q_idx), torch.tensor(k_idx)
        n = q_idx.numel() // q_len
        mask = torch.ones(q_len, p_len + q_len, dtype=torch.bool).tril(p_len) if p_len else None
        qs = q.index_select(1, q_idx).unflatten(1, (n, q_len)).transpose(0, 1)  # [n, H, q_len, D]
        ks, vs = (x.index_select(1, k_idx).unflatten(1, (n, p_len + q_len)).transpose(0, 1) for x in (k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None,
                                                             scale=scale, enable_gqa=True)
        out = out.index_copy(1, q_idx, o.transpose(0, 1).flatten(1, 2))
    return out


def two_part_matmul(q, k, v, layout, scale):
    """The two-part form as explicit fp32 matmuls + logsumexp, autograd through everything."""
    q, k, v = q[0], k[0], v[0]  # [Hq, T, D], [Hkv, T, D]
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    H, T, D = q.shape

    def part(qs, ks, vs, causal):  # [n, H, Lq, D] x [n, H, Lk, D] -> out [n, H, Lq, D], lse [n, H, Lq]
        s = qs @ ks.transpose(-1, -2) * scale
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        lse = s.logsumexp(-1)
        return (s - lse[..., None]).exp() @ vs, lse

    def sel(x, idx, n):
        return x.index_select(1, idx).unflatten(1, (idx.numel() // n, n)).transpose(0, 1)

    out_own, lse_own = q.new_zeros(H, T, D), q.new_zeros(H, T)
    for length, idx in layout.own:
        o, lse = part(sel(q, idx, length), sel(k, idx, length), sel(v, idx, length), True)
        out_own = out_own.index_copy(1, idx, o.transpose(0, 1).flatten(1, 2))
        lse_own = lse_own.index_copy(1, idx, lse.transpose(0, 1).flatten(1, 2))
    out_x, lse_x = q.new_zeros(H, T + 1, D), q.new_full((H, T + 1), float("-inf"))  # padding queries write to T
    for p_len, q_len, k_idx, q_idx, pad in layout.cross:
        o, lse = part(sel(q, q_idx, q_len), sel(k, k_idx, p_len), sel(v, k_idx, p_len), False)
        q_put = q_idx.masked_fill(pad.flatten(), T)
        out_x = out_x.index_copy(1, q_put, o.transpose(0, 1).flatten(1, 2))
        lse_x = lse_x.index_copy(1, q_put, lse.transpose(0, 1).flatten(1, 2))
    lse = torch.logaddexp(lse_own, lse_x[:, :T])
    return (lse_own - lse).exp()[..., None] * out_own + (lse_x[:, :T] - lse).exp()[..., None] * out_x[:, :T]


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_variant(fn, q, k, v, d_out, reps: int) -> tuple[float, float]:
    """Median ms of fn(q, k, v) without grad, and of its forward + backward with d_out as upstream gradient."""
    with torch.no_grad():
        fwd = median_ms(lambda: fn(q, k, v), reps)
    x = [t.detach().requires_grad_() for t in (q, k, v)]

    def step():
        for t in x:
            t.grad = None
        fn(*x).backward(d_out)

    return fwd, median_ms(step, reps)


def model_rows(path: str, seqs: list[Sequence], reps: int, seed: int) -> dict:
    """The whole policy (fp32, per_seq attention) on seqs: unshared, prompt-once with the previous attention, and
    prompt-once as the trainer runs it. Returns per variant: fwd_ms, fwd_bwd_ms, GFLOP/s (counted, fwd + bwd)."""
    cpu = torch.device("cpu")
    lm = model.load_policy(path, dtype=torch.float32, attn=model.resolve_attn("per_seq", cpu, torch.float32),
                           trust_remote_code=False, gradient_checkpointing=False)
    policy, rates = model.PolicyLogprob(lm), model.flop_rates(lm)
    g = torch.Generator().manual_seed(seed)
    vocab = lm.config.vocab_size
    prompts: dict[tuple[int, ...], list[int]] = {}  # random tokens for the same lengths, one prompt per unit
    real = []
    for s in seqs:
        key = tuple(s.tokens[:s.start])
        if key not in prompts:
            prompts[key] = torch.randint(0, vocab, (s.start,), generator=g).tolist()
        real.append(Sequence(prompts[key] + torch.randint(0, vocab, (s.n_scored,), generator=g).tolist(), s.start))
    seqs = real
    idx = list(range(len(seqs)))
    shared, unshared = collate_shared(seqs, idx, cpu), collate(seqs, idx, cpu)

    def before(query, key, value, layout, scaling=None):
        return gather_mask(query, key, value, layout, scaling).transpose(0, 1)[None], None

    def step(mb):
        policy.zero_grad(set_to_none=True)
        policy(mb, 1.0)[0].sum().backward()

    out = {}
    current = attention_module.shared_attention
    for name, mb, attention in [("model, unshared", unshared, current), ("model, gather + mask", shared, before),
                                ("model, two-part", shared, current)]:
        attention_module.shared_attention = attention  # what the per_seq backend calls
        try:
            with torch.no_grad():
                fwd = median_ms(lambda: policy(mb, 1.0), reps)  # noqa: B023 (called before the loop moves on)
            full = median_ms(lambda: step(mb), reps)  # noqa: B023
        finally:
            attention_module.shared_attention = current
        out[name] = dict(fwd_ms=fwd, fwd_bwd_ms=full, gflops_fwd_bwd=3 * model.forward_flops(rates, mb) / full / 1e6,
                         tokens=mb.n_tokens)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=1021, help="prompt tokens per unit")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--units", type=int, default=2, help="prompts (units) in the row")
    parser.add_argument("--r-min", type=int, default=200, help="shortest completion")
    parser.add_argument("--r-max", type=int, default=400, help="longest completion")
    parser.add_argument("--heads", type=int, default=4, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA when fewer than --heads)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per variant (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, 1 rep: the script runs, numbers mean nothing")
    parser.add_argument("--csv", type=Path, default=None, help="append rows to this CSV")
    parser.add_argument("--model", default=None, help="HF model directory: also time the whole policy (see above)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.prompt, args.group, args.units, args.r_min, args.r_max, args.reps = 37, 3, 3, 5, 11, 1
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}; pick heads = k * kv-heads")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    cpu = torch.device("cpu")
    seqs = rows(args.prompt, args.group, args.units, args.r_min, args.r_max, args.seed)
    idx = list(range(len(seqs)))
    shared, unshared = collate_shared(seqs, idx, cpu), collate(seqs, idx, cpu)
    layout, scale, D = shared.shared, args.head_dim ** -0.5, args.head_dim
    unshared_pairs = int(((L := (unshared.cu_seqlens[1:] - unshared.cu_seqlens[:-1]).long()) * (L + 1) // 2).sum())
    flop_per_pair = 4 * args.heads * D

    g = torch.Generator().manual_seed(args.seed)

    def qkv(T):  # [1, H, T, D] fp32, with a random upstream gradient
        return (torch.randn(1, args.heads, T, D, generator=g), torch.randn(1, args.kv_heads, T, D, generator=g),
                torch.randn(1, args.kv_heads, T, D, generator=g), torch.randn(1, args.heads, T, D, generator=g))

    sh, un = qkv(shared.n_tokens), qkv(unshared.n_tokens)
    dense = layout.dense_mask(cpu)
    variants = {  # name: (fn(q [1, Hq, T, D], k, v [1, Hkv, T, D]) -> [Hq, T, D], inputs, attended pairs)
        "unshared": (lambda q, k, v: _per_seq_unshared(q, k, v, scale, cu_seq_lens_q=unshared.cu_seqlens)[0][0]
                     .transpose(0, 1),
                     un, unshared_pairs),
        "gather + mask": (lambda q, k, v: gather_mask(q, k, v, layout, scale), sh, layout.attention_pairs),
        "dense mask": (lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=dense, scale=scale, enable_gqa=True)[0], sh, layout.attention_pairs),
        "two-part, matmul": (lambda q, k, v: two_part_matmul(q, k, v, layout, scale), sh, layout.attention_pairs),
        "two-part, flash": (lambda q, k, v: shared_attention(q, k, v, layout, scale)[0][0].transpose(0, 1), sh,
                            layout.attention_pairs),
    }
    a = torch.randn(2048, 2048, generator=g)
    roof = 2 * 2048 ** 3 / median_ms(lambda: a @ a, max(args.reps, 3)) / 1e6  # GFLOP/s
    shape = (f"P{args.prompt} G{args.group} R{args.r_min}-{args.r_max} units{args.units} "
             f"Hq{args.heads} Hkv{args.kv_heads} D{D}")
    print(f"{shape}: shared row {shared.n_tokens} tokens, {layout.attention_pairs:,} pairs; unshared "
          f"{unshared.n_tokens} tokens, {unshared_pairs:,} pairs; {torch.get_num_threads()} threads; "
          f"fp32 matmul roofline {roof:.1f} GFLOP/s; load average {load_before:.2f}")
    with torch.no_grad():
        ref = variants["two-part, flash"][0](*sh[:3])
    results = {}
    for name, (fn, (q, k, v, d_out), pairs) in variants.items():
        if name != "unshared":  # the same row, so the same outputs: a variant that is fast and wrong is no result
            with torch.no_grad():
                err = (fn(q, k, v) - ref).abs().max().item()
            if err > 1e-4:
                raise SystemExit(f"{name} differs from two-part, flash by {err:.2e}")
        fwd, full = time_variant(fn, q, k, v, d_out[0], args.reps)
        results[name] = dict(fwd_ms=fwd, fwd_bwd_ms=full, gflops_fwd_bwd=3 * flop_per_pair * pairs / full / 1e6)
    if args.model:
        results.update(model_rows(args.model, seqs, args.reps, args.seed))
    load_after = os.getloadavg()[0]
    base = results["unshared"]["fwd_bwd_ms"]
    print(f"{'variant':<18} {'fwd ms':>9} {'fwd+bwd ms':>11} {'GFLOP/s':>8} {'% roof':>7} {'x unshared':>10}")
    for name, r in results.items():
        unshared_ms = results["model, unshared"]["fwd_bwd_ms"] if name.startswith("model") else base
        r.update(roofline_pct=100 * r["gflops_fwd_bwd"] / roof, x_unshared=unshared_ms / r["fwd_bwd_ms"])
        print(f"{name:<18} {r['fwd_ms']:9.1f} {r['fwd_bwd_ms']:11.1f} {r['gflops_fwd_bwd']:8.2f} "
              f"{r['roofline_pct']:7.1f} {r['x_unshared']:10.2f}")
    print(f"load average after: {load_after:.2f}")
    if args.csv and not args.tiny:
        device = {**stamp(), "device": f"cpu {platform.machine()} {torch.get_num_threads()} threads"}
        append_rows(args.csv, FIELDS, [dict(**device, shape=shape, variant=name, load_before=round(load_before, 2),
                                             load_after=round(load_after, 2),
                                             **{k: round(v, 3) for k, v in r.items() if k in FIELDS})
                                        for name, r in results.items()])
    print(json.dumps({"shape": shape, "roofline_gflops": roof, "load": [load_before, load_after], **results}))


if __name__ == "__main__":
    main()
