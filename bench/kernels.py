"""Kernel microbenchmarks against the roofline measured in the same run.

    python bench/kernels.py                   # GPU: realistic sizes, targets checked
    python bench/kernels.py --tiny            # tiny sizes (what CI runs; the default on a CPU)
    python bench/kernels.py --csv out.csv     # rows go to out.csv (default bench/results/kernels.csv)
    python bench/kernels.py --no-compile      # skip the torch.compile baselines (they compile per shape)

First the roofline: device copy bandwidth (bytes read + written by a large clone) and the bf16 matmul
rate. Then each kernel's forward, backward and full step (median time; CUDA: triton's do_bench with
warm-up, L2 flushed between runs), its achieved GB/s or TFLOP/s and percent of the roofline, the
speedup over torch eager (kernels/reference.py at the input dtype: no fp32 upcast, the cheapest eager
variant, so the speedups are lower bounds), over torch.compile of that reference, and over
Liger-Kernel where it imports; and the peak memory beyond the inputs.
Bytes and FLOPs are the minimum any implementation must move or compute (logits read once, the
gradient written once; 2NHV FLOPs per lm_head matmul, recomputation not counted), so the percentage
also charges the kernel for its own extra passes.
Prints a table, then pass/fail against DESIGN.md's targets (GPU, full sizes); the last stdout line
is JSON. Rows are appended to the CSV as each finishes, with rptfast.provenance's columns (date, commit,
dirty, device, torch, triton). On a CPU the sizes are tiny and the numbers mean nothing: the run exists
so that this script is tested. --only KERNEL,... runs those kernels' cases alone (bench/gpu.py --part owed).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from rptfast.kernels import (
    fused_policy_loss_from_logits,
    group_advantages,
    linear_logprob,
    linear_policy_loss,
    policy_loss,
    reference,
    selective_logprob,
    topk_entropy,
)

from rptfast.errors import run_script
from rptfast.provenance import PROVENANCE, append_rows, stamp

ROOT = Path(__file__).resolve().parent.parent
FIELDS = [
    *PROVENANCE, "kernel", "shape", "dtype", "phase", "ms", "rate", "unit", "roofline_pct",
    "eager_ms", "x_eager", "compile_ms", "x_compile", "twostep_ms", "x_twostep", "liger_ms", "x_liger",
    "peak_extra_mb", "note",
]  # fmt: skip


KERNEL_OF = {"run_fused_loss": "fused_policy_loss_from_logits"}  # the kernel a Bench.run_* method measures


def timeit(fn, device: torch.device) -> float:
    """Median milliseconds of fn() after warm-up (CUDA: triton's do_bench, which syncs and flushes L2)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def peak_extra_mb(fn, device: torch.device) -> float | None:
    """Peak memory allocated during fn() beyond what was allocated before it, in MiB (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def roofline(device: torch.device, tiny: bool) -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s)."""
    n_bytes = (1 << 22) if tiny or device.type != "cuda" else (1 << 31)
    x = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    copy_ms = timeit(lambda: x.clone(), device)
    size = 256 if tiny or device.type != "cuda" else 8192
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    mm_ms = timeit(lambda: a @ b, device)
    return 2 * n_bytes / copy_ms / 1e6, 2 * size**3 / mm_ms / 1e9


def liger_baselines() -> dict:
    """Liger-Kernel losses that compute the same quantity, if Liger imports: the sum of -logprob (its fused
    CE), and the GRPO loss (triton_grpo_loss, on logits from a plain lm_head matmul). Liger computes
    gradients in its forward, so it is only compared on the full (forward + backward) rows."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return {}
    ce, flce = LigerCrossEntropyLoss(reduction="sum"), LigerFusedLinearCrossEntropyLoss(reduction="sum")
    out = {
        "selective_logprob": lambda logits, targets: ce(logits, targets),
        "linear_logprob": lambda hidden, weight, targets: flce(weight, hidden, targets),
    }
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError:
        return out

    def grpo(hidden, weight, targets, old, ref, adv, mask, beta, eps_low, eps_high):
        # Liger takes [B, L + 1, V] logits (the last position predicts nothing) and one advantage per sequence
        logits = torch.cat([hidden, hidden[-1:]]) @ weight.T  # [N + 1, V]
        per_token = triton_grpo_loss(logits[None], old[None], ref[None], targets[None], adv[:1], mask[None].int(),
                                     temperature=1.0, beta=beta, eps_low=eps_low, eps_high=eps_high, inplace=True)
        per_token = per_token[0] if isinstance(per_token, tuple) else per_token
        return (per_token * mask).sum() / mask.sum()

    out["linear_policy_loss"] = grpo
    return out


class Bench:
    def __init__(self, device: torch.device, compile_baselines: bool, copy_gbps: float, mm_tflops: float,
                 sink=None, only: set[str] | None = None):
        self.device, self.compile_baselines, self.only = device, compile_baselines, only
        self.copy_gbps, self.mm_tflops = copy_gbps, mm_tflops
        self.liger = liger_baselines()
        self.rows: list[dict] = []
        self.sink = sink or (lambda row: None)  # called with each row as it is finished (the CSV writer)

    def case(self, run, *args, **kwargs) -> None:
        """One benchmark case (unless `only` leaves its kernel out); a failure becomes a row that names it, and the
        next case runs."""
        if self.only is not None and KERNEL_OF.get(run.__name__, run.__name__.removeprefix("run_")) not in self.only:
            return
        try:
            run(*args, **kwargs)
        except Exception as e:  # an OOM or a kernel that fails at one shape must not lose the other rows
            name = KERNEL_OF.get(run.__name__, run.__name__.removeprefix("run_"))
            shape = "x".join(str(a) for a in args if isinstance(a, int) and not isinstance(a, bool))
            dtype = next((str(a).removeprefix("torch.") for a in args if isinstance(a, torch.dtype)), "")
            row = dict(kernel=name, shape=shape, dtype=dtype, phase="failed", ms=None, rate=None, unit="",
                       roofline_pct=None, peak_extra_mb=None,
                       note=f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            self.rows.append(row)
            self.sink(row)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _try(self, fn) -> tuple[float | None, str]:
        try:
            return timeit(fn, self.device), ""
        except torch.OutOfMemoryError:
            return None, "OOM"
        except Exception as e:  # a baseline that fails is reported in its row, not fatal
            return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        finally:
            if hasattr(fn, "release"):
                fn.release()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def phases(self, impl, inputs, grad_out):
        """{'fwd'|'bwd'|'full': callable} for an autograd function of `inputs` with upstream `grad_out`."""

        def clear():
            for x in inputs:
                x.grad = None

        def full():
            clear()
            impl(*inputs).backward(grad_out)

        out = {"fwd": lambda: impl(*inputs), "full": full}
        kept = {}

        def bwd():
            if "out" not in kept:
                kept["out"] = impl(*inputs)
            clear()
            kept["out"].backward(grad_out, retain_graph=True)

        bwd.release = kept.clear  # record() frees the retained graph once bwd is timed
        out["bwd"] = bwd
        return out

    def record(self, kernel, shape, dtype, phase, ours, baselines, work, unit, peak_mb, note="", roof=None):
        """One row: `work` is bytes (unit GB/s) or FLOPs (unit TFLOP/s) for the phase; `roof` overrides the
        run's roofline (e.g. the matmul rate measured at the kernel's own shapes)."""
        ms, err = self._try(ours)
        if ms is None:
            raise RuntimeError(f"{kernel} {phase} failed: {err}")
        rate = work / ms / 1e6 if unit == "GB/s" else work / ms / 1e9
        roof = roof or (self.copy_gbps if unit == "GB/s" else self.mm_tflops)
        row = dict(
            kernel=kernel, shape=shape, dtype=str(dtype).removeprefix("torch."), phase=phase, ms=ms,
            rate=rate, unit=unit, roofline_pct=100 * rate / roof, peak_extra_mb=peak_mb,
        )  # fmt: skip
        notes = [note] if note else []
        for name, fn in baselines.items():
            if fn is None:
                continue
            base_ms, err = self._try(fn)
            row[f"{name}_ms"] = base_ms
            row[f"x_{name}"] = base_ms / ms if base_ms else None
            if err:
                notes.append(f"{name}: {err}")
        row["note"] = "; ".join(notes)
        self.rows.append(row)
        self.sink(row)
        return row

    def compiled(self, fn):
        if not self.compile_baselines:
            return None
        return torch.compile(fn)

    def run_selective_logprob(self, n, v, dtype, compile_here):
        logits = torch.randn(n, v, device=self.device, dtype=dtype).mul_(2).requires_grad_()  # no fp32 temporary
        targets = torch.randint(0, v, (n,), device=self.device)
        grad = torch.randn(n, device=self.device)
        ours = self.phases(lambda x: selective_logprob(x, targets), [logits], grad)
        eager = self.phases(lambda x: reference.selective_logprob(x, targets), [logits], grad.to(dtype))
        comp_fn = self.compiled(reference.selective_logprob) if compile_here else None
        comp = self.phases(lambda x: comp_fn(x, targets), [logits], grad.to(dtype)) if comp_fn else {}
        liger_fn = self.liger.get("selective_logprob")
        liger = self.phases(lambda x: liger_fn(x, targets), [logits], torch.ones((), device=self.device))
        nv = n * v * logits.element_size()
        peak = peak_extra_mb(ours["full"], self.device)
        for phase, work in (("fwd", nv), ("bwd", 2 * nv), ("full", 2 * nv)):
            baselines = {
                "eager": eager[phase],
                "compile": comp.get(phase),
                "liger": liger[phase] if liger_fn and phase == "full" else None,
            }
            full_peak = peak if phase == "full" else None
            self.record("selective_logprob", f"{n}x{v}", dtype, phase, ours[phase], baselines, work, "GB/s", full_peak)
        logits.grad = None

    def run_fused_loss(self, n, v, dtype, compile_here):
        logits = torch.randn(n, v, device=self.device, dtype=dtype).mul_(2)  # no fp32 temporary
        targets = torch.randint(0, v, (n,), device=self.device)
        old = -torch.rand(n, device=self.device) * 5
        adv = torch.randn(n, device=self.device)
        mask = torch.rand(n, device=self.device) > 0.1
        options = dict(kl_coef=0.01, ref_logprobs=old + 0.1, dual_clip=3.0)

        def ours():  # the buffer holds a gradient after the first call: same work, finite values
            fused_policy_loss_from_logits(logits, targets, old, adv, mask, **options)

        x = logits.clone().requires_grad_()

        def eager_with(fn):
            def step():
                x.grad = None
                fn(x, targets, old, adv, mask, **options)[0].backward()

            return step

        comp_fn = self.compiled(reference.policy_loss_from_logits) if compile_here else None
        peak = peak_extra_mb(ours, self.device)
        nv = n * v * logits.element_size()
        note = f"extra memory {100 * peak * 2**20 / nv:.1f}% of logits" if peak is not None else ""
        self.record(
            "fused_policy_loss_from_logits", f"{n}x{v}", dtype, "full", ours,
            {"eager": eager_with(reference.policy_loss_from_logits),
             "compile": eager_with(comp_fn) if comp_fn else None},
            2 * nv, "GB/s", peak, note,
        )  # fmt: skip

    def run_linear_logprob(self, n, h, v, dtype, compile_here):
        hidden = torch.randn(n, h, device=self.device, dtype=dtype).requires_grad_()
        weight = (torch.randn(v, h, device=self.device) * h**-0.5).to(dtype).requires_grad_()
        targets = torch.randint(0, v, (n,), device=self.device)
        grad = torch.randn(n, device=self.device)
        inputs = [hidden, weight]
        ours = self.phases(lambda a, b: linear_logprob(a, b, targets), inputs, grad)
        eager = self.phases(lambda a, b: reference.linear_logprob(a, b, targets), inputs, grad.to(dtype))
        comp_fn = self.compiled(reference.linear_logprob) if compile_here else None
        comp = self.phases(lambda a, b: comp_fn(a, b, targets), inputs, grad.to(dtype)) if comp_fn else {}
        liger_fn = self.liger.get("linear_logprob")
        liger = self.phases(lambda a, b: liger_fn(a, b, targets), inputs, torch.ones((), device=self.device))
        flops = 2 * n * h * v
        grads_mb = (hidden.numel() + weight.numel()) * hidden.element_size() / 2**20
        peak = peak_extra_mb(ours["full"], self.device)
        peak = None if peak is None else peak - grads_mb  # beyond the gradients it must return
        for phase, work in (("fwd", flops), ("bwd", 2 * flops), ("full", 3 * flops)):
            baselines = {
                "eager": eager[phase],
                "compile": comp.get(phase),
                "liger": liger[phase] if liger_fn and phase == "full" else None,
            }
            full_peak = peak if phase == "full" else None
            self.record(
                "linear_logprob",
                f"{n}x{h}x{v}",
                dtype,
                phase,
                ours[phase],
                baselines,
                work,
                "TFLOP/s",
                full_peak,
            )
        hidden.grad = weight.grad = None

    def run_linear_policy_loss(self, n, h, v, dtype, compile_here):
        """Full step only: the fused loss makes its gradient in the forward, so a forward row would time
        the whole work and a backward row nothing. Roofline: the lm_head matmul at these very shapes;
        the work counted is the three matmuls any implementation needs (6NHV), so the two-step path's
        fourth matmul (the recompute) shows as a lower rate."""
        hidden = torch.randn(n, h, device=self.device, dtype=dtype).requires_grad_()
        weight = (torch.randn(v, h, device=self.device) * h**-0.5).to(dtype).requires_grad_()
        targets = torch.randint(0, v, (n,), device=self.device)
        old = reference.linear_logprob(hidden.detach()[:1], weight.detach(), targets[:1]).float().mean()
        old = old + 0.3 * torch.randn(n, device=self.device)  # ratios around 1: some clipped
        ref = old + 0.1 * torch.randn(n, device=self.device)
        adv = torch.randn(n, device=self.device)
        mask = torch.rand(n, device=self.device) > 0.1
        options = dict(kl_coef=0.04, ref_logprobs=ref, eps_low=0.2, eps_high=0.28)

        def step_of(fn):
            def step():
                hidden.grad = weight.grad = None
                fn(hidden, weight, targets, old, adv, mask, **options)[0].backward()

            return step

        def two_step(a, b, t, o, ad, m, **kw):
            return policy_loss(linear_logprob(a, b, t), o, ad, m, **kw)

        comp_fn = self.compiled(reference.linear_policy_loss) if compile_here else None
        liger_fn = self.liger.get("linear_policy_loss")

        def liger():
            hidden.grad = weight.grad = None
            liger_fn(hidden, weight, targets, old, ref, adv, mask, 0.04, 0.2, 0.28).backward()

        logits = torch.empty(n, v, device=self.device, dtype=dtype)  # [N, V], freed after the roofline
        mm_ms = timeit(lambda: torch.mm(hidden.detach(), weight.detach().t(), out=logits), self.device)
        logits = None
        mm_tflops = 2 * n * h * v / mm_ms / 1e9
        grads_mb = (hidden.numel() + weight.numel()) * hidden.element_size() / 2**20
        peak = peak_extra_mb(step_of(linear_policy_loss), self.device)
        peak = None if peak is None else peak - grads_mb
        self.record(
            "linear_policy_loss", f"{n}x{h}x{v}", dtype, "full", step_of(linear_policy_loss),
            {"eager": step_of(reference.linear_policy_loss), "compile": step_of(comp_fn) if comp_fn else None,
             "twostep": step_of(two_step), "liger": liger if liger_fn else None},
            6 * n * h * v, "TFLOP/s", peak, f"lm_head matmul at this shape: {mm_tflops:.3g} TFLOP/s", roof=mm_tflops,
        )  # fmt: skip
        hidden.grad = weight.grad = None

    def run_linear_policy_loss_frozen_head(self, n, h, v, dtype):
        """The fused loss with the lm_head frozen (LoRA): no grad_weight, so two matmuls instead of three and no
        fp32 [V, H] accumulator. Work counted: the two (4NHV). Baselines with the same frozen weight: torch eager
        (kernels/reference.py) and the two-step path; the note has our step with grad_weight made, the ratio of
        the two (ideally 1.5x: three matmuls against two) and the peak memory of each (CUDA)."""
        hidden = torch.randn(n, h, device=self.device, dtype=dtype).requires_grad_()
        weight = (torch.randn(v, h, device=self.device) * h**-0.5).to(dtype)  # frozen: requires_grad False
        trained = weight.clone().requires_grad_()
        targets = torch.randint(0, v, (n,), device=self.device)
        old = -torch.rand(n, device=self.device) * 5
        adv = torch.randn(n, device=self.device)
        mask = torch.rand(n, device=self.device) > 0.1

        def step_of(fn, w):
            def step():
                hidden.grad = trained.grad = None
                fn(hidden, w, targets, old, adv, mask, eps_high=0.28)[0].backward()

            return step

        def two_step(a, b, t, o, ad, m, **kw):
            return policy_loss(linear_logprob(a, b, t), o, ad, m, **kw)

        frozen_ms, both_ms = (timeit(step_of(linear_policy_loss, w), self.device) for w in (weight, trained))
        peak_frozen, peak_both = (peak_extra_mb(step_of(linear_policy_loss, w), self.device) for w in (weight, trained))
        note = f"with grad_weight {both_ms:.3f} ms: {both_ms / frozen_ms:.2f}x (ideal 1.5x)"
        if peak_frozen is not None:
            note += f"; peak {peak_frozen:.0f} MiB frozen vs {peak_both:.0f} MiB with grad_weight"
        self.record(
            "linear_policy_loss_frozen_head", f"{n}x{h}x{v}", dtype, "full", step_of(linear_policy_loss, weight),
            {"eager": step_of(reference.linear_policy_loss, weight), "twostep": step_of(two_step, weight)},
            4 * n * h * v, "TFLOP/s", peak_frozen, note,
        )  # fmt: skip
        hidden.grad = trained.grad = None

    def run_policy_loss(self, n, compile_here):
        g = torch.Generator(device=self.device).manual_seed(0)
        logp = (-torch.rand(n, device=self.device, generator=g) * 5).requires_grad_()
        old = logp.detach() + torch.randn(n, device=self.device, generator=g) * 0.3
        adv = torch.randn(n, device=self.device, generator=g)
        mask = torch.rand(n, device=self.device, generator=g) > 0.1
        options = dict(dual_clip=3.0, ref_logprobs=old + 0.1, kl_coef=0.01, rollout_logprobs=old - 0.1, tis_cap=2.0)

        def loss_of(fn):
            return lambda x: fn(x, old, adv, mask, **options)[0]

        one = torch.ones((), device=self.device)
        ours = self.phases(loss_of(policy_loss), [logp], one)
        eager = self.phases(loss_of(reference.policy_loss), [logp], one)
        comp_fn = self.compiled(reference.policy_loss) if compile_here else None
        comp = self.phases(loss_of(comp_fn), [logp], one) if comp_fn else {}
        read = n * (4 * 5 + 1)  # logp, old, adv, ref, rollout in fp32 and the mask
        for phase, work in (("fwd", read), ("bwd", 4 * n), ("full", read + 4 * n)):
            self.record(
                "policy_loss", f"{n}", torch.float32, phase, ours[phase],
                {"eager": eager[phase], "compile": comp.get(phase)}, work, "GB/s", None,
            )  # fmt: skip

    def run_group_advantages(self, n_groups, group_size, compile_here):
        rewards = torch.randn(n_groups * group_size, device=self.device)
        comp_fn = self.compiled(reference.group_advantages) if compile_here else None
        self.record(
            "group_advantages", f"{n_groups}x{group_size}", torch.float32, "fwd",
            lambda: group_advantages(rewards, group_size),
            {"eager": lambda: reference.group_advantages(rewards, group_size),
             "compile": (lambda: comp_fn(rewards, group_size)) if comp_fn else None},
            rewards.numel() * 8 + n_groups, "GB/s", None,
        )  # fmt: skip

    def run_topk_entropy(self, n, v, dtype, compile_here):
        logits = torch.randn(n, v, device=self.device, dtype=dtype).mul_(2)  # no fp32 temporary
        comp_fn = self.compiled(reference.topk_entropy) if compile_here else None
        self.record(
            "topk_entropy", f"{n}x{v}", dtype, "fwd", lambda: topk_entropy(logits, 16),
            {"eager": lambda: reference.topk_entropy(logits, 16),
             "compile": (lambda: comp_fn(logits, 16)) if comp_fn else None},
            logits.numel() * logits.element_size(), "GB/s", None,
        )  # fmt: skip


def peaked_lm_head(n, h, v, spread, top, device, dtype, seed=0):
    """hidden [n, H], weight [V, H], targets [n] whose logits look like a language model's: a Gaussian
    background of std `spread` over the vocabulary, plus 5 plausible tokens per row top, top - 1.5, ...
    nats above the background's mean (+- 1), drawn from a Zipf law over token ids (BPE ids are roughly
    frequency-sorted, so likely tokens cluster at low ids); the target is one of the two likeliest."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5  # rows nearly orthogonal, norm ~1
    ranks = torch.arange(1, v + 1, dtype=torch.float64)
    plausible = torch.multinomial(ranks**-1.1, n * 5, replacement=True, generator=g).view(n, 5)  # [n, 5]
    boost = top - 1.5 * torch.arange(5, dtype=torch.float64) + torch.randn(n, 5, generator=g, dtype=torch.float64)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) * spread  # background logits ~ N(0, spread)
    w = weight[plausible]  # [n, 5, H]
    gram = w @ w.transpose(1, 2) + 1e-9 * torch.eye(5, dtype=torch.float64)  # [n, 5, 5] (repeats: regularised)
    coef = torch.linalg.solve(gram, boost - (w @ hidden[:, :, None])[..., 0])  # [n, 5]
    hidden += (coef[:, None, :] @ w)[:, 0]  # the 5 plausible logits set to their boosts exactly
    targets = plausible[torch.arange(n), torch.randint(0, 2, (n,), generator=g)]
    return hidden.to(device, dtype), weight.to(device, dtype), targets.to(device)


