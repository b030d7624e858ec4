"""Where a result row comes from, and the one function that writes result rows.

Every row in bench/results/ carries PROVENANCE: the date, the commit the code was at, whether the tree was dirty
(and where), the device, and the torch and triton versions. `bench/gpu.py --check-stale` reads them back and marks
a row stale once the files it measures differ at HEAD from its commit (bench/stale.py).

dirty: "false", or the tracked files modified at measuring time (space-separated, at most DIRTY_SHOWN, then
"+N more"); changes under bench/results/, docs/ and to *.md files are left out, since a benchmark writes its own
rows and documents them while it runs. Rows written before these columns existed read "unknown" there.
"""

from __future__ import annotations

import csv
import datetime
import functools
import subprocess
from pathlib import Path

from rptfast.errors import appending, atomic_path

PROVENANCE = ["date", "commit", "dirty", "device", "torch", "triton"]
UNKNOWN = "unknown"
DIRTY_SHOWN = 8
NOT_CODE = ("bench/results/", "docs/")  # and *.md: what a run may change without changing what it measures
ROOT = Path(__file__).resolve().parent.parent  # the checkout (editable install or link farm); else no git


def _git(*args: str, root: Path = ROOT) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def dirty_paths(root: Path = ROOT) -> list[str] | None:
    """Tracked files that differ from HEAD (staged or not), code only (see the module docstring); None without git."""
    out = _git("status", "--porcelain", "--untracked-files=no", root=root)
    if out is None:
        return None
    paths = [line[3:].split(" -> ")[-1] for line in out.splitlines() if line.strip()]
    return [p for p in paths if not p.startswith(NOT_CODE) and not p.endswith(".md")]


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


@functools.cache
def stamp(root: Path = ROOT) -> dict[str, str]:
    """PROVENANCE of rows measured now, by this process (taken once, before its first row changes the tree)."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    commit = (_git("rev-parse", "HEAD", root=root) or "").strip() or UNKNOWN
    dirty = dirty_paths(root)
    if dirty is None:
        dirty_text = UNKNOWN
    elif not dirty:
        dirty_text = "false"
    else:
        more = len(dirty) - DIRTY_SHOWN
        dirty_text = " ".join(dirty[:DIRTY_SHOWN]) + (f" +{more} more" if more > 0 else "")
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "commit": commit,
            "dirty": dirty_text, "device": device_name(), "torch": torch.__version__, "triton": triton_version}


def append_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Append rows to a results CSV with header `fields`: the one writer of bench/results/ rows.

    A new file gets the header first. A file with an older header (a subset of `fields`) is rewritten whole with
    the new one, under a temporary name then renamed, its rows keeping their values and reading "unknown" in the
    new provenance columns ("" in other new columns); a header with columns `fields` lacks is an error, not a
    silent drop. Keys of a row outside `fields` are ignored; each write is flushed, so a run cut short keeps
    what it measured.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old = list(reader)
            header = reader.fieldnames or []
        if header != fields:
            extra = [c for c in header if c not in fields]
            if extra:
                raise ValueError(f"{path} has columns {extra} that this writer does not know; move the file aside "
                                 "or write to another CSV")
            with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
                w = csv.DictWriter(f, fields, lineterminator="\n")
                w.writeheader()
                for row in old:
                    w.writerow({c: row.get(c, UNKNOWN if c in PROVENANCE else "") for c in fields})
        new = False
    else:
        new = True
    # a full disk: one line naming the CSV (exit 2 through the CLI or errors.run_script), the file cut back to its
    # last whole row
    with appending(path), path.open("a", newline="", buffering=1) as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore", lineterminator="\n")
        if new:
            w.writeheader()
        w.writerows(rows)
        f.flush()
