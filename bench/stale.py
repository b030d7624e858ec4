"""Which result rows still describe the code at HEAD: `python bench/gpu.py --check-stale [--markdown]`.

Rows are grouped by (file, commit, group): a kernel in kernels.csv, a check of a bench/gpu.py part in gpu.csv, a
config in throughput.csv, a file of its own for the files provenance.csv lists (results that are not CSV rows).
Each group measures the source files MEASURES names, and its status is one of:
- current: those files are the same at HEAD as at the rows' commit (git diff, by content), and the tree the rows
  were measured on was clean in them (a dirty flag of "unknown", from before it was recorded, is shown, not held
  against the rows);
- stale: one of them differs at HEAD (the first commit after the rows' that changed one is named);
- dirty: they are unchanged, but the rows were measured with uncommitted changes to them (no commit holds that code);
- unknown: the rows record no commit (kept, with a note saying what is known).

The check fails (exit 1) when a row names a commit this repository does not have, when a file in bench/results/
has no provenance (neither a commit column nor an entry in provenance.csv), or when README.md or a doc in docs/
quotes rows through a tag `(rows: FILE @ COMMIT[, GROUP]: STATUS)` whose rows do not exist or whose STATUS is not
the group's status now (for several groups, the worst: current < dirty < stale < unknown), or names (anywhere) a
commit this repository does not have. Stale rows are not an
error: they are history, kept and labelled; a doc may quote them as long as its tag says "stale". So a commit that
changes measured code makes the check fail until the docs that quote its rows as current are relabelled (or the
figures re-measured), which is the point.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATUS_ORDER = ["current", "dirty", "stale", "unknown"]
TAG = re.compile(r"\(rows:\s+([\w.\-]+)\s+@\s+(\w+)(?:,\s+([^:()]+?))?:\s+(current|stale|dirty|unknown)\)")
HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")  # a commit named in prose

KERNEL_COMMON = ["kernels/_utils.py", "kernels/reference.py"]  # every kernel row; reference.py: the eager baseline
KERNELS = {
    "selective_logprob": ["kernels/logprob.py"],
    "fused_policy_loss_from_logits": ["kernels/loss.py", "kernels/logprob.py"],
    "policy_loss": ["kernels/loss.py"],
    "linear_logprob": ["kernels/lm_head.py", "kernels/logprob.py"],
    "linear_policy_loss": ["kernels/linear_loss.py", "kernels/lm_head.py", "kernels/loss.py", "kernels/logprob.py"],
    "group_advantages": ["kernels/advantages.py"],
    "topk_entropy": ["kernels/topk.py"],
}
# the RL step as `rptfast bench throughput` runs it: the trainer, the engines, the tasks, the config and its defaults
TRAINER = ["rptfast/model", "rptfast/train", "rptfast/rollout", "rptfast/tasks", "rptfast/data", "rptfast/reward.py",
           "rptfast/distributed.py", "rptfast/config.py", "rptfast/configs", "rptfast/throughput.py", "kernels"]
ATTENTION = ["rptfast/model/attention.py", "rptfast/model/packing.py", "rptfast/model/policy.py",
             "rptfast/model/load.py"]
SHARED = [*ATTENTION, "rptfast/model/shared_prompt.py", "rptfast/model/flash_shared.py"]
GPU_CHECKS = {  # bench/gpu.py: (part, check) -> files; a part's other checks fall back to its entry under None
    ("paths", "attention"): ATTENTION,
    ("paths", "shared_prompts"): SHARED,
    ("paths", "sleep_wake"): ["rptfast/rollout/torch_engine.py", "rptfast/rollout/__init__.py"],
    ("paths", "mixed_precision"): ["rptfast/model", "rptfast/distributed.py", "kernels"],
    ("paths", "engine_mismatch"): ["rptfast/model", "rptfast/rollout", "rptfast/distributed.py", "kernels"],
    ("paths", "offload"): ["rptfast/train", "rptfast/model", "rptfast/distributed.py"],
    ("owed", "kernel_tests"): ["kernels", "tests/kernels"],
    ("owed", "liger"): KERNELS["linear_policy_loss"] + KERNEL_COMMON,
    ("owed", "shared_prompts"): SHARED,
    ("owed", "trainer"): TRAINER,
    ("kernels", None): ["kernels", "tests/kernels"],
    ("train", None): TRAINER,
}


def group_of(file: str, row: dict) -> str:
    """The rows' group within a results file (README and docs name it in their tags)."""
    if file == "kernels.csv":
        return row["kernel"]
    if file == "gpu.csv":
        return f"{row['part']}/{row['figure'].split('.')[0]}"
    if file == "throughput.csv":
        return row["config"]
    if file == "shared_attention.csv":
        return "model" if row["variant"].startswith("model") else "attention"
    return ""


