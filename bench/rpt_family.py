"""The RPT family side by side on the same base and data: a next-token control, RPT, RLP (information-gain
reward) and RPT with a thought budget, the same steps and prompts each, over seeds (docs/rpt.md).

    .venv/bin/python bench/rpt_family.py [--seeds 0 1] [--steps 80] [--out runs/rpt-family]
                                         [--base runs/rpt-toy/base/final --data runs/rpt-toy/samples]
    make study                           # the same, with the defaults
    .venv/bin/python bench/rpt_family.py --no-train   # table and plots again from the runs in --out

The base and the samples are `make demo-rpt`'s (rptfast/configs/rpt-toy-base.toml, rpt-toy.toml); where
they are missing they are made the same way first (toy corpus, pre-training, prepare with the base as
proxy). Every method starts from the base with the same seed per repetition and runs --steps steps:
- ntp: next-token training on the toy corpus, as the demo's control (32 sequences a step);
- rpt: rpt-toy as it is (prefix reward, 32 prompts x 8 completions a step);
- rlp: the same with data.reward = "info_gain" (RLP: the thought's gain in log p of the true next token);
- rpt-budget: RPT with rollout.max_tokens decaying linearly from 16 to 11 (a worked answer's length) and a
  length term of 0.01 per token beyond 11.
Each final model is evaluated by `rptfast eval --config rpt-toy` on the same held-out samples. Rows go to
bench/results/rpt_family.csv (method, seed, accuracy by split and by kind of position, completion length,
seconds per step, commit, date); the markdown table (means over seeds ± half their range) is printed and
written to OUT/rpt_family.md, with two plots of the RL runs (training accuracy and completion length per
step, means over seeds). On the 2-core CPU one method and seed takes 2 to 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rpt_toy_sweep import append_row  # bench/ is the script's own directory, first on sys.path

from rptfast.errors import run_script
from rptfast.metrics import read_jsonl
from rptfast.provenance import PROVENANCE, stamp

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "rpt_family.csv"
METHODS = {
    "ntp": ["train", "rpt-toy-base", "--set", "train.ntp_steps={steps}", "--set", "data.toy_think_from=0",
            "--set", "train.ntp_lr=1e-4", "--set", "train.warmup_steps=0"],
    "rpt": ["train", "rpt-toy", "--set", "train.steps={steps}"],
    "rlp": ["train", "rpt-toy", "--set", "train.steps={steps}", "--set", "data.reward=info_gain"],
    "rpt-budget": ["train", "rpt-toy", "--set", "train.steps={steps}", "--set", "rollout.budget_schedule=linear",
                   "--set", "rollout.max_tokens_end=11", "--set", "algorithm.length_coef=0.01",
                   "--set", "algorithm.length_target=11"],
}
CELLS = [("easy", "all"), ("medium", "all"), ("hard", "all"), ("easy", "reducible"), ("easy", "random")]
FIELDS = ["method", "seed", "steps", *[f"{s}/{k}" for s, k in CELLS], "len_reducible", "len_random",
          "sec_per_step", *PROVENANCE]


def rptfast(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "rptfast", *args], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)


def ensure_base(base: Path, data: Path) -> None:
    """make demo-rpt's base and samples, unless they exist."""
    if not (base / "config.json").is_file():
        corpus = base.parent.parent / "corpus.jsonl"
        rptfast("toy", "corpus", "--out", str(corpus))
        rptfast("train", "rpt-toy-base", "--set", f"train.out_dir={base.parent}", "--set", "log.progress=false")
    if not (data / "manifest.json").is_file():
        rptfast("prepare", "--config", "rpt-toy", "--corpus", str(base.parent.parent / "corpus.jsonl"),
                "--proxy", str(base), "--out", str(data))
    if not (base / "eval-samples.json").is_file():
        rptfast("eval", "--config", "rpt-toy", "--model", str(base), "--data", str(data))


def run_method(method: str, seed: int, steps: int, base: Path, data: Path, out: Path, train: bool) -> dict:
    """Train one method from the base, evaluate it (or, without `train`, read the run already there); the CSV row."""
    run = out / f"{method}-seed{seed}"
    if train:
        subprocess.run(["rm", "-rf", str(run)], check=True)
        args = [a.format(steps=steps) for a in METHODS[method]]
        rptfast(*args, "--set", f"model.path={base}", "--set", f"data.samples={data}", "--set",
                f"train.seed={seed}", "--set", f"train.out_dir={run}", "--set", "log.progress=false",
                "--set", "train.eval_every=0")
        rptfast("eval", "--config", "rpt-toy", "--model", str(run / "final"), "--data", str(data))
    rows = read_jsonl(run)
    times = [r["time/step"] for r in rows if "time/step" in r]
    return measure(method, seed, steps, run / "final" / "eval-samples.json", data, statistics.mean(times))


