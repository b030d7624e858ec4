"""Every GPU figure rptfast owes, as prepared runs on a bare GPU machine, and which recorded figures are current.

    python bench/gpu.py --part owed --out DIR      # THE run: everything issue 31 owes, within 9 minutes on an H100
    python bench/gpu.py --part owed --out DIR --dry-run   # all of it on the CPU at toy sizes (make test runs it)
    python bench/gpu.py --part kernels --out DIR   # kernel tests compiled + bench/kernels.py at every DESIGN size
    python bench/gpu.py --part train --out DIR     # rptfast bench throughput: Qwen3-0.6B shape, bf16 + fp32 masters
    python bench/gpu.py --part paths --out DIR     # CUDA-only paths in bf16 against fp32 references (gpu_paths.py)
    python bench/gpu.py --check-stale [--markdown] # which rows in bench/results/ are current at HEAD (stale.py)
    python bench/gpu.py --collect DIR              # a fetched DIR's rows into bench/results/ (once each)

--part owed (gpu_owed.py says what each step measures) needs liger-kernel for its Liger step. The GPU image has no
registry, so carry the wheel: here, `.venv/bin/pip download liger-kernel==0.8.5 --no-deps -d wheels/` (wheels/ is
git-ignored; the wheel is pure Python, 0.9 MB), then on the device `carry: ["wheels"]`: this script installs every
wheels/*.whl with `pip install --no-deps --no-index` before the run (its log says so; without the wheel the step
records "liger-kernel not installed" and the rest runs). Commit first and run from a clean tree: every row records
the commit and the files that were dirty (rptfast.provenance), and rows of uncommitted code cannot be current.

Written for a borrowed machine with no network (python, torch, triton, transformers, safetensors, tokenizers,
numpy, pytest; no vllm, no flash-attn): it installs rptfast first, offline (`pip install --no-deps
--no-build-isolation -e .`, setuptools from the machine), unless this checkout is installed already; where pip
cannot, it puts rptfast on the path from a link farm, and every subprocess runs in DIR, not in the checkout (whose
source folder rptfast/, without kernels/ inside, would shadow the links).

Output, all in DIR (at most 8 files, each under 16 MiB, so a borrowed machine can hand it back): results.json (every
figure), summary.md (pass/fail against the targets), gpu.csv (the rows appended to bench/results/gpu.csv), the rows
appended to kernels.csv and throughput.csv, and the logs. --part owed rewrites results.json and summary.md after
every step, so a run killed at its limit still brings back what finished. On the device the appended
bench/results/ stays behind: `--collect DIR` here copies the rows in.

Left out: the vLLM engine (not on the GPU image; the CPU tests cover it: generation on the GPU runs through
TorchEngine, eager HF forwards, and its numbers are labelled so) and multi-GPU runs.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import gpu_owed
import gpu_paths
import stale
from gpu_paths import QWEN3_06B, TOY

ROOT = Path(__file__).resolve().parent.parent
MAX_FILES, MAX_BYTES = 8, 16 << 20
GPU_FIELDS = ["part", "dry_run", "figure", "value"]  # after rptfast.provenance.PROVENANCE


# ---------------------------------------------------------------- install and bookkeeping


def pip_install_command(prefix: Path | None = None) -> list[str]:
    """The offline editable install: no dependencies, no build isolation (the machine's setuptools), no index."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(ROOT)]
    return cmd + (["--prefix", str(prefix)] if prefix else [])


def installed_here() -> bool:
    """Whether `import rptfast` (and rptfast.kernels) would load this checkout's files."""
    try:
        spec = importlib.util.find_spec("rptfast.kernels")
    except ModuleNotFoundError:
        return False
    origin = spec.origin if spec is not None else None
    return origin is not None and Path(origin).resolve() == ROOT / "kernels" / "__init__.py"


def link_farm() -> Path:
    """rptfast importable without any build: a temporary `rptfast/` of links to the package's files, with
    `kernels` linked in as rptfast.kernels (the mapping pyproject.toml's package-dir makes)."""
    farm = Path(tempfile.mkdtemp(prefix="rptfast-src-"))
    pkg = farm / "rptfast"
    pkg.mkdir()
    for child in (ROOT / "rptfast").iterdir():
        (pkg / child.name).symlink_to(child)
    (pkg / "kernels").symlink_to(ROOT / "kernels")
    return farm


def install(out: Path) -> str:
    """Install this checkout unless it is what `import rptfast` finds already; the pip log goes to install.log.

    setuptools older than 70.1 needs the `wheel` package for an editable install ("invalid command
    'bdist_wheel'"); where pip fails, the package is put on the path through link_farm() instead.
    """
    if installed_here():
        return "already installed from this checkout"
    r = subprocess.run(pip_install_command(), capture_output=True, text=True)
    (out / "install.log").write_text(r.stdout + r.stderr)
    site.addsitedir(sysconfig.get_paths()["purelib"])  # this process reads the new editable .pth too
    importlib.invalidate_caches()
    if r.returncode == 0 and installed_here():
        return "installed (pip install --no-deps --no-build-isolation -e .)"
    farm = link_farm()
    sys.path.insert(0, str(farm))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(farm), *filter(None, [os.environ.get("PYTHONPATH")])])
    importlib.invalidate_caches()
    if not installed_here():
        sys.exit(f"gpu.py: `{' '.join(pip_install_command())}` failed (exit {r.returncode}; see "
                 f"{out / 'install.log'}) and so did importing rptfast from links in {farm}")
    return f"pip failed (exit {r.returncode}, see install.log); rptfast imported from links in {farm}"


