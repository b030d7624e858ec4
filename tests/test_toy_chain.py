"""`make demo-rpt` end to end at a tiny size: the Makefile's own commands, as subprocesses, in a scratch directory.

Each command gets overrides that shrink it (a 1-layer base, a few steps, a few samples); the chain, its
files and the table are the real ones.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHRINK = {  # the first two words of a command -> overrides appended to it
    ("toy", "corpus"): ["--documents", "24"],
    ("train", "rpt-toy-base"): ["--set", "model.scratch_layers=1", "--set", "train.ntp_sequences=8",
                                "--set", "train.eval_prompts=8", "--set", "train.eval_every=0",
                                "--set", "train.warmup_steps=0"],
    ("prepare", "--config"): [],
    ("eval", "--config"): ["--set", "eval.samples=16"],
    ("train", "rpt-toy"): ["--set", "train.prompts_per_step=4", "--set", "rollout.n=2",
                           "--set", "train.eval_prompts=8", "--set", "train.eval_every=0",
                           "--set", "train.warmup_steps=0"],
    ("toy", "table"): [],
}


def demo_commands() -> list[list[str]]:
    """The demo-rpt recipe as make expands it, with 3 base steps and 2 RPT steps."""
    out = subprocess.run(["make", "-n", "--no-print-directory", "demo-rpt", "RPT=rptfast", "TOY=runs/rpt-toy",
                          "RPT_STEPS=2"], cwd=ROOT, capture_output=True, text=True, check=True)
    lines = out.stdout.replace("\\\n", " ").splitlines()  # make -n keeps a recipe's continued lines
    return [shlex.split(line)[1:] for line in lines if line.startswith("rptfast ")]  # setup's lines, if any, go


def test_demo_rpt_chain_runs_and_writes_the_table(tmp_path):
    commands = demo_commands()
    assert [tuple(c[:2]) for c in commands] == [
        ("toy", "corpus"), ("train", "rpt-toy-base"), ("prepare", "--config"), ("eval", "--config"),
        ("train", "rpt-toy"), ("eval", "--config"), ("train", "rpt-toy-base"), ("eval", "--config"),
        ("toy", "table")]
    rptfast = str(Path(sys.executable).parent / "rptfast")
    for argv in commands:
        extra = SHRINK[tuple(argv[:2])]
        if argv[:2] == ["train", "rpt-toy-base"] and "model.path=runs/rpt-toy/base/final" not in argv:
            extra = extra + ["--set", "train.ntp_steps=3", "--set", "data.toy_think_from=2"]
        r = subprocess.run([rptfast, *argv, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, f"{shlex.join(argv)}\n{r.stdout}\n{r.stderr}"
    toy = tmp_path / "runs/rpt-toy"
    table = (toy / "rpt_toy_table.txt").read_text()
    assert table == r.stdout  # the last command printed it
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["accuracy", "(%)", "easy", "medium"]
    assert [line[:41].strip() for line in lines[2:6]] == [
        "next-token prediction, base", "next-token reasoning, before RPT", "next-token reasoning, after RPT",
        "next-token prediction, base + NTP control"]
    result = json.loads((toy / "rpt_toy_table.json").read_text())
    evals = {name: json.loads(Path(tmp_path, path).read_text()) for name, path in result["evals"].items()}
    assert {e["model"] for e in evals.values()} == {"runs/rpt-toy/base/final", "runs/rpt-toy/rpt/final",
                                                    "runs/rpt-toy/control/final"}
    # the table's cells are the evaluations' own numbers, regrouped: "all" of a split equals eval's split row
    base = result["rows"]["next-token prediction, base"]
    for split in ("easy", "medium", "hard"):
        cell, row = base[f"{split}/all"], evals["base"]["splits"][split]
        assert cell["positions"] == row["samples"]
        assert row["samples"] == 0 or abs(cell["accuracy"] - row["plain"]) < 1e-9
        assert base[f"{split}/reducible"]["positions"] + base[f"{split}/random"]["positions"] == row["samples"]
    rl = [json.loads(x) for x in (toy / "rpt/metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rl if r.get("phase") == "rl"]) == 2
    control = [json.loads(x) for x in (toy / "control/metrics.jsonl").read_text().splitlines()]
    assert len([r for r in control if r.get("phase") == "ntp"]) == 2  # as many steps as RPT took
    assert all((toy / f"rpt_toy_{name}.png").stat().st_size > 0 for name in ("reward", "accuracy", "length"))
    # completion lengths: the per-sample lengths eval wrote, regrouped the same way
    lengths = result["lengths"]["completion tokens, before RPT"]
    easy = np.array(evals["base"]["per_sample"]["response_len"])
    assert abs(lengths["easy/all"] - easy.mean()) < 1e-9 and (easy >= 1).all()
