"""Where each RL step's time and memory go: `rptfast bench throughput CONFIG`.

    rptfast bench throughput CONFIG [--steps K] [--warmup W] [--ablations] [--trl] [--trace] [--set ...]

Runs W warm-up steps (not counted) and K measured steps of the real loop (trainer.rl_step)
and reports, per phase (generate, reward, sleep, pack, logprobs, update, offload, sync):
mean time, share of the step, tokens/s and peak memory; for the step: time, tokens/s
(sequence tokens through the trainer per second of wall time) and MFU on a GPU. The weight
sync is also reported as GB/s against a plain device copy of the same bytes, measured in
the same run.

--ablations reruns the same steps with one change each and reports each as a ratio to the
default: each sequence packed with its own prompt instead of prompt-once packing (with the
tokens the update processed and the factor predicted from the lengths, (G P + sum R) /
(P + sum R) per group, exact when no group is split across micro-batches); padded instead
of packed micro-batches; logits + selective_logprob, and the torch reference log-softmax,
instead of linear_logprob; the other rollout engine.

Counted FLOPs (model.flop_rates: the decoder's matrices per token, lm_head per scored token,
attention per (query, key) pair the mask lets through; a backward counts twice its forward)
come with the tokens of the update and the log-prob pre-passes.
--trl runs the same job through TRL's GRPOTrainer in a subprocess (rptfast/trl_peer.py says
what is matched and what differs) and reports the ratio of step time and of peak memory.

MFU divides the counted FLOPs of the update and the pre-passes by their time and the GPU's dense bf16 peak.
The engine is named in every output: with rollout.engine = "torch" (a GPU without vLLM) generation runs
through TorchEngine, eager HF forwards with a KV cache, and its times are that engine's, not vLLM's.

Output: a table on the console, a JSON file (--json), and one row per variant appended
to bench/results/throughput.csv (--csv) with rptfast.provenance's columns and the engine.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rptfast import config
from rptfast import train as trainer
from rptfast.errors import atomic_path
from rptfast.provenance import PROVENANCE, append_rows, device_name, stamp

PHASES = ["generate", "reward", "sleep", "pack", "logprobs", "update", "offload", "sync"]
CSV_FIELDS = [*PROVENANCE, "config", "variant", "engine", "steps", "step_s", "tok_per_s", "mfu", "peak_gb",
              *[f"{p}_s" for p in PHASES], "sync_gbps", "copy_gbps", "ratio", "note", "update_tokens", "update_gflop"]
ENGINE_LABEL = {"TorchEngine": "TorchEngine (eager HF forwards with a KV cache; not vLLM)",
                "VLLMEngine": "vLLM (in process)"}


def copy_gbps(run: trainer.Run, repeats: int = 3) -> tuple[float, float]:
    """(GB of weights in the engine's dtype, best GB/s of copying them once on the device)."""
    dtype = getattr(run.engine, "dtype", None)
    src = [p.detach().to(dtype or p.dtype) for _, p in trainer.sync_tensors(run)]  # LoRA: the adapters
    dst = [torch.empty_like(t) for t in src]
    nbytes = sum(t.numel() * t.element_size() for t in src)
    best = float("inf")
    for _ in range(repeats):
        if run.d.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for a, b in zip(dst, src):
            a.copy_(b)
        if run.d.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / 1e9, nbytes / 1e9 / best


def measure(cfg: config.Config, steps: int, warmup: int, engine=None, trace: Path | None = None):
    """Run warm-up + measured RL steps; return (summary dict, the engine, for reuse)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(Path(tmp) / "run")),
                                  log=dataclasses.replace(cfg.log, progress=False, tensorboard=False))
        run, _ = trainer.build(cfg, engine=engine)
        trainer.sync(run)  # the engine holds the policy's weights, whatever it held before
        for i in range(warmup):
            trainer.rl_step(run, i)
        if trace is not None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.d.device.type == "cuda" else [])
            with profile(activities=acts, record_shapes=True) as prof:
                rows = [trainer.rl_step(run, warmup + i) for i in range(steps)]
            prof.export_chrome_trace(str(trace))
        else:
            rows = [trainer.rl_step(run, warmup + i) for i in range(steps)]
        weights_gb, copy = copy_gbps(run)
        run.logger.close()
    mean = lambda key: sum(r.get(key, 0.0) or 0.0 for r in rows) / len(rows)  # noqa: E731
    step_s = mean("time/step")
    phases = {}
    for p in PHASES:
        s = mean(f"time/{p}")
        tokens = {"generate": mean("generated_tokens"), "update": mean("trained_tokens"),
                  "logprobs": mean("prepass_tokens")}.get(p)
        phases[p] = {"s": s, "share": s / step_s, "tok_per_s": tokens / s if tokens and s else None,
                     "peak_gb": max(r.get(f"peak_mem_gb/{p}", 0.0) for r in rows), "tokens": tokens,
                     "flops": mean(f"flops/{p}") if p in ("update", "logprobs") else None}
    sync_s = phases["sync"]["s"]
    out = {"step_s": step_s, "phase_sum_s": sum(v["s"] for v in phases.values()), "phases": phases,
           "tok_per_s": mean("trained_tokens") / step_s, "mfu": mean("mfu") or None,
           "peak_gb": max(r["peak_mem_gb"] for r in rows), "weights_gb": weights_gb,
           "sync_gbps": weights_gb / sync_s if sync_s else None, "copy_gbps": copy,
           "engine": type(run.engine).__name__, "params": run.n_params, "steps": steps, "warmup": warmup,
           "prompt_tokens": mean("prompt_tokens"), "completion_tokens": mean("completion_tokens"),
           "group_size": cfg.rollout.n, "share_prompts": cfg.train.share_prompts}
    return out, run.engine


def ablations(cfg: config.Config) -> list[tuple[str, list[str]]]:
    """(name, overrides) of each one-change variant, against the default."""
    out = [("unshared prompts", ["train.share_prompts=false"]),
           ("padded micro-batches", ["train.packing=padded"]),
           ("logits + selective_logprob", ["model.logprob=logits"]),
           ("torch reference logprobs", ["model.logprob=reference"])]
    engine = cfg.rollout.engine if cfg.rollout.engine != "auto" else (
        "vllm" if importlib.util.find_spec("vllm") else "torch")
    if engine == "vllm":
        out.append(("torch engine", ["rollout.engine=torch"]))
    elif importlib.util.find_spec("vllm"):
        out.append(("vllm engine", ["rollout.engine=vllm"]))
    return out


def trl_peer(cfg: config.Config, steps: int, warmup: int) -> dict:
    """The same job through TRL, in its own process; {} with a note when TRL is absent."""
    if importlib.util.find_spec("trl") is None:
        return {"note": "TRL is not installed (pip install trl); peer comparison skipped"}
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out = Path(tmp) / "config.toml", Path(tmp) / "trl.json"
        cfg_path.write_text(config.to_toml(cfg))
        r = subprocess.run([sys.executable, "-m", "rptfast.trl_peer", str(cfg_path), "--steps", str(steps),
                            "--warmup", str(warmup), "--json", str(out), "--out-dir", str(Path(tmp) / "trl")],
                           capture_output=True, text=True, env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
        if r.returncode != 0:
            lines = r.stderr.strip().splitlines()
            errors = [line for line in lines if "Error" in line]  # the exception, not a progress bar after it
            last = (errors or lines or [f"exit code {r.returncode}"])[-1]
            return {"note": f"TRL run failed: {last}"}
        return json.loads(out.read_text())


def table(name: str, res: dict) -> str:
    engine = ENGINE_LABEL.get(res["engine"], res["engine"])
    lines = [f"throughput: {name} | {device_name()} | engine {engine} | {res['params'] / 1e6:.2f}M params | "
             f"{res['steps']} steps after {res['warmup']} warm-up",
             f"{'phase':<10} {'time s':>9} {'share':>7} {'tok/s':>10} {'peak GiB':>9} {'tokens':>9} {'GFLOP':>9}"]
    for p, v in res["phases"].items():
        tok = f"{v['tok_per_s']:.0f}" if v["tok_per_s"] else "-"
        n = f"{v['tokens']:.0f}" if v["tokens"] else "-"
        gflop = f"{v['flops'] / 1e9:.2f}" if v["flops"] else "-"
        lines.append(f"{p:<10} {v['s']:>9.4f} {v['share']:>7.1%} {tok:>10} {v['peak_gb']:>9.2f} {n:>9} {gflop:>9}")
    other = res["step_s"] - res["phase_sum_s"]
    lines.append(f"{'(other)':<10} {other:>9.4f} {other / res['step_s']:>7.1%}")
    mfu = f" | MFU {res['mfu']:.1%} (counted FLOPs of update + pre-passes)" if res["mfu"] else ""
    lines.append(f"{'step':<10} {res['step_s']:>9.4f} {1:>7.0%} {res['tok_per_s']:>10.0f} {res['peak_gb']:>9.2f}{mfu}")
    lines.append(f"generate: {engine}")
    if res["sync_gbps"]:
        lines.append(f"weight sync: {res['weights_gb'] * 1e3:.1f} MB at {res['sync_gbps']:.2f} GB/s; a plain device "
                     f"copy of the same bytes: {res['copy_gbps']:.2f} GB/s ({res['copy_gbps'] / res['sync_gbps']:.1f}x "
                     f"faster than the sync)")
    return "\n".join(lines)


def predicted_token_ratio(res: dict) -> float:
    """Unshared over prompt-once update tokens from the lengths: (G P + sum R) / (P + sum R), summed over groups."""
    G, P, R = res["group_size"], res["prompt_tokens"], res["completion_tokens"]
    return (G * P + R) / (P + R)


def shared_tokens_line(shared: dict, unshared: dict) -> str:
    """Update tokens and counted FLOPs without prompt sharing relative to with it, and the predicted token ratio."""
    s, u = shared["phases"]["update"], unshared["phases"]["update"]
    flops = f", GFLOP {u['flops'] / s['flops']:.2f}x" if s["flops"] and u["flops"] else ""
    return (f"update tokens {u['tokens'] / s['tokens']:.3f}x (predicted {predicted_token_ratio(shared):.3f}x)"
            f"{flops}")


def csv_row(name: str, variant: str, res: dict, ratio: float | None, note: str = "") -> dict:
    row = {**stamp(), "config": name, "variant": variant, "engine": res.get("engine", ""), "steps": res.get("steps"),
           "ratio": ratio, "note": note}
    if "phases" in res:
        row.update({"step_s": res["step_s"], "tok_per_s": res["tok_per_s"], "mfu": res["mfu"],
                    "peak_gb": res["peak_gb"], "sync_gbps": res["sync_gbps"], "copy_gbps": res["copy_gbps"],
                    **{f"{p}_s": v["s"] for p, v in res["phases"].items()},
                    "update_tokens": res["phases"]["update"]["tokens"],
                    "update_gflop": (res["phases"]["update"]["flops"] or 0) / 1e9})
    else:
        row.update({"step_s": res.get("step_s"), "peak_gb": res.get("peak_mem_gb")})
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}


def run(config_name: str, overrides: list[str], steps: int, warmup: int, with_ablations: bool, with_trl: bool,
        trace: bool, json_path: Path, csv_path: Path) -> dict:
    overrides = [*overrides, "train.ntp_steps=0"]  # RL steps only
    cfg = config.load(config_name, overrides)
    if not cfg.model.path:
        raise config.ConfigError("bench throughput needs model.path (a model to load); the from-scratch model of "
                                 "the parity preset is made by `rptfast train`: pass --set model.path=DIR")
    name = Path(config_name).stem
    json_path.parent.mkdir(parents=True, exist_ok=True)
    default, engine = measure(cfg, steps, warmup, trace=json_path.with_suffix(".trace.json") if trace else None)
    print(table(name, default), flush=True)
    report = {"config": name, **stamp(), "default": default, "ablations": {}, "trl": None}
    rows = [csv_row(name, "default", default, 1.0)]
    if with_ablations:
        print("ablations (ratio of step time to the default, same run; > 1 is slower):")
        for variant, sets in ablations(cfg):
            vcfg = config.load(config_name, overrides + sets)
            reuse = engine if not any(s.startswith("rollout.engine") for s in sets) else None
            res, _ = measure(vcfg, steps, warmup, engine=reuse)
            ratio = res["step_s"] / default["step_s"]
            focus = "generate" if "engine" in variant else "update"
            phase_ratio = res["phases"][focus]["s"] / max(default["phases"][focus]["s"], 1e-12)
            extra = ""
            if variant == "unshared prompts":
                extra = " | " + shared_tokens_line(default, res)
            print(f"  {variant:<28} step {ratio:5.2f}x | {focus} {phase_ratio:5.2f}x | "
                  f"peak {res['peak_gb']:.2f} GiB{extra}")
            report["ablations"][variant] = {**res, "ratio": ratio, f"{focus}_ratio": phase_ratio}
            rows.append(csv_row(name, variant, res, ratio))
    if with_trl:
        peer = trl_peer(cfg, steps, warmup)
        report["trl"] = peer
        if "step_s" in peer:
            peer["step_ratio"] = peer["step_s"] / default["step_s"]
            peer["mem_ratio"] = peer["peak_mem_gb"] / default["peak_gb"]
            print(f"TRL {peer['trl']} GRPOTrainer ({peer['generation']}): step {peer['step_s']:.4f} s = "
                  f"{peer['step_ratio']:.2f}x rptfast's; peak memory {peer['peak_mem_gb']:.2f} GiB = "
                  f"{peer['mem_ratio']:.2f}x")
            rows.append(csv_row(name, f"trl {peer['trl']}", peer, peer["step_ratio"], peer["generation"]))
        else:
            print(peer["note"])
    if device_name() == "cpu":
        print("(on the CPU these numbers show where time goes, not what a GPU does)")
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    append_rows(csv_path, CSV_FIELDS, rows)
    print(json.dumps({"step_s": default["step_s"], "tok_per_s": default["tok_per_s"], "mfu": default["mfu"],
                      "json": str(json_path), "csv": str(csv_path)}))
    return report
