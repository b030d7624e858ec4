"""bench/kernels.py runs end to end at tiny sizes; no timing is asserted (the numbers mean nothing here)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_benchmark_writes_json_and_csv(tmp_path):
    out = tmp_path / "kernels.csv"
    # the interpreter would time Triton's Python emulation: run the torch paths (or CUDA) instead
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernels.py"), "--tiny", "--no-compile", "--csv", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["tiny"] and summary["copy_gbps"] > 0 and summary["matmul_tflops"] > 0
    kernels = {r["kernel"] for r in summary["rows"]}
    assert kernels == {
        "selective_logprob", "fused_policy_loss_from_logits", "linear_logprob", "linear_policy_loss", "policy_loss",
        "group_advantages", "topk_entropy", "linear_policy_loss_frozen_head",
    }  # fmt: skip
    assert all(r["ms"] > 0 and r["eager_ms"] > 0 for r in summary["rows"])
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(summary["rows"])
    assert {r["device"] for r in rows} == {summary["device"]} and all(r["commit"] and r["date"] for r in rows)


def test_a_failing_case_is_a_row_and_the_next_case_runs():
    """One case that fails (an OOM at one shape, say) becomes a row naming it; rows reach the sink as they
    finish, so a run cut short by a timeout keeps what it measured."""
    import importlib.util

    import torch

    # by its path: a bare `import kernels` may find another module of that name first (the tests' own kernels/
    # directory, once transformers has probed for Hugging Face's `kernels` package)
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    bench_kernels = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec.loader.exec_module(bench_kernels)
    finally:
        sys.path.pop(0)

    seen = []
    bench = bench_kernels.Bench(torch.device("cpu"), False, copy_gbps=1.0, mm_tflops=1.0, sink=seen.append)

    def run_broken(n, v, dtype):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    bench.case(run_broken, 32768, 151936, torch.bfloat16)
    bench.case(bench.run_group_advantages, 4, 8, False)
    assert [r["kernel"] for r in seen] == ["broken", "group_advantages"] and seen == bench.rows
    assert seen[0]["phase"] == "failed" and seen[0]["shape"] == "32768x151936" and seen[0]["dtype"] == "bfloat16"
    assert "OutOfMemoryError" in seen[0]["note"] and seen[1]["ms"] > 0
