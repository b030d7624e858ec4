"""Runs of one recipe side by side (full fine-tuning against LoRA): step time by phase, memory, the sync, reward.

    python bench/lora_runs.py --run full=runs/full --run lora=runs/lora [--plot docs/lora_smollm2_reward.png]

Reads each run's metrics.jsonl (rptfast train): the RL steps' mean time per step and per phase (the first
step left out: it carries the engine's first generation and other one-time costs), the bytes each
sync sent, the peak resident memory (the process's high-water mark, start-up included) and the resident
memory after the last step (`rss_gb`, CPU), the reward per step and the evaluations. Prints a table and the
rewards, draws the training reward of every run on one plot; the last line is JSON.
"""

import argparse
import json
import sys
from pathlib import Path

from rptfast.metrics import plot, read_jsonl

PHASES = ("generate", "update", "sync")


def summary(rows: list[dict]) -> dict:
    steps = [r for r in rows if r.get("phase") == "rl"]
    timed = steps[1:] or steps  # the first step carries one-time costs (the engine's first generation, warm-ups)
    mean = lambda key: sum(r.get(key, 0.0) or 0.0 for r in timed) / len(timed)  # noqa: E731
    evals = {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in rows
             if any(k.startswith("eval/") for k in r)}
    return {"steps": len(steps), "step_s": mean("time/step"), **{f"{p}_s": mean(f"time/{p}") for p in PHASES},
            "sync_mb": mean("sync_mb"), "peak_gb": max((r.get("peak_mem_gb", 0.0) for r in steps), default=0.0),
            "rss_gb": steps[-1].get("rss_gb") if steps else None, "reward": [r.get("reward") for r in steps],
            "mismatch_max": max((r.get("mismatch_max", 0.0) for r in steps), default=0.0), "evals": evals}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR (repeat)")
    parser.add_argument("--plot", type=Path, help="PNG of the training reward of every run")
    args = parser.parse_args(argv)
    runs = {}
    for item in args.run:
        label, sep, path = item.partition("=")
        if not sep or not (Path(path) / "metrics.jsonl").is_file():
            sys.exit(f"--run {item!r}: give LABEL=DIR, DIR a run directory with metrics.jsonl")
        runs[label] = read_jsonl(Path(path))
    out = {label: summary(rows) for label, rows in runs.items()}
    header = ["run", "steps", "step s", *(f"{p} s" for p in PHASES), "sync MB", "peak GiB", "RSS GiB", "mismatch"]
    table = [header]
    for label, s in out.items():
        table.append([label, str(s["steps"]), f"{s['step_s']:.1f}", *(f"{s[p + '_s']:.2f}" for p in PHASES),
                      f"{s['sync_mb']:.1f}", f"{s['peak_gb']:.2f}", f"{s['rss_gb'] or 0:.2f}",
                      f"{s['mismatch_max']:.1e}"])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for label, s in out.items():
        print(f"{label} reward: {' '.join(f'{r:.3f}' for r in s['reward'] if r is not None)}")
        for step, ev in s["evals"].items():
            print(f"{label} eval at step {step}: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in sorted(ev.items())
                                                              if isinstance(v, (int, float))))
    if args.plot:
        merged = [{"step": r["step"], f"reward/{label}": r["reward"]} for label, rows in runs.items() for r in rows
                  if r.get("phase") == "rl" and r.get("reward") is not None]
        plot(merged, {label: f"reward/{label}" for label in runs}, args.plot, "training reward (mean per step)")
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