def install_wheels(out: Path) -> str:
    """pip install --no-deps --no-index every wheels/*.whl of this checkout (liger-kernel, carried to the device)."""
    wheels = sorted((ROOT / "wheels").glob("*.whl"))
    if not wheels:
        return "no wheels/ to install"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", *map(str, wheels)],
                       capture_output=True, text=True, cwd=gpu_owed.scratch_dir())
    with (out / "install.log").open("a") as f:
        f.write(r.stdout + r.stderr)
    importlib.invalidate_caches()
    names = ", ".join(w.name for w in wheels)
    return f"installed {names}" if r.returncode == 0 else f"pip could not install {names} (see install.log)"


def run_logged(cmd: list[str], log: Path, timeout: int, env: dict | None = None) -> tuple[int, str]:
    """Run a subprocess with its output in `log`; return (exit code, its last stdout line).

    It runs in an empty directory of its own (gpu_owed.scratch_dir), never in the checkout: there the source folder
    rptfast/ (which has no kernels/ inside) would come first on sys.path and shadow the link farm or an editable
    install; nor in DIR, which must hold only what comes back. Paths in cmd are absolute.
    """
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=gpu_owed.scratch_dir(), timeout=timeout,
                           env={**os.environ, **(env or {})})
        code, stdout, stderr = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        code, stdout, stderr = 124, (e.stdout or b"").decode(errors="replace"), f"timed out after {timeout} s\n"
    log.write_text(f"$ {' '.join(cmd)}\n# {time.perf_counter() - t0:.1f} s, exit {code}\n{stdout}\n{stderr}")
    lines = stdout.strip().splitlines()
    return code, lines[-1] if lines else ""


def copy_rows(src: Path, dst: Path) -> int:
    """Append the rows of the CSV src to dst (through rptfast.provenance.append_rows), skipping rows dst already
    has; returns how many were appended."""
    from rptfast.provenance import append_rows

    if not src.exists():
        return 0
    with src.open(newline="") as f:
        reader = csv.DictReader(f)
        rows, fields = list(reader), reader.fieldnames or []
    have = set()
    if dst.exists():
        with dst.open(newline="") as f:
            have = {tuple(r.get(c, "") for c in fields) for r in csv.DictReader(f)}
    new = [r for r in rows if tuple(r.get(c, "") for c in fields) not in have]
    if new:
        append_rows(dst, fields, new)
    return len(new)


# ---------------------------------------------------------------- part: kernels


def part_kernels(out: Path, dry: bool, results: Path) -> dict:
    """pytest tests/kernels (compiled on a GPU; the interpreter-free CPU path in a dry run), then
    bench/kernels.py at the DESIGN sizes (--tiny in a dry run) with its own roofline and targets."""
    files = [str(ROOT / "tests" / "kernels" / "test_kernel_advantages.py")] if dry else sorted(
        str(f) for f in (ROOT / "tests" / "kernels").glob("test_*.py"))
    # one process per file: a CUDA error (a device-side assert, say) ends the CUDA context of its process, and
    # in a shared one it would fail every test after it
    logs, summaries, code = [], {}, 0
    for f in files:
        c, last = run_logged([sys.executable, "-m", "pytest", f, "-q", "-p", "no:cacheprovider"],
                             out / "pytest.log", timeout=300)
        logs.append((out / "pytest.log").read_text())
        summaries[Path(f).stem] = last
        code = code or (c if c != 5 else 0)  # 5: every test of the file skipped (the CPU-only compile test)
    (out / "pytest.log").write_text("\n".join(logs))
    res = {"pytest": {"exit": code, "summary": "; ".join(f"{k}: {v}" for k, v in summaries.items())}}
    bench = [sys.executable, str(ROOT / "bench" / "kernels.py"), "--csv", str(out / "kernels.csv")]
    bench += ["--tiny", "--no-compile"] if dry else []
    code, last = run_logged(bench, out / "kernels.log", timeout=420)
    res["bench"] = {"exit": code, **(json.loads(last) if code == 0 and last.startswith("{") else {})}
    res["rows_appended"] = copy_rows(out / "kernels.csv", results / "kernels.csv")
    return res