def grad_filter_study(device: torch.device, tiny: bool) -> list[dict]:
    """Gradient filtering on real-shaped peaked distributions: the share of gradient blocks it zeroes, and
    the error of grad_hidden / grad_weight against fp64 with and without it (max error relative to the
    largest gold value, and the relative Frobenius error). On-policy (ratio 1), so that no token crosses a
    clip boundary through rounding alone (that would switch its whole gradient on or off)."""
    n, h, v = (64, 128, 4000) if tiny else (128, 256, 151936)
    rows = []
    for spread, top in ((1.0, 14.0), (2.0, 14.0), (1.0, 20.0), (2.0, 20.0)):
        hidden, weight, targets = peaked_lm_head(n, h, v, spread, top, device, torch.bfloat16)
        adv = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)
        mask = torch.ones(n, dtype=torch.bool, device=device)
        gold_h, gold_w = hidden.double().requires_grad_(), weight.double().requires_grad_()
        reference.linear_policy_loss(gold_h, gold_w, targets, None, adv.double(), mask)[0].backward()
        logp = reference.linear_logprob(hidden.double(), weight.double(), targets)
        row = dict(spread=spread, top=top, shape=f"{n}x{h}x{v}", target_p=logp.exp().mean().item())
        for filt in (False, True):
            a, b = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            loss, metrics, _, entropy = linear_policy_loss(a, b, targets, None, adv, mask, grad_filter=filt)
            loss.backward()
            tag = "filtered" if filt else "exact"
            if filt:
                row["filtered_frac"] = metrics["grad_filtered_frac"].item()
            row["entropy"] = entropy.mean().item()
            for name, ours, gold in (("grad_hidden", a.grad, gold_h.grad), ("grad_weight", b.grad, gold_w.grad)):
                diff = ours.double() - gold
                row[f"{name}_{tag}_max"] = diff.abs().max().item() / gold.abs().max().item()
                row[f"{name}_{tag}_fro"] = (diff.norm() / gold.norm()).item()
        rows.append(row)
    return rows


