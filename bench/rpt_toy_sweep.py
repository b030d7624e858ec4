"""The RPT toy sweep behind docs/rpt.md: one setting of the base's pre-training, by default the share of
answers its last steps work out (data.toy_think, the p_cot of the parity study).

    .venv/bin/python bench/rpt_toy_sweep.py [--key data.toy_think] [--values 0.05 0.2 0.4] [--seeds 0]
                                            [--set KEY=VALUE ...]

Each point runs the demo-rpt chain without its control (rptfast/configs/rpt-toy-base.toml and
rpt-toy.toml as they are, --key changed in the base): pre-train, prepare with the base as proxy,
eval, RPT, eval. It appends one row per point to bench/results/rpt_toy_sweep.csv (with
rptfast.provenance's columns) and prints a markdown table: the hard split's plain accuracy of the base, its reasoning
accuracy before and after RPT, the same for reducible and random positions over all splits, and the
completion length at reducible positions before and after. On this 2-core CPU a point takes about
8 minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rptfast.errors import run_script
from rptfast.provenance import PROVENANCE, append_rows, stamp

RESULTS = Path(__file__).parent / "results" / "rpt_toy_sweep.csv"
FIELDS = ["key", "value", "seed", "samples_hard", "base_plain_hard", "base_reasoning_hard", "rpt_reasoning_hard",
          "base_plain_reducible", "base_reasoning_reducible", "rpt_reasoning_reducible", "base_plain_random",
          "base_reasoning_random", "rpt_reasoning_random", "base_len_reducible", "rpt_len_reducible", "minutes",
          *PROVENANCE]


def append_row(path: Path, fields: list[str], row: dict) -> None:
    """One row appended to a results CSV (rptfast.provenance.append_rows), floats to 4 places."""
    append_rows(path, fields, [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}])


def rptfast(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "rptfast", *args], check=True, stdout=subprocess.DEVNULL)


def run_point(key: str, value: str, seed: int, out: Path, extra: list[str]) -> dict:
    t0 = time.time()
    sets = [a for s in extra for a in ("--set", s)]
    base, samples = out / "base", out / "samples"
    rptfast("toy", "corpus", "--out", str(out / "corpus.jsonl"), "--seed", str(seed))
    rptfast("train", "rpt-toy-base", "--set", f"{key}={value}", "--set", f"train.seed={seed}",
            "--set", f"train.out_dir={base}", "--set", "log.progress=false", *sets)
    rptfast("prepare", "--config", "rpt-toy", "--corpus", str(out / "corpus.jsonl"), "--proxy", str(base / "final"),
            "--out", str(samples), *sets)
    rptfast("eval", "--config", "rpt-toy", "--model", str(base / "final"), "--data", str(samples), *sets)
    rptfast("train", "rpt-toy", "--set", f"model.path={base / 'final'}", "--set", f"data.samples={samples}",
            "--set", f"train.seed={seed}", "--set", f"train.out_dir={out / 'rpt'}", "--set", "log.progress=false",
            *sets)
    rptfast("eval", "--config", "rpt-toy", "--model", str(out / "rpt/final"), "--data", str(samples), *sets)
    return measure(key, value, seed, out, (time.time() - t0) / 60)


def measure(key: str, value: str, seed: int, out: Path, minutes: float) -> dict:
    """The CSV row of a finished point: out holds base/, samples/ and rpt/ with their evaluations
    (the layout of make demo-rpt's runs/rpt-toy, so that run can be measured too)."""
    from rptfast.data.store import SampleStore
    from rptfast.tasks.toy import cells, sample_kinds

    before = json.loads((out / "base/final/eval-samples.json").read_text())
    after = json.loads((out / "rpt/final/eval-samples.json").read_text())
    kinds, entropy = sample_kinds(SampleStore(str(out / "samples")), before["per_sample"]["row"])
    plain, reason, rpt, len_before, len_after = (cells(r, kinds, entropy, mode) for r, mode in (
        (before, "plain"), (before, "random@1"), (after, "random@1"), (before, "response_len"),
        (after, "response_len")))
    row = {"key": key, "value": value, "seed": seed, "samples_hard": plain["hard", "all"][1]}
    for name, grid in (("base_plain", plain), ("base_reasoning", reason), ("rpt_reasoning", rpt)):
        row[f"{name}_hard"] = grid["hard", "all"][0]
        row[f"{name}_reducible"] = grid["easy", "reducible"][0]
        row[f"{name}_random"] = grid["easy", "random"][0]
    row.update(base_len_reducible=len_before["easy", "reducible"][0],
               rpt_len_reducible=len_after["easy", "reducible"][0])
    row.update(minutes=minutes, **stamp())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--key", default="data.toy_think", help="the base's setting to sweep")
    ap.add_argument("--values", nargs="+", default=["0.05", "0.2", "0.4"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", action="append", default=[], help="extra config overrides for every command")
    ap.add_argument("--out", type=Path, default=Path("runs/rpt-toy-sweep"))
    ap.add_argument("--csv", type=Path, default=RESULTS)
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        for value in args.values:
            out = args.out / f"{args.key}={value}-seed{seed}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            rows.append(run_point(args.key, value, seed, out, args.set))
            append_row(args.csv, FIELDS, rows[-1])
            print(json.dumps(rows[-1]), flush=True)
    print(f"| {args.key} | seed | hard: plain | hard: reasoning before | after RPT | reducible: plain | before | after "
          "| random: plain | before | after | reducible: tokens before | after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['value']} | {r['seed']} | " + " | ".join(f"{100 * r[k]:.1f}" for k in FIELDS[4:13]) + " | " +
              " | ".join(f"{r[k]:.1f}" for k in FIELDS[13:15]) + " |")


if __name__ == "__main__":
    sys.exit(run_script(main))