# ---------------------------------------------------------------- part: train


def part_train(out: Path, dry: bool, results: Path) -> dict:
    """`rptfast bench throughput` with the torch engine, bf16 compute (fp32 on a CPU dry run is
    replaced by bf16 too, to run the mixed path) and fp32 masters, checkpointing off and on."""
    from rptfast.testing import make_tiny_model

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        shape = TOY if dry else QWEN3_06B
        model = make_tiny_model(Path(tmp) / "model", "qwen3", seed=0, **shape)
        sets = [f"model.path={model}", "model.dtype=bfloat16", "train.master_dtype=float32", "rollout.engine=torch"]
        if dry:
            sets += ["data.prompt_len=6", "rollout.n=4", "rollout.max_tokens=4", "rollout.max_model_len=64",
                     "train.prompts_per_step=4", "train.micro_batch_tokens=64"]
        steps = ["--steps", "1", "--warmup", "0"] if dry else ["--steps", "3", "--warmup", "1"]
        for ckpt in (False, True):
            name = f"checkpointing_{'on' if ckpt else 'off'}"
            js = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, "-m", "rptfast", "bench", "throughput", str(ROOT / "bench" / "throughput-0.7b.toml"),
                   *steps,
                   "--json", str(js), "--csv", str(out / "throughput.csv"),
                   *[a for s in [*sets, f"model.gradient_checkpointing={str(ckpt).lower()}"] for a in ("--set", s)]]
            code, _ = run_logged(cmd, out / f"{name}.log", timeout=200 if dry else 230)
            res[name] = {"exit": code, **(json.loads(js.read_text())["default"] if code == 0 else {})}
    res["rows_appended"] = copy_rows(out / "throughput.csv", results / "throughput.csv")
    return res


# ---------------------------------------------------------------- report


