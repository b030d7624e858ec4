"""bench/gpu.py's CUDA path checks (--part paths; --part owed reuses check_shared_prompts): each in bf16 against an
fp32 (or fp64) reference, on a random-weight Qwen3 of the 0.6B shape made on the spot. On the CPU (--dry-run) the
same code runs at TOY sizes, where the CUDA-only figures (memory) say so instead of a number.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

# the Qwen3-0.6B shape of bench/throughput-0.7b.toml (head_dim 64, untied: 0.7B parameters)
QWEN3_06B = dict(vocab=151936, layers=28, hidden=1024, heads=16, kv_heads=8, intermediate=3072)
TOY = dict(vocab=512, layers=2, hidden=128, heads=2, kv_heads=1, intermediate=256)


def _packed(vocab: int, lengths: list[int], device):
    import torch

    from rptfast.model import Sequence, collate

    g = torch.Generator().manual_seed(0)
    seqs = [Sequence(torch.randint(0, vocab, (n,), generator=g).tolist(), n // 2) for n in lengths]
    return collate(seqs, list(range(len(seqs))), device)


def check_attention(model_dir: Path, device, lengths: list[int]) -> dict:
    """Final hidden states of one packed row in bf16 through each backend vs an fp32 reference: each
    backend's max error must be at most twice that of torch's own bf16 path (sdpa, block-diagonal mask)."""
    import torch

    from rptfast.model import hidden_states, load_policy, resolve_attn, torch_varlen_available

    def hidden(attn: str, dtype):
        lm = load_policy(str(model_dir), dtype=dtype, attn=resolve_attn(attn, device, dtype), trust_remote_code=False,
                         gradient_checkpointing=False).to(device)
        with torch.no_grad():
            return hidden_states(lm, _packed(lm.config.vocab_size, lengths, device)).float()

    ref = hidden("sdpa", torch.float32)
    scale = ref.abs().max().item()
    backends = ["sdpa", "per_seq"] + (["varlen"] if device.type == "cuda" and torch_varlen_available() else [])
    err = {b: (hidden(b, torch.bfloat16) - ref).abs().max().item() / scale for b in backends}
    out = {f"{b}_max_rel_err": e for b, e in err.items()}
    out["ok"] = all(e <= 2 * err["sdpa"] + 1e-6 for e in err.values())
    if "varlen" not in backends:
        out["varlen"] = "not run: needs CUDA and torch.nn.attention.varlen"
    return out


def _shared_groups(vocab: int, groups: list[tuple[int, list[int]]], seed: int):
    """Sequences: per (prompt length, completion lengths), one random prompt and its completions."""
    import torch

    from rptfast.model import Sequence

    g = torch.Generator().manual_seed(seed)
    seqs = []
    for P, lens in groups:
        prompt = torch.randint(0, vocab, (P,), generator=g).tolist()
        seqs += [Sequence(prompt + torch.randint(0, vocab, (R,), generator=g).tolist(), P) for R in lens]
    return seqs


def _logp_and_grads(policy, mb):
    """Log-probs of a micro-batch's scored tokens [R] and the flat gradient of sum(w * logp), w fixed per token."""
    import torch

    policy.zero_grad(set_to_none=True)
    logp, _ = policy(mb, 1.0)
    (logp.float() * torch.linspace(-1, 1, logp.numel(), device=logp.device)).sum().backward()
    return logp.detach().float(), torch.cat([p.grad.float().flatten() for p in policy.parameters()])


