"""`rptfast bench throughput` end to end on the tiny fixture: real engines, one step, no timing assertions."""

import csv
import json
import subprocess
import sys

import pytest

from rptfast import config
from rptfast.throughput import PHASES


@pytest.mark.parametrize("extra", [["--ablations", "--trl"]])
def test_throughput_one_step(tiny_dir, tmp_path, extra):
    cfg = config.from_dict({
        "model": {"path": tiny_dir},
        "data": {"task": "first_token", "prompt_len": 6},
        "rollout": {"n": 4, "max_tokens": 4, "max_model_len": 64},
        "train": {"prompts_per_step": 4, "micro_batch_tokens": 64, "steps": 1},
    })
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml(cfg))
    out, table = tmp_path / "t.json", tmp_path / "t.csv"
    r = subprocess.run([sys.executable, "-m", "rptfast", "bench", "throughput", str(path), "--steps", "1",
                        "--warmup", "0", "--json", str(out), "--csv", str(table), *extra],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["json"] == str(out)
    report = json.loads(out.read_text())
    d = report["default"]
    # every phase was timed, and together they account for the step
    assert set(d["phases"]) == set(PHASES)
    assert d["phases"]["generate"]["s"] > 0 and d["phases"]["update"]["s"] > 0 and d["phases"]["sync"]["s"] > 0
    assert abs(d["phase_sum_s"] - d["step_s"]) <= 0.05 * d["step_s"]
    assert d["copy_gbps"] > 0 and d["sync_gbps"] > 0
    assert set(report["ablations"]) == {"unshared prompts", "padded micro-batches", "logits + selective_logprob",
                                        "torch reference logprobs", "torch engine"}
    # prompt-once packing: the update's tokens fall by (G P + sum R) / (P + sum R), and so do its FLOPs
    unshared = report["ablations"]["unshared prompts"]
    G, P, R = d["group_size"], d["prompt_tokens"], d["completion_tokens"]
    assert unshared["completion_tokens"] == R and unshared["prompt_tokens"] == P  # the same rollouts
    assert d["phases"]["update"]["tokens"] == P + R and unshared["phases"]["update"]["tokens"] == G * P + R
    assert unshared["phases"]["update"]["flops"] > d["phases"]["update"]["flops"] > 0
    assert "update tokens" in r.stdout and "predicted" in r.stdout
    for res in report["ablations"].values():
        assert res["ratio"] == pytest.approx(res["step_s"] / d["step_s"])
        assert abs(res["phase_sum_s"] - res["step_s"]) <= 0.05 * res["step_s"]
    assert "step_ratio" in report["trl"] or "not installed" in report["trl"]["note"]
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 1 + 5 + ("step_ratio" in report["trl"])
    for row in rows:
        assert row["device"] == "cpu" and row["commit"] and row["date"] == report["date"]
    assert "phase" in r.stdout and "ablations" in r.stdout