def flat_figures(tree, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted name, value) of every number, bool and short string in a nested result."""
    items = []
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            items += flat_figures(v, name + ".")
        elif isinstance(v, (int, float, bool, str)) and not (isinstance(v, str) and len(v) > 200):
            items.append((name, v))
    return items


def summary(part: str, res: dict, meta: dict) -> str:
    lines = [f"# bench/gpu.py --part {part}{' --dry-run' if meta['dry_run'] else ''}",
             f"{meta['device']} | commit {meta['commit'][:12]} (dirty: {meta['dirty']}) | {meta['date']} | "
             f"{meta['seconds']:.0f} s | torch {meta['torch']}, triton {meta['triton']}", ""]
    if part == "kernels":
        lines.append(f"- pytest tests/kernels: exit {res['pytest']['exit']}: {res['pytest']['summary']}")
        lines.append(f"- bench/kernels.py: exit {res['bench']['exit']}; rows appended: {res['rows_appended']}")
        for k, v in res["bench"].items():
            if k != "exit":
                lines.append(f"  - {k}: {v}")
    elif part == "train":
        for name in ("checkpointing_off", "checkpointing_on"):
            r = res[name]
            if r["exit"] != 0:
                lines.append(f"- {name}: FAILED (exit {r['exit']}), see {name}.log")
                continue
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a"
            if r.get("sync_gbps"):  # DESIGN.md: the weight sync within 2x of copying the same bytes once
                ok = r["copy_gbps"] <= 2 * r["sync_gbps"]
                lines.append(f"- {name}: {'PASS' if ok else 'FAIL'} weight sync within 2x of a plain copy "
                             f"({r['copy_gbps'] / r['sync_gbps']:.2f}x)")
            lines.append(f"- {name}: step {r['step_s']:.3f} s, {r['tok_per_s']:.0f} tok/s, MFU {mfu}, "
                         f"peak {r['peak_gb']:.2f} GiB; sync {r['sync_gbps'] or 0:.2f} GB/s vs copy "
                         f"{r['copy_gbps']:.2f} GB/s")
            from rptfast.throughput import ENGINE_LABEL

            lines.append(f"  - generate: {ENGINE_LABEL.get(r['engine'], r['engine'])}")
            lines.append("  - " + ", ".join(f"{p} {v['s']:.3f} s / {v['peak_gb']:.2f} GiB"
                                            + (f" / {v['tok_per_s']:.0f} tok/s" if v["tok_per_s"] else "")
                                            for p, v in r["phases"].items()))
    elif part == "owed":
        lines += gpu_owed.summary_lines(res, meta["dry_run"])
    else:
        for name, r in res.items():
            ok = r.get("ok", all(v.get("ok", True) for v in r.values() if isinstance(v, dict)))
            lines.append(f"- {name}: {'ok' if ok else 'FAILED'} ({r['seconds']:.1f} s)")
            for k, v in flat_figures({k: v for k, v in r.items() if k not in ("ok", "seconds")}):
                lines.append(f"  - {k}: {v:.4g}" if isinstance(v, float) else f"  - {k}: {v}")
    return "\n".join(lines) + "\n"




def report(out: Path, results: Path, part: str, res: dict, meta: dict, new: dict) -> None:
    """results.json and summary.md rewritten whole (temporary name, then rename); the figures of `new` (the part's
    results, or one step of --part owed) appended to gpu.csv here and in bench/results/."""
    from rptfast.provenance import PROVENANCE, append_rows

    for name, text in (("results.json", json.dumps({**meta, "results": res}, indent=2, default=str)),
                       ("summary.md", summary(part, res, meta))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    rows = [{**{k: meta[k] for k in PROVENANCE}, "part": part, "dry_run": meta["dry_run"], "figure": k, "value": v}
            for k, v in flat_figures(new) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for path in (out / "gpu.csv", results / "gpu.csv"):
        append_rows(path, [*PROVENANCE, *GPU_FIELDS], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["owed", "kernels", "train", "paths"])
    parser.add_argument("--out", type=Path, help="output directory (created; at most 8 files)")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes, on the CPU: checks the script itself")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="CSVs to append rows to")
    parser.add_argument("--check-stale", action="store_true", help="which result rows are current (bench/stale.py)")
    parser.add_argument("--markdown", action="store_true", help="--check-stale: the table in markdown")
    parser.add_argument("--collect", type=Path, metavar="DIR", help="copy a fetched DIR's rows into --results")
    args = parser.parse_args(argv)
    if args.check_stale:
        return stale.check(ROOT, args.markdown)
    if args.collect:
        for name in ("gpu.csv", "kernels.csv", "throughput.csv"):
            print(f"{name}: {copy_rows(args.collect / name, args.results / name)} new rows")
        return 0
    if not (args.part and args.out):
        parser.error("--part and --out are needed (or --check-stale, or --collect DIR)")
    start = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    installed = install(out)
    if args.part == "owed":
        installed += "; " + install_wheels(out)
    import torch

    from rptfast.provenance import stamp

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu.py: no CUDA device; pass --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    args.results.mkdir(parents=True, exist_ok=True)
    meta = {"part": args.part, "dry_run": args.dry_run, **stamp(), "install": installed, "seconds": 0.0}
    if stamp()["dirty"] not in ("false", "unknown"):
        print(f"gpu.py: the tree is dirty ({stamp()['dirty']}): its rows record that, and cannot be current",
              file=sys.stderr)
    if args.part == "owed":
        res: dict = {}

        def done(name: str, result: dict) -> None:
            res[name] = result
            meta["seconds"] = time.monotonic() - start
            report(out, args.results, "owed", res, meta, {name: result})
            copy_rows(out / "kernels.csv", args.results / "kernels.csv")
            print(f"owed/{name}: {json.dumps(result, default=str)[:600]}", flush=True)

        gpu_owed.part_owed(out, args.dry_run, start + gpu_owed.BUDGET_S, done)
    else:
        parts = {"kernels": part_kernels, "train": part_train, "paths": gpu_paths.part_paths}
        res = parts[args.part](out, args.dry_run, args.results)
        meta["seconds"] = time.monotonic() - start
        report(out, args.results, args.part, res, meta, res)
    files = [p for p in out.iterdir() if p.is_file()]
    for p in files:  # a runaway log must not stop the directory from coming back
        if p.stat().st_size > MAX_BYTES:
            data = p.read_bytes()[-(MAX_BYTES - 4096):]
            p.write_bytes(b"[truncated to the last bytes]\n" + data)
    if len(files) > MAX_FILES:
        print(f"gpu.py: {out} holds {len(files)} files, more than {MAX_FILES}: use one directory per part",
              file=sys.stderr)
    print((out / "summary.md").read_text())
    print(json.dumps({"part": args.part, "out": str(out), "seconds": round(meta["seconds"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