def check_shared_prompts(model_dir: Path, device, G: int, P: int, R: int) -> dict:
    """Prompt-once rows against unshared packing through the trainer's default backend in bf16 (varlen or flash on
    CUDA: model/flash_shared.py; per_seq on the CPU): log-probs and gradients, each path's error against an fp32
    unshared reference (per_seq), on one group of G completions of R tokens after a P-token prompt plus a group of
    irregular lengths. The shared path's errors must be at most twice the unshared path's own. Then the
    forward + backward time of both on the G x (P + R) group alone (best of 3 after a warm-up) and its tokens."""
    import torch

    from rptfast.model import PolicyLogprob, collate, collate_shared, load_policy, resolve_attn, shares_prompts

    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def policy(attn: str, dtype):
        lm = load_policy(str(model_dir), dtype=dtype, attn=resolve_attn(attn, device, dtype), trust_remote_code=False,
                         gradient_checkpointing=False).to(device)
        return PolicyLogprob(lm)

    bf16 = policy("auto", torch.bfloat16)
    out = {"backend": bf16.lm.config._attn_implementation, "shares_prompts": shares_prompts(bf16.lm)}
    if device.type == "cuda":
        from rptfast.model.flash_shared import varlen_kernels

        out["kernels"] = varlen_kernels().name
    if not out["shares_prompts"]:
        return {**out, "ok": False, "error": "the default backend does not share prompts: nothing to compare"}
    vocab = bf16.lm.config.vocab_size
    timed = [(P, [R] * G)]
    seqs = _shared_groups(vocab, timed + [(P // 3 + 1, [R - (i * 37) % R for i in range(G - 1)])], seed=0)
    everything = list(range(len(seqs)))
    sh, un = collate_shared(seqs, everything, device), collate(seqs, everything, device)
    assert torch.equal(sh.targets, un.targets)  # the same scored tokens in the same order
    ref_lp, ref_g = _logp_and_grads(policy("per_seq", torch.float32), un)
    res = {name: _logp_and_grads(bf16, mb) for name, mb in (("shared", sh), ("unshared", un))}
    scale = ref_g.norm().item()
    for name, (lp, g) in res.items():
        out[f"{name}_bf16"] = {"logp_max_abs_err": (lp - ref_lp).abs().max().item(),
                               "logp_mean_abs_err": (lp - ref_lp).abs().mean().item(),
                               "grad_rel_err": (g - ref_g).norm().item() / scale}
    out["shared_vs_unshared"] = {"logp_max_abs": (res["shared"][0] - res["unshared"][0]).abs().max().item(),
                                 "grad_rel": (res["shared"][1] - res["unshared"][1]).norm().item() / scale}
    s, u = out["shared_bf16"], out["unshared_bf16"]
    out["ok"] = all(s[k] <= 2 * u[k] + 1e-6 for k in ("logp_max_abs_err", "grad_rel_err"))
    del res, ref_g
    seqs = _shared_groups(vocab, timed, seed=1)
    for name, fn in (("shared", collate_shared), ("unshared", collate)):
        mb = fn(seqs, list(range(G)), device)
        times = []
        for _ in range(4):  # the first is the warm-up
            sync()
            t0 = time.perf_counter()
            _logp_and_grads(bf16, mb)
            sync()
            times.append(time.perf_counter() - t0)
        out[f"{name}_step"] = {"tokens": mb.n_tokens, "fwd_bwd_s": min(times[1:]),
                               "tok_per_s": mb.n_tokens / min(times[1:])}
    out["speedup"] = out["unshared_step"]["fwd_bwd_s"] / out["shared_step"]["fwd_bwd_s"]
    out["shape"] = f"G={G} P={P} R={R}"
    return out


def check_sleep_wake(model_dir: Path, device) -> dict:
    """TorchEngine in bf16: sleep frees the weights (torch.cuda.memory_allocated), wake restores them, and
    the greedy tokens after wake equal those before; level 2 (dropped weights) through update_weights."""
    import torch

    from rptfast.rollout import SamplingConfig
    from rptfast.rollout.torch_engine import TorchEngine

    cuda = device.type == "cuda"
    mem = lambda: torch.cuda.memory_allocated(device) if cuda else None  # noqa: E731
    out = {}
    for level in (1, 2):
        eng = TorchEngine(str(model_dir), dtype=torch.bfloat16, device=device, max_model_len=64, sleep_level=level)
        weights = {n: p.detach().clone() for n, p in eng.model.named_parameters()}
        nbytes = sum(p.numel() * p.element_size() for p in weights.values())
        greedy = SamplingConfig(temperature=0.0, max_tokens=8)
        before = [c.token_ids for c in eng.generate([[1, 2, 3, 4], [5, 6]], 1, greedy)]
        m0 = mem()
        eng.sleep()
        m1 = mem()
        if level == 1:
            eng.wake()
        else:
            eng.update_weights(weights.items())
        m2 = mem()
        after = [c.token_ids for c in eng.generate([[1, 2, 3, 4], [5, 6]], 1, greedy)]
        r = {"weights_mb": nbytes / 2**20, "same_tokens": before == after}
        if cuda:
            r.update(freed_mb=(m0 - m1) / 2**20, restored_mb=(m2 - m1) / 2**20)
            r["ok"] = r["same_tokens"] and m0 - m1 >= 0.95 * nbytes and abs(m2 - m0) <= 0.05 * nbytes
        else:
            r["ok"] = r["same_tokens"]
            r["memory"] = "not measured: torch.cuda.memory_allocated needs CUDA"
        out[f"level_{level}"] = r
        del eng, weights
    return out


def check_offload(model_dir: Path, device, tmp: Path) -> dict:
    """trainer_out/trainer_in round trips bit for bit: optimizer state offload under fp32 masters with bf16
    compute (FSDP2 world-size-1), weight offload under fp32 compute (offload_weights needs no FSDP)."""
    import torch

    from rptfast import config
    from rptfast import train as trainer

    out = {}
    for name, sets in {"optimizer_bf16_compute_fp32_masters": {"model": {"dtype": "bfloat16"}},
                       "optimizer_and_weights_fp32": {"model": {"dtype": "float32"},
                                                      "train": {"offload_weights": True}}}.items():
        tree = {"model": {"path": str(model_dir)}, "data": {"task": "first_token", "prompt_len": 6},
                "rollout": {"engine": "torch", "n": 4, "max_tokens": 4, "max_model_len": 64},
                "train": {"prompts_per_step": 4, "micro_batch_tokens": 64, "steps": 1, "out_dir": str(tmp / name)},
                "log": {"progress": False, "tensorboard": False}}
        for section, table in sets.items():
            tree[section].update(table)
        run, _ = trainer.build(config.from_dict(tree))
        trainer.sync(run)
        trainer.rl_step(run, 0)  # ends with trainer_out: the optimizer state exists and is offloaded
        trainer.trainer_in(run)

        def flat(run=run) -> list[torch.Tensor]:
            state = [t for s in run.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            return [t.detach().clone().cpu() for t in state + list(run.policy.parameters())]

        snap = flat()
        m0 = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        trainer.trainer_out(run)
        m1 = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        trainer.trainer_in(run)
        same = all(torch.equal(a, b) for a, b in zip(snap, flat()))
        r = {"bitwise_equal": same}
        if m0 is not None:
            r["freed_mb"] = (m0 - m1) / 2**20
            r["ok"] = same and m0 > m1
        else:
            r["ok"] = same
            r["memory"] = "not measured on the CPU: trainer_out leaves everything in place there"
        out[name] = r
        run.logger.close()
    return out


def _step_cost(variant: str, model_dir: str, device: str, lengths: list[int], queue) -> None:
    """One forward/backward/AdamW step of the policy in a fresh process: (seconds, peak bytes, grads, new weights)."""
    import torch

    from rptfast import distributed
    from rptfast.model import PolicyLogprob, load_policy, resolve_attn

    dev = torch.device(device)
    d = distributed.Dist(0, 1, 0, dev)
    dtype = torch.bfloat16 if variant != "fp32" else torch.float32
    lm = load_policy(model_dir, dtype=torch.bfloat16 if variant == "bf16 weights" else torch.float32,
                     attn=resolve_attn("auto", dev, dtype), trust_remote_code=False,
                     gradient_checkpointing=False).to(dev)
    policy = PolicyLogprob(lm)
    if variant == "fsdp2 world-size-1":
        distributed.shard(policy, lm.model.layers, d, compute_dtype=dtype)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    mb = _packed(lm.config.vocab_size, lengths, dev)
    weights = torch.linspace(-1, 1, mb.targets.numel(), device=dev)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for i in range(3):  # the first step allocates the optimizer state; the later ones are timed
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=variant == "autocast"):
            logp, _ = policy(mb, 1.0)
        (logp.float() * weights).sum().backward()
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in policy.parameters()]
        grads = torch.cat([g.detach().double().flatten().cpu() for g in grads])
        if i == 0:
            first = grads
            opt.step()
            new = torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().flatten().cpu()
                             for p in policy.parameters()])
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024  # KiB; growth from here on
    master = next(policy.parameters()).dtype
    # numpy, not tensors: torch shares tensors through file descriptors that die with this process
    queue.put((min(times[1:]), peak, first.numpy(), new.numpy(), str(master)))