def measures(file: str, group: str) -> list[str]:
    """The source files (or folders) a group of rows measures."""
    if file == "kernels.csv":
        return KERNELS.get(group, ["kernels"]) + KERNEL_COMMON
    if file == "gpu.csv":
        part, check = group.split("/", 1)
        return GPU_CHECKS.get((part, check)) or GPU_CHECKS.get((part, None)) or ["rptfast", "kernels"]
    if file == "throughput.csv":
        return [*TRAINER, "rptfast/trl_peer.py", f"bench/{group}.toml"]
    if file == "shared_attention.csv":
        return ["rptfast/model"] if group == "model" else [*SHARED, "bench/shared_attention.py"]
    # studies: what a training run learns depends on the whole package
    return ["rptfast", "kernels", f"bench/{Path(file).stem}.py"]


@dataclass
class Group:
    file: str
    commit: str
    group: str
    paths: list[str]
    rows: int = 0
    dates: set[str] = field(default_factory=set)
    devices: set[str] = field(default_factory=set)
    dirty: set[str] = field(default_factory=set)
    versions: set[str] = field(default_factory=set)
    status: str = ""
    why: str = ""


def git(root: Path, *args: str) -> str | None:
    r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def load(root: Path) -> tuple[list[Group], list[str]]:
    """The groups of every results file, and the errors found reading them."""
    results, errors = root / "bench" / "results", []
    groups: dict[tuple[str, str, str], Group] = {}
    manifest = results / "provenance.csv"
    listed = {}
    if manifest.exists():
        with manifest.open(newline="") as f:
            listed = {r["file"]: r for r in csv.DictReader(f)}
    for path in sorted(results.iterdir()):
        if path.name == manifest.name or not path.is_file():
            continue
        if path.name in listed:
            r = listed[path.name]
            rows, paths = [r], r["measures"].split()
        elif path.suffix == ".csv":
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            paths = None
            if rows and "commit" not in rows[0]:
                errors.append(f"bench/results/{path.name} has no commit column: write its rows through "
                              "rptfast.provenance.append_rows")
                continue
        else:
            errors.append(f"bench/results/{path.name} has no provenance: list it in bench/results/provenance.csv")
            continue
        for r in rows:
            name = group_of(path.name, r) if paths is None else ""
            g = groups.setdefault((path.name, r["commit"], name),
                                  Group(path.name, r["commit"], name, paths or measures(path.name, name)))
            g.rows += 1
            g.dates.add(r.get("date", "unknown")[:10])
            g.devices.add(r.get("device") or "unknown")
            g.dirty.add(r.get("dirty") or "unknown")
            g.versions.add(f"torch {r.get('torch') or 'unknown'}, triton {r.get('triton') or 'unknown'}")
    return list(groups.values()), errors