def judge_targets(rows: list[dict]) -> list[dict]:
    """DESIGN.md's performance targets, judged on the full-size GPU rows."""

    def find(kernel, shape, phase):
        return next((r for r in rows if (r["kernel"], r["shape"], r["phase"]) == (kernel, shape, phase)), None)

    out = []

    def check(name, value, ok):
        out.append({"target": name, "value": value, "pass": bool(ok) if value is not None else None})

    sel = find("selective_logprob", "32768x151936", "fwd")
    check("selective_logprob fwd >= 80% of copy bandwidth", sel and sel["roofline_pct"],
          sel and sel["roofline_pct"] >= 80)  # fmt: skip
    check("selective_logprob fwd >= 90% of copy bandwidth (issue 31)", sel and sel["roofline_pct"],
          sel and sel["roofline_pct"] >= 90)  # fmt: skip
    fused = find("fused_policy_loss_from_logits", "32768x151936", "full")
    speedup = fused and fused.get("x_eager")
    check("fused loss fwd+bwd >= 5x torch eager (32768x151936 bf16)", speedup, speedup and speedup >= 5)
    # "then at or past Liger-Kernel's triton_grpo_loss": judged where Liger imports (n/a otherwise)
    linear = find("linear_policy_loss", "32768x4096x151936", "full")
    x_liger = linear and linear.get("x_liger")
    check("linear_policy_loss at or past Liger's GRPO loss (lm_head + triton_grpo_loss)", x_liger,
          x_liger and x_liger >= 1.0)
    if fused and fused["peak_extra_mb"] is not None:
        pct = 100 * fused["peak_extra_mb"] * 2**20 / (32768 * 151936 * 2)
        check("fused loss extra memory <= 10% of logits", pct, pct <= 10)
    lin_fwd = find("linear_logprob", "32768x4096x151936", "fwd")
    lin_full = find("linear_logprob", "32768x4096x151936", "full")
    check("linear_logprob fwd >= 75% of matmul rate", lin_fwd and lin_fwd["roofline_pct"],
          lin_fwd and lin_fwd["roofline_pct"] >= 75)  # fmt: skip
    # issue 31 asks 90% "of the copy bandwidth" for both; linear_logprob is bound by its matmul, whose rate is
    # its roofline, so it is judged at 90% of that
    check("linear_logprob fwd >= 90% of matmul rate (issue 31)", lin_fwd and lin_fwd["roofline_pct"],
          lin_fwd and lin_fwd["roofline_pct"] >= 90)  # fmt: skip
    # DESIGN's 3.2x is the fused linear policy loss's (three matmuls); linear_logprob's backward recomputes the
    # logits (four matmuls, ~4x by construction), so its ratio is printed in its rows, not judged
    fused_lin = find("linear_policy_loss", "32768x4096x151936", "full")
    ratio = fused_lin["ms"] / lin_fwd["ms"] if lin_fwd and fused_lin else None
    check("linear_policy_loss fwd+bwd <= 3.2x linear_logprob fwd", ratio, ratio and ratio <= 3.2)
    small = find("linear_logprob", "8192x4096x151936", "full")
    if small and lin_full and small["peak_extra_mb"] is not None:
        growth = lin_full["peak_extra_mb"] - small["peak_extra_mb"]
        # O(N) floats are allowed (logprob, logsumexp, upstream gradient): 64 bytes a row is plenty
        check("linear_logprob memory flat in N (extra MiB from N=8192 to 32768)", growth,
              growth <= 64 * (32768 - 8192) / 2**20)  # fmt: skip
    return out