def _result_of(p, q, what: str, timeout: float):
    """The child's one result, or an error as soon as it dies without one (not after the whole timeout)."""
    import queue

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            return q.get(timeout=2)
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"{what}: its process exited with code {p.exitcode} and no result; "
                                   "its traceback is in this part's log") from None
    p.kill()
    raise TimeoutError(f"{what}: no result after {timeout:.0f} s")


def check_mixed_precision(model_dir: Path, device, lengths: list[int]) -> dict:
    """fp32 masters + bf16 compute: FSDP2 on a world-size-1 mesh (NCCL on a GPU, gloo on the CPU) against
    autocast, bf16 weights and the fp32 reference: step time, peak memory (CUDA: allocated beyond the model;
    CPU: growth of the resident high-water mark), gradient error and masters' dtype. Each in its own process."""
    import torch

    ctx = multiprocessing.get_context("spawn")
    res = {}
    for variant in ("fp32", "fsdp2 world-size-1", "autocast", "bf16 weights"):
        q = ctx.Queue()
        p = ctx.Process(target=_step_cost, args=(variant, str(model_dir), str(device), lengths, q))
        p.start()
        sec, peak, g, w, master = _result_of(p, q, variant, timeout=300)
        p.join()
        res[variant] = (sec, peak, torch.from_numpy(g), torch.from_numpy(w), master)
    ref_g, ref_w = res["fp32"][2], res["fp32"][3]
    w0 = ref_w  # updates compared against the fp32 step
    out = {}
    for variant, (sec, peak, g, w, master) in res.items():
        out[variant] = {"step_s": sec, "peak_mb": peak / 2**20, "master_dtype": master,
                        "grad_rel_err": ((g - ref_g).norm() / ref_g.norm()).item(),
                        "weights_vs_fp32_max": (w - w0).abs().max().item()}
    f = out["fsdp2 world-size-1"]
    # fsdp2's gradients carry bf16 compute error only (<= 2x bf16 weights' own), and its masters stay fp32
    out["ok"] = f["master_dtype"] == "torch.float32" and f["grad_rel_err"] <= 2 * out["bf16 weights"]["grad_rel_err"]
    return out


