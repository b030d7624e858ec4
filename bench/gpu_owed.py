"""bench/gpu.py --part owed: the GPU figures issue 31 owes, in one prepared run that fits in 9 minutes on an H100.

Steps, most wanted first, each in a process of its own under a time limit (a CUDA error or a hang ends that step
only), each written out as soon as it ends: results.json, summary.md and the CSV rows are rewritten or appended
after every step, so a run cut short keeps every step that finished.
1. kernels: bench/kernels.py --judged on selective_logprob, the fused loss from logits, linear_logprob and
   linear_policy_loss at the sizes DESIGN.md judges, against the copy bandwidth and the matmul rate measured in the
   same run (rows to kernels.csv); no torch.compile baselines (minutes of compiling).
2. liger: liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss beside linear_policy_loss (bench/liger_peer.py) at
   Liger's own benchmark shape (8 sequences x 1024 tokens, H 4096, V 128256) and at Qwen3's vocabulary (V 151936),
   bf16: forward + backward time, peak memory, loss and gradients against an fp32 reference.
3. shared_prompts: prompt-once rows (model/flash_shared.py on CUDA) against unshared packing at RPT's shape,
   G 8 x (P 2048 + R 256), on a 4-layer Qwen3-0.6B-shaped model: bf16 errors against fp32, forward + backward time.
4. trainer: the trainer's update alone (pack, forward, backward, AdamW; the completions generated once, before,
   by the torch engine) on a random-weight Qwen3-0.6B-shaped model (bench/throughput-0.7b.toml's shape), 4 prompts
   x G 8 x (P 1024 + R 512): tokens/s (trained tokens, and sample tokens: G (P + R) per group, what packing each
   sample whole trains) and MFU from counted FLOPs (model/flops.py), with fp32 masters + bf16 compute (FSDP2
   mixed precision) or bf16 weights, the optimizer state offloaded and restored around every update or kept, and
   the same without prompt sharing. prime-rl reports 11.9k tok/s trainer-only for Qwen3-0.6B on one H100.
5. kernel_tests: pytest tests/kernels compiled, one process, in whatever time is left (at least 60 s).
--dry-run runs every step on the CPU at toy sizes (tests/test_gpu_suite.py): it checks this script, not speed.

Run a step alone: python bench/gpu_owed.py liger --result FILE [--dry-run] (what the orchestrator does).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_paths import QWEN3_06B, TOY

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 540  # the whole part, install included: 9 minutes on an H100
STEP_S = {"kernels": 110, "liger": 110, "shared_prompts": 70, "trainer": 130, "kernel_tests": 150}  # H100 caps
MIN_STEP_S = 20  # a step with less time left than this is skipped (and says so)
PRIME_RL_TOK_S = 11_900  # prime-rl, trainer-only, Qwen3-0.6B, one H100 (issue 31)
OWED_KERNELS = "selective_logprob,fused_policy_loss_from_logits,linear_logprob,linear_policy_loss"


# ---------------------------------------------------------------- the steps that run in this file's process


def step_liger(dry: bool, save) -> dict:
    import torch
    from liger_peer import compare

    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    shapes = [(2, 24, 32, 300)] if dry else [(8, 1024, 4096, 128256), (8, 1024, 4096, 151936)]
    out = {}
    for b, t, h, v in shapes:
        out[f"B{b}xT{t}xH{h}xV{v}"] = compare(b, t, h, v, device, torch.bfloat16, compiled=not dry)
        save(out)
    return out


def step_shared_prompts(dry: bool, save) -> dict:
    import torch
    from gpu_paths import check_shared_prompts

    from rptfast.testing import make_tiny_model

    device = torch.device("cuda", 0) if torch.cuda.is_available() and not dry else torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", "qwen3", seed=0, **(TOY if dry else dict(QWEN3_06B, layers=4)))
        return check_shared_prompts(model, device, *((4, 24, 8) if dry else (8, 2048, 256)))


def _groups(engine, vocab: int, n_prompts: int, G: int, P: int, R: int):
    """Groups of G completions of up to R tokens after random P-token prompts, sampled by `engine` (so their
    rollout log-probs are the policy's), with advantages of mean 0 and std 1."""
    import torch

    from rptfast.rollout import SamplingConfig
    from rptfast.tasks import Prompt
    from rptfast.train import Group

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (P,), generator=g).tolist() for _ in range(n_prompts)]
    comps = engine.generate(prompts, G, SamplingConfig(1.0, 1.0, R), list(range(n_prompts)))
    out = []
    for i, p in enumerate(prompts):
        rewards = torch.randn(G, generator=g)
        out.append(Group(Prompt(i, p), [c for c in comps if c.prompt_index == i], rewards,
                         (rewards - rewards.mean()) / rewards.std(), False))
    return out