def judge(root: Path, g: Group, errors: list[str]) -> None:
    """Sets g.status and g.why."""
    if g.commit in ("", "unknown"):
        g.status, g.why = "unknown", "no commit recorded"
        return
    full = git(root, "rev-parse", "--verify", "--quiet", f"{g.commit}^{{commit}}")
    if not full:
        errors.append(f"bench/results/{g.file}: {g.rows} row(s) of group {g.group or '-'} name commit {g.commit}, "
                      "which this repository does not have; write commit 'unknown' and say in the row's note "
                      "where it was measured")
        g.status, g.why = "unknown", f"commit {g.commit} not in this repository"
        return
    changed = (git(root, "diff", "--name-only", full, "HEAD", "--", *g.paths) or "").split()
    if changed:
        first = (git(root, "log", "--reverse", "--format=%h", f"{full}..HEAD", "--", *changed) or "").split()
        g.status = "stale"
        g.why = f"{' '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} changed since" + (
            f" (first in {first[0]})" if first else "")
        return
    dirty = {d for text in g.dirty for d in text.split() if d not in ("false", "unknown") and not d.startswith("+")}
    truncated = any("more" in text.split() for text in g.dirty)
    touched = sorted(d for d in dirty if any(d == p or d.startswith(p.rstrip("/") + "/") for p in g.paths))
    if touched or (truncated and dirty):
        g.status, g.why = "dirty", f"measured with uncommitted changes to {' '.join(touched) or 'files not listed'}"
        return
    g.status = "current"
    g.why = "dirty flag unknown (recorded before it existed)" if "unknown" in g.dirty else ""


def check_docs(root: Path, groups: list[Group], errors: list[str]) -> None:
    """Every tag in README.md and docs/*.md names rows that exist and says their status now."""
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    for doc in docs:
        if not doc.exists():
            continue
        text = doc.read_text()
        for line_no, line in enumerate(text.splitlines(), 1):
            for commit in HASH.findall(line):
                if not git(root, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"):
                    errors.append(f"{doc.relative_to(root)}:{line_no}: names commit {commit}, which this repository "
                                  "does not have")
        tags = {m.start(): m for m in TAG.finditer(text)}  # a tag may wrap across lines
        for start in (m.start() for m in re.finditer(r"\(rows:", text)):
            where = f"{doc.relative_to(root)}:{text.count(chr(10), 0, start) + 1}"
            if start not in tags:
                errors.append(f"{where}: a rows tag this check cannot read; write (rows: FILE @ COMMIT[, GROUP]: "
                              "current|stale|dirty|unknown)")
                continue
            file, commit, group, status = tags[start].groups()
            group = " ".join(group.split()) if group else ""
            match = [g for g in groups if g.file == file and (g.commit.startswith(commit) or commit.startswith(
                g.commit) or commit == g.commit == "unknown") and (not group or g.group == group)]
            if not match:
                errors.append(f"{where}: quotes rows {file} @ {commit}{', ' + group if group else ''}, which "
                              "bench/results/ does not have")
                continue
            now = max((g.status for g in match), key=STATUS_ORDER.index)
            if now != status:
                why = "; ".join(sorted({g.why for g in match if g.status == now and g.why}))
                errors.append(f"{where}: labels rows {file} @ {commit}{', ' + group if group else ''} "
                              f"{status!r}, but they are {now!r} ({why}); relabel them or measure again")


def table(groups: list[Group], markdown: bool) -> str:
    head = ["file", "group", "commit", "date", "device", "rows", "dirty", "versions", "status", "why"]
    body = [[g.file, g.group or "-", g.commit[:9], ", ".join(sorted(g.dates)), ", ".join(sorted(g.devices)),
             str(g.rows), ", ".join(sorted(g.dirty))[:40], "; ".join(sorted(g.versions)), g.status, g.why]
            for g in groups]
    if markdown:
        return "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *body])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in [head, *body])


def check(root: Path = ROOT, markdown: bool = False, out=sys.stdout) -> int:
    """Prints every group's status, then the errors; 0 when there are none."""
    groups, errors = load(root)
    for g in groups:
        judge(root, g, errors)
    check_docs(root, groups, errors)
    print(table(groups, markdown), file=out)
    counts = {s: sum(g.rows for g in groups if g.status == s) for s in STATUS_ORDER}
    print("rows: " + ", ".join(f"{n} {s}" for s, n in counts.items()), file=out)
    for e in errors:
        print(f"ERROR {e}", file=out)
    return 1 if errors else 0