def check_engine_mismatch(model_dir: Path, device, n_prompts: int, max_tokens: int) -> dict:
    """The bf16 torch engine's logprobs vs the trainer's (bf16 compute, fp32 masters) on the sampled tokens,
    with the trainer's lm_head in bf16 (as the engine's) and in fp32 (TRL's cast_lm_head_to_fp32); each also
    against an fp64 forward of the same weights."""
    import torch

    from rptfast import distributed
    from rptfast.model import PolicyLogprob, Sequence, collate, load_policy, resolve_attn
    from rptfast.rollout import SamplingConfig
    from rptfast.rollout.torch_engine import TorchEngine

    eng = TorchEngine(str(model_dir), dtype=torch.bfloat16, device=device, max_model_len=256)
    g = torch.Generator().manual_seed(1)
    vocab = eng.model.config.vocab_size
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 24, (n_prompts,), generator=g)]
    comps = eng.generate(prompts, 4, SamplingConfig(1.0, 1.0, max_tokens), list(range(n_prompts)))
    seqs = [Sequence(prompts[c.prompt_index] + c.token_ids, len(prompts[c.prompt_index]), 0.0, c.logprobs)
            for c in comps]
    mb = collate(seqs, list(range(len(seqs))), device)
    out = {"tokens": int(mb.targets.numel())}
    with torch.no_grad():
        lm64 = load_policy(str(model_dir), dtype=torch.float64, attn=resolve_attn("sdpa", device, torch.float64),
                           trust_remote_code=False, gradient_checkpointing=False).to(device)
        exact = PolicyLogprob(lm64, "reference")(mb, 1.0)[0].double()
        del lm64
        out["engine_vs_fp64"] = {"mean": (mb.rollout_logprobs.double() - exact).abs().mean().item(),
                                 "max": (mb.rollout_logprobs.double() - exact).abs().max().item()}
        for fp32_head in (False, True):
            lm = load_policy(str(model_dir), dtype=torch.float32, attn=resolve_attn("auto", device, torch.bfloat16),
                             trust_remote_code=False, gradient_checkpointing=False).to(device)
            policy = distributed.shard(PolicyLogprob(lm, "fused", fp32_head), lm.model.layers,
                                       distributed.Dist(0, 1, 0, device), compute_dtype=torch.bfloat16)
            lp = policy(mb, 1.0)[0].double()
            diff = (lp - mb.rollout_logprobs.double()).abs()
            out[f"lm_head_{'fp32' if fp32_head else 'bf16'}"] = {
                "vs_engine_mean": diff.mean().item(), "vs_engine_max": diff.max().item(),
                "vs_fp64_mean": (lp - exact).abs().mean().item(), "vs_fp64_max": (lp - exact).abs().max().item()}
    return out


def part_paths(out: Path, dry: bool, results: Path) -> dict:
    import torch

    from rptfast.testing import make_tiny_model

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    lengths = [37, 5, 64, 64, 13, 101, 2, 64] if not dry else [9, 5, 9, 3]
    shape = TOY if dry else dict(QWEN3_06B, layers=4)
    shared_shape = (4, 24, 8) if dry else (8, 2048, 256)  # G completions of R tokens after a P-token prompt
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", "qwen3", seed=0, **shape)
        checks = {"attention": lambda: check_attention(model, device, lengths),
                  "shared_prompts": lambda: check_shared_prompts(model, device, *shared_shape),
                  "sleep_wake": lambda: check_sleep_wake(model, device),
                  "mixed_precision": lambda: check_mixed_precision(model, device, lengths),
                  "engine_mismatch": lambda: check_engine_mismatch(model, device, 4 if dry else 16, 8 if dry else 64),
                  "offload": lambda: check_offload(model, device, Path(tmp))}
        for name, fn in checks.items():
            t0 = time.perf_counter()
            try:
                res[name] = fn()
            except Exception as e:  # one broken path must not hide the others' figures
                res[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            res[name]["seconds"] = time.perf_counter() - t0
            print(f"paths/{name}: {json.dumps(res[name])[:400]}", flush=True)
    return res