def fmt(value, digits=2) -> str:
    if value is None or value == "":
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (always on a CPU)")
    parser.add_argument("--csv", type=Path, default=ROOT / "bench" / "results" / "kernels.csv")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--only", default=None, help="comma-separated kernels: run their cases alone")
    parser.add_argument("--judged", action="store_true", help="only the shapes DESIGN.md's targets are judged at")
    parser.add_argument("--filter-study", action="store_true",
                        help="only the gradient filtering study (error vs fp64, share of blocks zeroed)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    torch.manual_seed(0)
    if device.type != "cuda":
        print("# CPU run: tiny sizes through the torch paths; these numbers mean nothing about the kernels.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("# TRITON_INTERPRET=1: Triton kernels run in the interpreter; timings are meaningless.")
    if args.filter_study:
        study = grad_filter_study(device, args.tiny)
        for r in study:
            print("  ".join(f"{k}={fmt(val, 4)}" for k, val in r.items()))
        print(json.dumps({**stamp(), "filter_study": study}))
        return
    copy_gbps, mm_tflops = roofline(device, tiny)
    print(f"# {device_name}: copy {copy_gbps:.1f} GB/s (read + write), bf16 matmul {mm_tflops:.1f} TFLOP/s")

    # torch.compile on a CPU needs a C++ toolchain and minutes per shape: the baseline is a GPU one.
    compile_baselines = not args.no_compile and device.type == "cuda"
    args.csv.parent.mkdir(parents=True, exist_ok=True)

    def sink(row: dict) -> None:  # each row reaches the disk as it is finished: a timeout keeps what ran
        append_rows(args.csv, FIELDS, [{**stamp(), **{k: fmt(v, 4) if isinstance(v, float) else v
                                                      for k, v in row.items()}}])
        print(f"# {row['kernel']} {row['shape']} {row['phase']}: {fmt(row['ms'], 3)} ms {row['note']}",
              file=sys.stderr, flush=True)

    only = set(args.only.split(",")) if args.only else None
    bench = Bench(device, compile_baselines, copy_gbps=copy_gbps, mm_tflops=mm_tflops, sink=sink, only=only)
    bf16 = torch.bfloat16
    if tiny:
        bench.case(bench.run_selective_logprob, 64, 1000, bf16, True)
        bench.case(bench.run_fused_loss, 64, 1000, bf16, True)
        bench.case(bench.run_linear_logprob, 64, 64, 1000, bf16, True)
        bench.case(bench.run_linear_policy_loss, 64, 64, 1000, bf16, True)
        bench.case(bench.run_linear_policy_loss_frozen_head, 64, 64, 1000, bf16)
        bench.case(bench.run_policy_loss, 4096, True)
        bench.case(bench.run_group_advantages, 64, 8, True)
        bench.case(bench.run_topk_entropy, 64, 1000, bf16, True)
    else:  # the first shape of each kernel is the one DESIGN.md's targets are judged at; --judged runs it alone
        for n, h, v in ((32768, 4096, 151936), (8192, 4096, 151936), (32768, 2048, 128256))[:1 if args.judged else 3]:
            bench.case(bench.run_linear_logprob, n, h, v, bf16, (n, h) == (32768, 4096))
            bench.case(bench.run_linear_policy_loss, n, h, v, bf16, (n, h) == (32768, 4096))
            bench.case(bench.run_linear_policy_loss_frozen_head, n, h, v, bf16)
        for v in (151936, 32000, 128256)[:1 if args.judged else 3]:
            bench.case(bench.run_selective_logprob, 32768, v, bf16, v == 151936)
        for v in (151936, 32000)[:1 if args.judged else 2]:
            bench.case(bench.run_fused_loss, 32768, v, bf16, v == 151936)
        bench.case(bench.run_policy_loss, 1 << 20, True)
        bench.case(bench.run_group_advantages, 1024, 16, True)
        bench.case(bench.run_topk_entropy, 8192, 151936, bf16, True)

    header = ["kernel", "shape", "phase", "ms", "rate", "%roof", "eager", "x eager", "compile", "x comp",
              "2-step", "x 2-step", "liger", "x liger", "peak MiB", "note"]  # fmt: skip
    table = [header]
    for r in bench.rows:
        table.append([
            r["kernel"], r["shape"], r["phase"], fmt(r["ms"], 3), f"{fmt(r['rate'], 1)} {r['unit']}".strip(),
            fmt(r["roofline_pct"], 1), fmt(r.get("eager_ms"), 3), fmt(r.get("x_eager")),
            fmt(r.get("compile_ms"), 3), fmt(r.get("x_compile")), fmt(r.get("twostep_ms"), 3),
            fmt(r.get("x_twostep")), fmt(r.get("liger_ms"), 3),
            fmt(r.get("x_liger")), fmt(r["peak_extra_mb"], 1), r["note"],
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())

    judged = [] if tiny else judge_targets(bench.rows)
    for t in judged:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        print(f"{verdict}  {t['target']}: {fmt(t['value'])}")

    summary = dict(**stamp(), tiny=tiny, copy_gbps=copy_gbps, matmul_tflops=mm_tflops, rows=bench.rows,
                   targets=judged, csv=str(args.csv))  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(run_script(main))
