"""RLP's scoring pass with each prompt once (prompt-once rows) against each prompt per thought, on SmolLM2-135M.

    .venv/bin/python bench/info_gain_scoring.py [--model runs/real/smollm2 --data runs/real/samples] [--steps 3]
                                          [--formats think inline]

The information-gain reward scores the true next token after every thought of a group; the G thoughts share
their prompt, so with train.share_prompts the scoring forward holds each prompt once (and the G thoughts after
it), as the update does. Each setting runs `rptfast train rpt-smollm2-135m` for --steps RL steps from the base
model (no warm-up: the scoring's cost does not depend on it) with 16-token thoughts, 8 prompts x 8 thoughts:
- "think": the chat format the earlier RLP run on this model used (docs/rpt.md, "On a real model": 22 s of a
  45 s step were scoring), fp32, max_prompt_tokens 192;
- "inline": the inline recipe of the preset (raw context, 100-token prompts, bf16 compute).
each with share_prompts true and false. A row per run and step goes to bench/results/info_gain_scoring.csv:
seconds of the scoring (time/reward: the rollout's own reward is a string compare, milliseconds), of the step,
and the tokens the update trained; the last line is JSON with the ratio unshared / shared per format.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from rptfast.errors import run_script
from rptfast.metrics import read_jsonl
from rptfast.provenance import PROVENANCE, append_rows, stamp

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "info_gain_scoring.csv"
FIELDS = ["format", "share_prompts", "step", "scoring_s", "step_s", "trained_tokens", *PROVENANCE]
FORMATS = {
    "think": ["data.template=think", "data.max_prompt_tokens=192", "model.dtype=float32", "rollout.temperature=0.8"],
    "inline": [],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "runs/real/smollm2"))
    ap.add_argument("--data", default=str(ROOT / "runs/real/samples"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/info-gain-scoring")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    args = ap.parse_args()
    summary = {}
    for name in args.formats:
        sets = FORMATS[name]
        mean = {}
        for share in (True, False):
            run = args.out / f"{name}-{'shared' if share else 'unshared'}"
            subprocess.run(["rm", "-rf", str(run)], check=True)
            overrides = [f"model.path={args.model}", f"data.samples={args.data}", "data.reward=info_gain",
                         "train.ntp_steps=0", f"train.steps={args.steps}", "rollout.max_tokens=16",
                         "train.eval_every=0", "train.eval_prompts=8", "log.progress=false",
                         f"train.share_prompts={str(share).lower()}", f"train.out_dir={run}", *sets]
            subprocess.run([sys.executable, "-m", "rptfast", "train", "rpt-smollm2-135m",
                            *[a for s in overrides for a in ("--set", s)]], check=True, stdout=subprocess.DEVNULL,
                           cwd=ROOT)
            rows = [r for r in read_jsonl(run) if r.get("phase") == "rl"]
            append_rows(RESULTS, FIELDS, [{"format": name, "share_prompts": share, "step": r["step"],
                                           "scoring_s": round(r["time/reward"], 3), "step_s": round(r["time/step"], 3),
                                           "trained_tokens": r["trained_tokens"], **stamp()} for r in rows])
            mean[share] = statistics.mean(r["time/reward"] for r in rows[1:] or rows)  # the first step warms up
            print(f"{name} share_prompts={share}: scoring {mean[share]:.2f} s a step", flush=True)
        summary[name] = {"scoring_shared_s": round(mean[True], 2), "scoring_unshared_s": round(mean[False], 2),
                         "ratio": round(mean[False] / mean[True], 2)}
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(run_script(main))
