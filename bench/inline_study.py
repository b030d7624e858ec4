"""RPT and RLP on a pretrained model with thoughts inline in the raw text: the study of docs/rpt.md ("Inline").

    .venv/bin/python bench/inline_study.py [--seeds 0 1] [--steps 100] [--budgets 16 64] [--out runs/inline]
                                           [--model runs/real/smollm2 --data runs/real/samples]
    make study-real                        # the same, with the defaults
    .venv/bin/python bench/inline_study.py --no-train   # table and plots again from the runs in --out

Arms, each from the same SmolLM2-135M and samples as `make demo-real` (made first where missing), each model
evaluated by `rptfast eval` on every held-out sample (256) in fp32, the four inline modes (plain, after an empty
thought, after the true token in the thought, after its own sampled thoughts at the arm's budget, k = 4):
- base: the model as converted;
- warm: the transparent-thought warm-up (rptfast/configs/rpt-smollm2-135m.toml: train.ntp_steps of data.rpt_ntp =
  "thoughts"), once; every other arm starts from it;
- rlp: RLP inline (data.reward = "info_gain"), --steps RL steps, per seed and thought budget;
- rpt: RPT inline (the prefix reward on the continuation after the close), per seed and budget;
- ntp: the next-token control of the same tokens: the RL prompts' contexts and true next tokens (data.rpt_ntp =
  "text"), as many sequences a step as RL has prompts, as many steps, the RL learning rate; per seed.
Rows go to bench/results/inline_study.csv (arm, seed, budget, accuracy and log p per mode and split, the RL run's
information gain and reward over its first and last ten steps, seconds per step, provenance); the markdown table
(means over seeds; standard errors over the samples of the seed-averaged per-sample values) is printed and written
to OUT/inline_study.md, with the information-gain and reward curves (means over seeds) as PNGs in OUT.

Several processes share the work (`make study-real` runs one per core; `--inputs` first, once, makes the model and
samples): each item (an evaluation, the warm-up, an arm's run) is claimed by the first process to reach it
(OUT/*.claim), the others go on to the next, and every process waits for the warm-up. Items come in the order b16
for every seed (rlp, rpt, ntp), then b64. vLLM's CPU backend takes every core it is allowed: pin each process to its
own core (taskset -c N), as two unpinned processes slow each other 10-30x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rpt_toy_sweep import append_row  # bench/ is the script's own directory, first on sys.path

from rptfast.data.store import SampleStore, split_masks
from rptfast.metrics import plot, read_jsonl
from rptfast.provenance import PROVENANCE, stamp

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "inline_study.csv"
PRESET = "rpt-smollm2-135m"
MODES = ("plain", "empty", "oracle", "reasoning")
SPLITS = ("all", "easy", "medium", "hard")
FIELDS = ["arm", "seed", "budget", "steps", *[f"{m}/{s}/{k}" for m in MODES for s in SPLITS for k in ("acc", "logp")],
          "info_gain_first", "info_gain_last", "reward_first", "reward_last", "sec_per_step", *PROVENANCE]


def rptfast(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "rptfast", *args], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)


def claim(target: Path, lock: Path) -> bool:
    """True for the one process of the study that makes `target` (`lock` created exclusively); False if `target`
    exists or another process claimed it first. A process killed mid-item leaves its claim: delete OUT/*.claim to
    make that item again."""
    if target.exists():
        return False
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def wait_for(target: Path) -> None:
    while not target.exists():
        time.sleep(10)


def evaluate(model: Path, data: Path, out: Path, budget: int) -> None:
    """The four inline modes, every held-out sample, fp32, the arm's thought budget."""
    rptfast("eval", "--config", PRESET, "--model", str(model), "--data", str(data), "--out", str(out),
                "--set", "model.dtype=float32", "--set", "eval.samples=0", "--set", "eval.k=4",
                "--set", f"rollout.max_tokens={budget}", "--set", "log.progress=false")


def ensure_inputs(model: Path, data: Path) -> None:
    """make demo-real's model and samples, unless they exist."""
    if not (model / "config.json").is_file():
        rptfast("convert", "gguf", "smollm2", "--out", str(model))
    if not (data / "manifest.json").is_file():
        corpus = data.parent / "pydoc.jsonl"
        rptfast("corpus", "pydoc", "--out", str(corpus), "--max-chars", "2000")
        rptfast("prepare", "--config", PRESET, "--corpus", str(corpus), "--proxy", str(model), "--out", str(data))


def train(run: Path, *sets: str) -> None:
    """One rptfast train of the preset into `run` (fresh), with --set overrides."""
    subprocess.run(["rm", "-rf", str(run)], check=True)
    rptfast("train", PRESET, *[a for s in sets for a in ("--set", s)], "--set", f"train.out_dir={run}",
            "--set", "log.progress=false")


def arm_runs(arm: str, seed: int, budget: int, steps: int, warm: Path, data: Path) -> list[str]:
    """The --set overrides of an arm's training run from the warm-up."""
    common = [f"model.path={warm}", f"data.samples={data}", f"train.seed={seed}", "train.ntp_steps=0",
              f"train.steps={steps}", f"rollout.max_tokens={budget}"]
    if arm == "rlp":
        return [*common, "data.reward=info_gain"]
    if arm == "rpt":
        return [*common, "data.reward=prefix"]
    from rptfast import config

    cfg = config.load(PRESET)  # the control: RL's prompts per step as sequences, RL's steps and learning rate
    return [f"model.path={warm}", f"data.samples={data}", f"train.seed={seed}", "train.steps=0",
            f"train.ntp_steps={steps}", f"train.ntp_sequences={cfg.train.prompts_per_step}",
            f"train.ntp_lr={cfg.train.lr}", "data.rpt_ntp=text"]


def row_of(arm: str, seed, budget: int, steps: int, evaluation: Path, run: Path | None) -> dict:
    result = json.loads(evaluation.read_text())
    row = {"arm": arm, "seed": seed, "budget": budget, "steps": steps}
    for mode in MODES:
        for split in SPLITS:
            cell = result["inline"][mode][split]
            row[f"{mode}/{split}/acc"], row[f"{mode}/{split}/logp"] = cell["accuracy"], cell["logp"]
    rl = [r for r in read_jsonl(run) if r.get("phase") in ("rl", "ntp")] if run else []
    for key in ("info_gain", "reward"):
        values = [r[key] for r in rl if key in r]
        row[f"{key}_first"] = statistics.mean(values[:10]) if values else ""
        row[f"{key}_last"] = statistics.mean(values[-10:]) if values else ""
    times = [r["time/step"] for r in rl if "time/step" in r]
    row.update(sec_per_step=statistics.mean(times) if times else "", **stamp())
    return row


def se(v: np.ndarray) -> float:
    return float(v.std(ddof=1) / np.sqrt(len(v)))


def seed_mean(paths: list[Path], key: str) -> np.ndarray:
    """[samples]: a per-sample value of the eval JSONs, averaged over seeds."""
    return np.mean([json.loads(p.read_text())["per_sample"][key] for p in paths], axis=0)


def table(evals: dict[tuple[str, int], list[Path]], data: Path) -> str:
    """Two tables. Per arm and budget: accuracy (%) and mean log p of the true token per mode, on all and hard,
    means over seeds with standard errors over the samples of the seed-averaged per-sample values. Then each RL
    arm against the warm-up it started from, paired by sample (the same 256 positions): the mean difference of
    accuracy (points) and of log p per mode, with the standard error of the paired differences, which is what
    tells a change from the spread between positions."""
    store = SampleStore(str(data))
    head = ("| arm (seeds) | budget | " + " | ".join(f"{m}: all | hard | log p" for m in MODES) + " |\n|---|---|" +
            "---|---|---|" * len(MODES))
    lines = [head]
    for (arm, budget), paths in evals.items():
        rows = np.array(json.loads(paths[0].read_text())["per_sample"]["row"])
        hard = split_masks(store.entropy[rows])["hard"]
        cells = []
        for mode in MODES:
            acc, logp = seed_mean(paths, mode), seed_mean(paths, f"{mode}_logp")
            cells.append(f"{100 * acc.mean():.1f} ± {100 * se(acc):.1f} | {100 * acc[hard].mean():.1f} ± "
                         f"{100 * se(acc[hard]):.1f} | {logp.mean():.2f} ± {se(logp):.2f}")
        lines.append(f"| {arm} ({len(paths)}) | {budget} | " + " | ".join(cells) + " |")
    lines += ["", "| against the warm-up, paired (seeds) | budget | " +
              " | ".join(f"{m}: points | log p" for m in MODES) + " |\n|---|---|" + "---|---|" * len(MODES)]
    for (arm, budget), paths in evals.items():
        if arm in ("base", "warm") or ("warm", budget) not in evals:
            continue
        warm = evals["warm", budget]
        cells = []
        for mode in MODES:
            acc = seed_mean(paths, mode) - seed_mean(warm, mode)
            logp = seed_mean(paths, f"{mode}_logp") - seed_mean(warm, f"{mode}_logp")
            cells.append(f"{100 * acc.mean():+.1f} ± {100 * se(acc):.1f} | {logp.mean():+.3f} ± {se(logp):.3f}")
        lines.append(f"| {arm} ({len(paths)}) | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves(out: Path, runs: dict[str, list[Path]]) -> None:
    """inline_info_gain.png (RLP arms) and inline_reward.png (RPT arms): per step, means over seeds."""
    merged: dict[int, dict] = {}
    for label, paths in runs.items():
        per_seed = [[r for r in read_jsonl(p) if r.get("phase") == "rl"] for p in paths]
        for step_rows in zip(*per_seed):
            row = merged.setdefault(step_rows[0]["step"], {"step": step_rows[0]["step"]})
            for key in ("info_gain", "reward"):
                if key in step_rows[0]:
                    row[f"{label}/{key}"] = statistics.mean(r[key] for r in step_rows)
    rows = [merged[s] for s in sorted(merged)]
    plot(rows, {k: f"{k}/info_gain" for k in runs if k.startswith("rlp")}, out / "inline_info_gain.png",
         "information gain (nats), RLP")
    plot(rows, {k: f"{k}/reward" for k in runs if k.startswith("rpt")}, out / "inline_reward.png",
         "training reward (prefix match after the close), RPT")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--arms", nargs="+", default=["rlp", "rpt", "ntp"], choices=["rlp", "rpt", "ntp"])
    ap.add_argument("--model", type=Path, default=ROOT / "runs/real/smollm2")
    ap.add_argument("--data", type=Path, default=ROOT / "runs/real/samples")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/inline")
    ap.add_argument("--csv", type=Path, default=RESULTS)
    ap.add_argument("--no-train", action="store_true", help="table and plots from the runs already in --out")
    ap.add_argument("--inputs", action="store_true", help="make the model and samples where missing, then stop (run "
                    "it once before starting several processes)")
    args = ap.parse_args()
    out, data = args.out, args.data
    out.mkdir(parents=True, exist_ok=True)
    evals: dict[tuple[str, int], list[Path]] = {}
    runs: dict[str, list[Path]] = {}
    ensure_inputs(args.model, data)
    if args.inputs:
        return
    warm = out / "warm"

    def evaluate_once(name: str, model: Path, budget: int, run: Path | None) -> Path:
        path = out / f"eval-{name}-b{budget}.json"
        if not args.no_train and claim(path, path.with_suffix(".claim")):
            evaluate(model, data, path, budget)
            append_row(args.csv, FIELDS, row_of(name, "-", budget, 0, path, run))
        return path

    for budget in args.budgets:
        evals["base", budget] = [evaluate_once("base", args.model, budget, None)]
    if not args.no_train:
        if claim(warm / "final" / "config.json", out / "warm.claim"):
            train(warm, f"model.path={args.model}", f"data.samples={data}", "train.steps=0")
        wait_for(warm / "final" / "config.json")
    for budget in args.budgets:
        evals["warm", budget] = [evaluate_once("warm", warm / "final", budget, warm)]
    # b16 for every seed first, then b64: the cheapest complete comparison is done first
    for budget in args.budgets:
        for seed in args.seeds:
            for arm in args.arms if budget == args.budgets[0] else [a for a in args.arms if a != "ntp"]:
                run = out / f"{arm}-b{budget}-seed{seed}"
                path = out / f"eval-{arm}-b{budget}-seed{seed}.json"
                if not args.no_train and claim(path, path.with_suffix(".claim")):
                    t0 = time.time()
                    train(run, *arm_runs(arm, seed, budget, args.steps, warm / "final", data))
                    evaluate(run / "final", data, path, budget)
                    append_row(args.csv, FIELDS, row_of(arm, seed, budget, args.steps, path, run))
                    print(f"{arm} budget {budget} seed {seed}: {time.time() - t0:.0f} s", flush=True)
                if path.exists():  # made here or by another process of the study
                    evals.setdefault((arm, budget), []).append(path)
                    if arm != "ntp":
                        runs.setdefault(f"{arm}-b{budget}", []).append(run)
    evals = {k: [p for p in v if p.exists()] for k, v in evals.items()}
    evals = {k: v for k, v in evals.items() if v}
    text = table(evals, data)
    (out / "inline_study.md").write_text(text + "\n")
    curves(out, runs)
    print(text)


if __name__ == "__main__":
    main()
