"""One log line per step: times and peak memory per phase, tokens/s, MFU, the data cursor."""

from __future__ import annotations

import os
import time

from rptfast.metrics import Timer, peak_flops, peak_memory_gb
from rptfast.train.run import Run


def resident_gb() -> float | None:
    """The process's resident memory now, in GiB (Linux's /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return None


def finish_metrics(run: Run, metrics: dict, timer: Timer, t0: float, step: int) -> dict:
    dt = time.perf_counter() - t0
    times = timer.times
    metrics.setdefault("phase", "rl")
    metrics["time/step"] = dt
    for k, v in times.items():
        metrics[f"time/{k}"] = v
        metrics[f"peak_mem_gb/{k}"] = timer.peaks[k]
    trained = metrics.get("trained_tokens", 0)
    metrics["tok_per_s"] = trained / dt
    if "generated_tokens" in metrics and times.get("generate"):
        metrics["tok_per_s/generate"] = metrics["generated_tokens"] / times["generate"]
    if times.get("update"):
        metrics["tok_per_s/update"] = trained / times["update"]
    if times.get("logprobs"):
        metrics["tok_per_s/logprobs"] = metrics["prepass_tokens"] / times["logprobs"]
    metrics["peak_mem_gb"] = max(timer.peaks.values(), default=peak_memory_gb(run.d.device))
    if run.d.device.type == "cpu":  # the peak above only grows (start-up included): what the process holds now
        metrics["rss_gb"] = resident_gb()
    peak = peak_flops(run.d.device)
    busy = times.get("update", 0.0) + times.get("logprobs", 0.0)
    if peak and busy and "flops/update" in metrics:
        # counted FLOPs (model/flops.py, summed over ranks): the decoder's matrices per token, lm_head per scored
        # token, attention per attended pair; not 6 x params x tokens, which would charge the embedding and
        # lm_head for every token (25-30% too high at RPT shapes, where most tokens are prompt, never scored)
        flops = metrics["flops/update"] + metrics.get("flops/logprobs", 0)
        metrics["mfu"] = flops / (busy * peak * run.d.world)
    metrics["cursor"] = run.cursor
    return metrics