def measure(method: str, seed: int | str, steps: int, evaluation: Path, data: Path, sec_per_step: float) -> dict:
    from rptfast.data.store import SampleStore
    from rptfast.tasks.toy import cells, sample_kinds

    result = json.loads(evaluation.read_text())
    kinds, entropy = sample_kinds(SampleStore(str(data)), result["per_sample"]["row"])
    mode = "plain" if method == "base, plain" else "random@1"
    acc, lengths = cells(result, kinds, entropy, mode), cells(result, kinds, entropy, "response_len")
    row = {"method": method, "seed": seed, "steps": steps, **{f"{s}/{k}": acc[s, k][0] for s, k in CELLS}}
    row.update(len_reducible=lengths["easy", "reducible"][0], len_random=lengths["easy", "random"][0],
               sec_per_step=sec_per_step, **stamp())
    return row


def curves(out: Path, methods: list[str], seeds: list[int]) -> None:
    """rpt_family_accuracy.png and rpt_family_length.png: each RL method's training accuracy (completions whose box
    matches the text) and completion length per step, means over seeds."""
    from rptfast.metrics import plot

    merged: dict[int, dict] = {}
    for method in (m for m in methods if m != "ntp"):
        runs = [[r for r in read_jsonl(out / f"{method}-seed{s}") if r.get("phase") == "rl"] for s in seeds]
        for step_rows in zip(*runs):
            row = merged.setdefault(step_rows[0]["step"], {"step": step_rows[0]["step"]})
            for key in ("accuracy", "response_len"):
                row[f"{method}/{key}"] = statistics.mean(r[key] for r in step_rows)
    rows = [merged[s] for s in sorted(merged)]
    rl = [m for m in methods if m != "ntp"]
    plot(rows, {m: f"{m}/accuracy" for m in rl}, out / "rpt_family_accuracy.png",
         "training accuracy (box matches the text)")
    plot(rows, {m: f"{m}/response_len" for m in rl}, out / "rpt_family_length.png",
         "completion tokens (5: at once, 11: worked)")


def table(rows: list[dict]) -> str:
    head = ("| method (seeds) | easy | medium | hard | reducible | random | tokens: reducible | random | s/step |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        mean = {k: statistics.mean(r[k] for r in mine) for k in FIELDS[3:-2]}
        spread = {k: (max(r[k] for r in mine) - min(r[k] for r in mine)) / 2 for k in FIELDS[3:-2]}
        acc = " | ".join(f"{100 * mean[f'{s}/{k}']:.1f} ± {100 * spread[f'{s}/{k}']:.1f}" for s, k in CELLS)
        lines.append(f"| {method} ({len(mine)}) | {acc} | {mean['len_reducible']:.1f} | {mean['len_random']:.1f} | "
                     f"{mean['sec_per_step']:.2f} |")
    lines.append("")
    lines.append("Accuracy in %: mean over seeds ± half the range. Splits are the base's entropy at the position "
                 "(nested); reducible and random are over all positions (easy split = every kept position).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--base", type=Path, default=ROOT / "runs/rpt-toy/base/final")
    ap.add_argument("--data", type=Path, default=ROOT / "runs/rpt-toy/samples")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/rpt-family")
    ap.add_argument("--csv", type=Path, default=RESULTS)
    ap.add_argument("--no-train", action="store_true", help="measure the runs already in --out; no CSV rows")
    args = ap.parse_args()
    ensure_base(args.base, args.data)
    base_eval = args.base / "eval-samples.json"
    rows = [measure("base, plain", "-", 0, base_eval, args.data, 0.0),
            measure("base, reasoning", "-", 0, base_eval, args.data, 0.0)]
    for seed in args.seeds:
        for method in args.methods:
            t0 = time.time()
            rows.append(run_method(method, seed, args.steps, args.base, args.data, args.out, not args.no_train))
            if args.no_train:
                continue
            append_row(args.csv, FIELDS, rows[-1])
            print(f"{method} seed {seed}: {time.time() - t0:.0f} s, hard {100 * rows[-1]['hard/all']:.1f}%",
                  flush=True)
    text = table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rpt_family.md").write_text(text + "\n")
    curves(args.out, args.methods, args.seeds)
    print(text)


if __name__ == "__main__":
    sys.exit(run_script(main))
