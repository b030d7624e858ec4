"""The parity sweep behind docs/parity.md: p_cot x d, next-token pre-training then RL.

    .venv/bin/python bench/parity_sweep.py [--d 12 16] [--p-cot 0.05 0.1 0.25 0.5] [--seeds 0]

Each point is one `rptfast train parity` run with the embedded default's schedule (only d,
p_cot and the seed change). It appends one row per run to bench/results/parity_sweep.csv
(with rptfast.provenance's columns) and prints a markdown table: greedy accuracy and share of long
answers after next-token training alone, then after RL. On this 2-core CPU a point takes
about 3 to 4 minutes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rptfast.metrics import read_jsonl
from rptfast.provenance import PROVENANCE, append_rows, stamp

RESULTS = Path(__file__).parent / "results" / "parity_sweep.csv"
FIELDS = ["d", "p_cot", "seed", "ntp_greedy_acc", "ntp_greedy_long", "ntp_sampled_long", "ntp_sampled_long_acc",
          "rl_greedy_acc", "rl_greedy_long", "rl_greedy_len", "rl_sampled_acc", "minutes", *PROVENANCE]


def run_point(d: int, p_cot: float, seed: int, out: Path, extra: list[str]) -> dict:
    sets = [f"data.parity_d={d}", f"data.parity_p_cot={p_cot}", f"train.seed={seed}", f"train.out_dir={out}",
            f"rollout.max_tokens={d + 4}", "log.progress=false", *extra]
    t0 = time.time()
    cmd = [sys.executable, "-m", "rptfast", "train", "parity"] + [a for s in sets for a in ("--set", s)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [r for r in read_jsonl(out) if "eval/greedy_acc" in r]
    ntp_steps = max(r["step"] for r in rows if r.get("phase") in ("init", "ntp"))
    ntp = next(r for r in rows if r["step"] == ntp_steps)
    rl = rows[-1]
    return {"d": d, "p_cot": p_cot, "seed": seed,
            "ntp_greedy_acc": ntp["eval/greedy_acc"], "ntp_greedy_long": ntp["eval/greedy_long_frac"],
            "ntp_sampled_long": ntp["eval/sampled_long_frac"], "ntp_sampled_long_acc": ntp["eval/sampled_long_acc"],
            "rl_greedy_acc": rl["eval/greedy_acc"], "rl_greedy_long": rl["eval/greedy_long_frac"],
            "rl_greedy_len": rl["eval/greedy_len"], "rl_sampled_acc": rl["eval/sampled_acc"],
            "minutes": (time.time() - t0) / 60, **stamp()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, nargs="+", default=[12, 16])
    ap.add_argument("--p-cot", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", action="append", default=[], help="extra config overrides for every point")
    ap.add_argument("--csv", type=Path, default=RESULTS)
    args = ap.parse_args()
    print("| d | p_cot | seed | NTP greedy acc | NTP greedy long | NTP sampled long | RL greedy acc | "
          "RL greedy long | RL greedy len | min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for d in args.d:
            for p in args.p_cot:
                for seed in args.seeds:
                    row = run_point(d, p, seed, Path(tmp) / f"d{d}-p{p}-s{seed}", args.set)
                    append_rows(args.csv, FIELDS, [{k: round(v, 4) if isinstance(v, float) else v
                                                    for k, v in row.items()}])
                    print(f"| {d} | {p} | {seed} | {row['ntp_greedy_acc']:.3f} | {row['ntp_greedy_long']:.2f} | "
                          f"{row['ntp_sampled_long']:.2f} | {row['rl_greedy_acc']:.3f} | {row['rl_greedy_long']:.2f} | "
                          f"{row['rl_greedy_len']:.1f} | {row['minutes']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