def step_trainer(dry: bool, save) -> dict:
    """Trainer-only throughput per variant (see the module docstring): 1 warm-up update, then 3 timed (1 in a dry
    run)."""
    import torch

    from rptfast import config
    from rptfast import train as trainer
    from rptfast.metrics import Timer, peak_flops
    from rptfast.rollout.torch_engine import TorchEngine
    from rptfast.testing import make_tiny_model

    device = torch.device("cuda", 0) if torch.cuda.is_available() and not dry else torch.device("cpu")
    cuda = device.type == "cuda"
    shape = TOY if dry else QWEN3_06B
    n_prompts, G, P, R = (2, 4, 12, 6) if dry else (4, 8, 1024, 512)
    variants = {  # name: (train.master_dtype, train.offload_optimizer, train.share_prompts)
        "fp32_masters_offload": ("float32", True, True), "fp32_masters": ("float32", False, True),
        "bf16_weights_offload": ("bfloat16", True, True), "bf16_weights": ("bfloat16", False, True),
        "fp32_masters_unshared": ("float32", False, False)}
    out = {"shape": f"{n_prompts} prompts x G {G} x (P {P} + R {R})", "prime_rl_tok_per_s": PRIME_RL_TOK_S}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", "qwen3", seed=0, **shape)
        engine = TorchEngine(str(model), dtype=torch.bfloat16, device=device, max_model_len=P + R + 8)
        groups = _groups(engine, shape["vocab"], n_prompts, G, P, R)
        engine.sleep()  # trainer-only: the engine's weights leave the device, as in a step
        sample_tokens = sum(len(g.prompt.token_ids) * G + sum(len(c.token_ids) for c in g.completions) for g in groups)
        for name, (masters, offload, share) in variants.items():
            tree = {"model": {"path": str(model), "dtype": "bfloat16"}, "data": {"task": "first_token"},
                    "rollout": {"engine": "torch", "n": G, "max_tokens": R, "max_model_len": P + R + 8},
                    "train": {"prompts_per_step": n_prompts, "micro_batch_tokens": 64 if dry else 16384,
                              "master_dtype": masters, "offload_optimizer": offload, "share_prompts": share,
                              "steps": 1, "out_dir": str(Path(tmp) / name)},
                    "log": {"progress": False, "tensorboard": False}}
            run, _ = trainer.build(config.from_dict(tree), engine=engine)
            times, moves, metrics = [], [], {}
            for i in range(2 if dry else 4):
                timer = Timer(device)
                if i == 1 and cuda:
                    torch.cuda.reset_peak_memory_stats()
                with timer("restore"):
                    trainer.trainer_in(run)
                metrics = trainer.update(run, groups, i, timer)
                with timer("offload"):
                    trainer.trainer_out(run)
                if i:
                    times.append(timer.times["update"] + timer.times.get("pack", 0.0))
                    moves.append(timer.times["restore"] + timer.times["offload"])
            update_s = sum(times) / len(times)
            peak = peak_flops(device)
            out[name] = {"update_s": update_s, "offload_restore_s": sum(moves) / len(moves),
                         "trained_tokens": metrics["trained_tokens"], "sample_tokens": sample_tokens,
                         "tok_per_s": metrics["trained_tokens"] / update_s,
                         "sample_tok_per_s": sample_tokens / update_s,
                         "with_offload_sample_tok_per_s": sample_tokens / (update_s + sum(moves) / len(moves)),
                         "flops": metrics["flops/update"],
                         "mfu": metrics["flops/update"] / (update_s * peak) if peak else None,
                         "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                         "x_prime_rl": sample_tokens / update_s / PRIME_RL_TOK_S}
            run.logger.close()
            del run
            if cuda:
                torch.cuda.empty_cache()
            print(f"trainer/{name}: {json.dumps(out[name])}", flush=True)
            save(out)
    return out


STEPS_HERE = {"liger": step_liger, "shared_prompts": step_shared_prompts, "trainer": step_trainer}


# ---------------------------------------------------------------- the orchestrator (called by bench/gpu.py)


@functools.cache
def scratch_dir() -> Path:
    """An empty directory for subprocesses to run in: not the checkout (its rptfast/ source folder, without
    kernels/, would shadow the installed package), not DIR (pytest and hypothesis write caches where they run)."""
    return Path(tempfile.mkdtemp(prefix="rptfast-run-"))


def _subprocess(cmd: list[str], log: Path, timeout: float) -> tuple[int, str]:
    """Run cmd in scratch_dir() under a time limit, its output appended to the log; (exit code or 124, stdout)."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=scratch_dir(), timeout=timeout)
        code, stdout, stderr = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        as_text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        code, stdout, stderr = 124, as_text(e.stdout), as_text(e.stderr) + f"\ntimed out after {timeout:.0f} s\n"
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n# {time.perf_counter() - t0:.1f} s, exit {code}\n{stdout}\n{stderr}\n")
    return code, stdout


def run_kernels(out: Path, dry: bool, timeout: float) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "kernels.py"), "--csv", str(out / "kernels.csv"), "--only",
           OWED_KERNELS, "--no-compile"] + (["--tiny"] if dry else ["--judged"])
    code, stdout = _subprocess(cmd, out / "owed.log", timeout)
    lines = stdout.strip().splitlines()
    res = {"exit": code}
    if code == 0 and lines and lines[-1].startswith("{"):
        summary = json.loads(lines[-1])
        res["copy_gbps"], res["matmul_tflops"] = summary["copy_gbps"], summary["matmul_tflops"]
        for r in summary["rows"]:
            res[f"{r['kernel']}.{r['phase']}"] = {k: r.get(k) for k in ("ms", "roofline_pct", "x_eager", "x_twostep",
                                                                       "peak_extra_mb") if r.get(k) is not None}
        res["targets"] = {t["target"]: t["pass"] for t in summary["targets"]}
    return res


def run_kernel_tests(out: Path, dry: bool, timeout: float) -> dict:
    """pytest tests/kernels, verbose, so that a run cut short still counts what finished."""
    tests = ROOT / "tests" / "kernels" / ("test_kernel_advantages.py" if dry else "")
    code, stdout = _subprocess([sys.executable, "-m", "pytest", str(tests), "-v", "-p", "no:cacheprovider"],
                               out / "owed.log", timeout)
    counts = {k.lower(): len(re.findall(rf" {k}( |$)", stdout, re.M)) for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")}
    return {"exit": code, **counts, "complete": code in (0, 1)}


def run_step_here(name: str, out: Path, dry: bool, timeout: float) -> dict:
    """A step of this file in its own process; what it saved is kept even when it fails or runs out of time."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__)), name, "--result", str(result)] + (["--dry-run"] if dry else [])
        code, _ = _subprocess(cmd, out / "owed.log", timeout)
        return {"exit": code, **(json.loads(result.read_text()) if result.exists() else {})}


def owed_steps() -> list[tuple[str, object]]:
    return [("kernels", run_kernels), ("liger", lambda o, d, t: run_step_here("liger", o, d, t)),
            ("shared_prompts", lambda o, d, t: run_step_here("shared_prompts", o, d, t)),
            ("trainer", lambda o, d, t: run_step_here("trainer", o, d, t)), ("kernel_tests", run_kernel_tests)]


def part_owed(out: Path, dry: bool, deadline: float, done) -> dict:
    """Every step in order within the deadline (time.monotonic()); done(name, result) after each one."""
    res = {}
    for i, (name, fn) in enumerate(owed_steps()):
        left = deadline - time.monotonic()
        last = i == len(owed_steps()) - 1
        limit = left if last else min(STEP_S[name], left)
        if limit < MIN_STEP_S and not dry:
            res[name] = {"skipped": f"out of time ({left:.0f} s left)"}
        else:
            t0 = time.monotonic()
            res[name] = fn(out, dry, max(limit, MIN_STEP_S))
            res[name]["seconds"] = time.monotonic() - t0
        done(name, res[name])
    return res


def summary_lines(res: dict, dry: bool) -> list[str]:
    """The owed figures against issue 31's targets (n/a where a step did not finish, and in a dry run)."""
    lines = ["(dry run: toy sizes on the CPU; no figure here says anything about speed)", ""] if dry else []
    for name, r in res.items():
        state = r.get("skipped") or ("ok" if r.get("exit") == 0 else f"FAILED (exit {r.get('exit')}, see owed.log)")
        lines.append(f"- {name}: {state}" + (f" ({r['seconds']:.0f} s)" if "seconds" in r else ""))

    def verdict(ok):
        return "n/a " if ok is None or dry else "PASS" if ok else "FAIL"

    k = res.get("kernels", {})
    for target, ok in k.get("targets", {}).items():
        lines.append(f"  - {verdict(ok)} {target}")
    for shape, r in res.get("liger", {}).items():
        if isinstance(r, dict) and "ours_ms" in r:
            ok = r["liger_ms"] and r["ours_ms"] <= r["liger_ms"] and (r["ours_peak_mb"] is None or
                                                                      r["ours_peak_mb"] <= r["liger_peak_mb"])
            lines.append(f"  - {verdict(ok if r['liger_ms'] else None)} linear_policy_loss vs LigerFusedLinearGRPOLoss "
                         f"{shape}: {r['ours_ms']:.1f} vs {r['liger_ms'] or 0:.1f} ms, peak "
                         f"{r['ours_peak_mb'] or 0:.0f} vs {r['liger_peak_mb'] or 0:.0f} MiB; loss rel err "
                         f"{r['ours_loss_rel_err']:.2g} vs {r['liger_loss_rel_err']:.2g}")
    sp = res.get("shared_prompts", {})
    if "speedup" in sp:
        lines.append(f"  - {verdict(sp.get('ok'))} prompt-once within 2x unshared's bf16 error; {sp['speedup']:.2f}x "
                     f"faster ({sp.get('backend')}, {sp.get('kernels', 'CPU')})")
    for name, r in res.get("trainer", {}).items():
        if isinstance(r, dict) and "sample_tok_per_s" in r:
            mfu = f"MFU {r['mfu']:.1%}" if r["mfu"] else "MFU n/a (CPU)"
            lines.append(f"  - {verdict(r['sample_tok_per_s'] >= 2 * PRIME_RL_TOK_S)} trainer {name}: "
                         f"{r['sample_tok_per_s']:.0f} sample tok/s ({r['x_prime_rl']:.2f}x prime-rl), "
                         f"{r['tok_per_s']:.0f} trained tok/s, {mfu}")
    t = res.get("kernel_tests", {})
    if "passed" in t:
        lines.append(f"  - kernel tests: {t['passed']} passed, {t['failed']} failed, {t['error']} errors, "
                     f"{t['skipped']} skipped{'' if t['complete'] else ' (cut short)'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one step of bench/gpu.py --part owed, in this process")
    parser.add_argument("step", choices=sorted(STEPS_HERE))
    parser.add_argument("--result", type=Path, required=True, help="where the step's JSON goes")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    def save(res: dict) -> None:  # after each shape or variant: a step cut short keeps what it measured
        tmp = args.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, default=str))
        tmp.replace(args.result)

    save(STEPS_HERE[args.step](args.dry_run, save))
    return 0


if __name__ == "__main__":
    sys.exit(main())
