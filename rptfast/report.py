"""One table from several `rptfast eval` results on the same samples (`rptfast table`, `make demo-real`).

Each named evaluation gives a row per mode it ran: plain next-token prediction (greedy, on the raw
context), for the inline template the true token after an empty thought, with it written in the thought and
after the model's own thoughts (greedy after the close, with the mean log p of the true token), and
next-token reasoning (Random@1 over its k completions, with the template and thought budget it ran with),
by the entropy splits of the store (all, easy, medium, hard, nested), with the reasoning rows' share of
completions that answer (a box after `</think>`, or inline a closed thought) and their mean length. The
rows keep the order given. With an RL run's directory, its training reward and held-out accuracy
per step are plotted next to the table. Left out: significance. At 64 positions one position is
1.6 points; the table prints the counts so that the reader can judge.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rptfast.data.store import SampleStore, split_masks, write_json
from rptfast.errors import ConfigError, PathError

SPLITS = ("all", "easy", "medium", "hard")


INLINE = {"empty": "after an empty thought", "oracle": "the true token in the thought",
          "reasoning": "after its own thoughts"}  # the inline template's modes (rptfast.eval), greedy after the close


def rows_of(name: str, result: dict) -> list[tuple[str, str, dict]]:
    """(label, mode, result) for each mode the evaluation ran."""
    out = []
    if result["per_sample"]["plain"] is not None:
        out.append((f"{name}: next-token prediction (greedy)", "plain", result))
    for mode, what in INLINE.items():
        if result["per_sample"].get(mode) is not None:
            budget = f", {result['max_tokens']} tokens, k={result['k']}" if mode == "reasoning" else ""
            out.append((f"{name}: inline, {what} (greedy{budget})", mode, result))
    if result["per_sample"]["random@1"] is not None:
        out.append((f"{name}: reasoning, {result['template']!r}, {result['max_tokens']} tokens, k={result['k']}",
                    "random@1", result))
    return out


def compare(evals: list[tuple[str, Path]], data: str, out_dir: Path, run: Path | None = None) -> str:
    """The table of `evals` ((name, eval JSON), in order; a name may repeat, e.g. one model under two templates)
    on store `data`; writes table.txt/.json (and the run's curves) into out_dir and returns the text."""
    results = []
    for name, path in evals:
        if not Path(path).is_file():
            raise PathError(f"--eval {name}={str(path)!r}: no evaluation there; run rptfast eval on that model first")
        results.append((name, json.loads(Path(path).read_text())))
    drawn = {tuple(r["per_sample"]["row"]) for _, r in results}
    if len(drawn) != 1:
        raise ConfigError("the evaluations were made on different samples (eval.samples, eval.split or train.seed "
                          "differ); evaluate every model with the same config")
    rows = np.array(next(iter(drawn)))
    masks = {"all": np.ones(len(rows), dtype=bool), **split_masks(SampleStore(data).entropy[rows])}
    table = []
    for name, result in results:
        for label, mode, r in rows_of(name, result):
            values = np.asarray(r["per_sample"][mode], dtype=float)
            cells = {s: float(values[masks[s]].mean()) if masks[s].any() else float("nan") for s in SPLITS}
            reasoning = mode == "random@1"
            logp = r["per_sample"].get(f"{mode}_logp")
            table.append({"label": label, "model": r["model"], "mode": mode, "accuracy": cells,
                          "logp": float(np.mean(logp)) if logp is not None else None,
                          "answered": float(np.mean(r["per_sample"]["answered"])) if reasoning else None,
                          "tokens": float(np.mean(r["per_sample"]["response_len"])) if reasoning else None})
    width = max(len(t["label"]) for t in table)
    head = (f"{'accuracy (%)':<{width}} " + " ".join(f"{s:>7}" for s in SPLITS) + f" {'log p':>7} {'answer %':>8} "
            f"{'tokens':>7}")
    lines = [head, "-" * len(head)]
    for t in table:
        extra = f" {t['logp']:7.2f}" if t["logp"] is not None else f" {'':7}"
        extra += "" if t["answered"] is None else f" {100 * t['answered']:8.1f} {t['tokens']:7.1f}"
        lines.append(f"{t['label']:<{width}} " + " ".join(f"{100 * t['accuracy'][s]:7.2f}" for s in SPLITS) + extra)
    lines.append(f"{'positions':<{width}} " + " ".join(f"{int(masks[s].sum()):7d}" for s in SPLITS))
    lines.append(f"held-out positions of {data}; splits by the proxy's top-16 entropy at the position (easy > 0.5, "
                 f"medium > 1.0, hard > 1.5 nats, nested); log p: mean log-probability of the true next token (all "
                 f"positions); answer: completions with an answer (a box after </think>, or inline a closed thought)")
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.txt").write_text(text + "\n")
    write_json(out_dir / "table.json", {"rows": table, "positions": {s: int(masks[s].sum()) for s in SPLITS},
                                        "evals": [[n, str(p)] for n, p in evals], "data": str(data)})
    if run is not None:
        curves(run, out_dir)
    return text


def curves(run_dir: Path, out_dir: Path, prefix: str = "") -> None:
    """Training reward and held-out Random@1 by split against step, from an RL run's metrics.jsonl:
    <prefix>reward.png and <prefix>accuracy.png."""
    from rptfast.metrics import plot, read_jsonl

    if not (Path(run_dir) / "metrics.jsonl").is_file():
        raise PathError(f"--run {str(run_dir)!r}: no metrics.jsonl there; give the directory of an rptfast train run")
    rows = read_jsonl(run_dir)
    plot(rows, {"train reward": "reward", "held-out Random@1 (all)": "eval/random@1"}, out_dir / f"{prefix}reward.png",
         "reward / accuracy")
    plot(rows, {s: f"eval/random@1/{s}" for s in ("easy", "medium", "hard")}, out_dir / f"{prefix}accuracy.png",
         "held-out reasoning accuracy (Random@1)")
