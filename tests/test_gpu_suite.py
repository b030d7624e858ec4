"""bench/gpu.py, the one-command GPU suite, cannot rot between GPU sessions: its dry run (CPU, toy sizes)
runs every part end to end here, and its offline install is the one a bare GPU machine gets. Its stale check
passes on this checkout, and its rules hold on a repository made for the purpose."""

import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("part", ["owed", "kernels", "train", "paths"])
def test_dry_run_writes_a_small_complete_directory(part, tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--part", part, "--out", str(out),
                        "--dry-run", "--results", str(results)], capture_output=True, text=True, env=env,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["part"] == part
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() and f.stat().st_size < 16 << 20 for f in files)
    report = json.loads((out / "results.json").read_text())
    assert report["device"] == "cpu" and report["dry_run"] and report["commit"]
    res = report["results"]
    if part == "kernels":
        assert res["pytest"]["exit"] == 0 and "passed" in res["pytest"]["summary"]
        assert res["bench"]["exit"] == 0 and res["rows_appended"] > 0
    elif part == "owed":
        assert set(res) == {"kernels", "liger", "shared_prompts", "trainer", "kernel_tests"}
        assert all(r["exit"] == 0 for r in res.values()), {k: r["exit"] for k, r in res.items()}
        assert {"selective_logprob.fwd", "fused_policy_loss_from_logits.full", "linear_logprob.fwd",
                "linear_policy_loss.full"} <= set(res["kernels"])
        (liger,) = [v for v in res["liger"].values() if isinstance(v, dict)]  # bf16 inputs, fp64 gold: bf16's level
        assert liger["liger_kernel"] != "not installed" and liger["ours_ms"] > 0 and liger["liger_ms"] > 0
        for name in ("ours", "liger"):
            assert liger[f"{name}_loss_rel_err"] < 1e-4
            assert liger[f"{name}_grad_hidden_rel_err"] < 2e-2 and liger[f"{name}_grad_weight_rel_err"] < 2e-2
        assert res["shared_prompts"]["ok"] and res["shared_prompts"]["shares_prompts"]
        trainer = {k: v for k, v in res["trainer"].items() if isinstance(v, dict)}
        assert len(trainer) == 5 and all(v["tok_per_s"] > 0 and v["flops"] > 0 for v in trainer.values())
        assert trainer["fp32_masters"]["trained_tokens"] < trainer["fp32_masters_unshared"]["trained_tokens"]
        assert res["kernel_tests"]["passed"] > 0 and res["kernel_tests"]["failed"] == 0
        assert (results / "kernels.csv").exists() and (out / "owed.log").exists()
        assert not any(p.name.startswith(".") for p in out.iterdir())  # nothing but what is meant to come back
    elif part == "train":
        for name in ("checkpointing_off", "checkpointing_on"):
            assert res[name]["exit"] == 0 and res[name]["tok_per_s"] > 0 and res[name]["sync_gbps"] > 0
        assert res["rows_appended"] == 2
    else:
        assert set(res) == {"attention", "shared_prompts", "sleep_wake", "mixed_precision", "engine_mismatch",
                            "offload"}
        assert all("error" not in v for v in res.values()), res
        assert res["attention"]["ok"] and res["sleep_wake"]["level_2"]["same_tokens"]
        sp = res["shared_prompts"]  # prompt-once rows within twice unshared packing's own bf16 error, fewer tokens
        assert sp["ok"] and sp["shares_prompts"] and sp["shared_step"]["tokens"] < sp["unshared_step"]["tokens"]
        assert res["mixed_precision"]["ok"]  # fp32 masters, gradients within bf16's own error
        mp = res["mixed_precision"]["fsdp2 world-size-1"]
        assert mp["master_dtype"] == "torch.float32" and 0 < mp["grad_rel_err"] < 0.1
        assert res["engine_mismatch"]["lm_head_bf16"]["vs_engine_max"] < 0.05
        assert all(v["bitwise_equal"] for k, v in res["offload"].items() if isinstance(v, dict))
    rows = list(csv.DictReader((results / "gpu.csv").open()))
    assert rows and {r["part"] for r in rows} == {part} and all(r["device"] == "cpu" for r in rows)
    assert all(r["commit"] == report["commit"] and r["dirty"] and r["torch"] and r["triton"] for r in rows)
    assert (out / "gpu.csv").read_text() == (results / "gpu.csv").read_text()
    assert (out / "summary.md").read_text().startswith(f"# bench/gpu.py --part {part} --dry-run")


def test_offline_build_and_the_fallback_without_one(tmp_path):
    """The install gpu.py runs on a bare machine: the build backend works without a package index (--no-index)
    and with this machine's own setuptools (--no-build-isolation); and where pip cannot build (setuptools
    < 70.1 without `wheel`), the link farm makes this checkout importable, rptfast.kernels included."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu
    finally:
        sys.path.pop(0)
    assert {"--no-deps", "--no-build-isolation", "--no-index", "-e"} <= set(gpu.pip_install_command())
    # the same backend and flags, building a wheel rather than installing (which would replace this venv's
    # rptfast), from a copy (setuptools writes build/ and an egg-info beside the sources)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "runs", ".*cache"))
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/none", "PIP_FIND_LINKS": ""}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(tmp_path), str(src)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = tmp_path.glob("rptfast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rptfast/kernels/__init__.py" in names and "rptfast/configs/parity.toml" in names
    farm = gpu.link_farm()
    # the way gpu.py runs its subprocesses (run_logged: its working directory, PYTHONPATH = the farm), on a Python
    # that cannot see this venv's editable install (-S: no site-packages, hence no .pth; the packages themselves
    # on PYTHONPATH instead), from the checkout's root: before the fix its rptfast/ source folder (no kernels/)
    # shadowed the farm there
    probe = "import importlib.util; print(importlib.util.find_spec('rptfast.kernels').origin)"
    env = {"PYTHONPATH": os.pathsep.join([str(farm), sysconfig.get_paths()["purelib"]])}
    old_cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        code, last = gpu.run_logged([sys.executable, "-S", "-c", probe], tmp_path / "probe.log", 120, env)
    finally:
        os.chdir(old_cwd)
    assert code == 0, (tmp_path / "probe.log").read_text()[-2000:]
    assert Path(last).resolve() == ROOT / "kernels" / "__init__.py"


def test_stale_check_passes_on_this_checkout():
    """Every row names a commit this repository has, every results file has provenance, and no doc quotes rows
    under another status than theirs (bench/stale.py)."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--check-stale"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "rows:" in r.stdout and "stale" in r.stdout


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_stale_rules(tmp_path):
    """bench/stale.py on a repository made here: rows go stale when the file they measure changes (and a doc that
    still calls them current fails, one that calls them stale passes); a commit that does not exist, a results file
    without provenance and a doc naming an unknown commit fail; rows measured with the measured file dirty are
    'dirty'; an unrelated change leaves rows current."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import stale
    finally:
        sys.path.pop(0)
    import io

    repo = tmp_path / "repo"
    (repo / "kernels").mkdir(parents=True)
    (repo / "bench" / "results").mkdir(parents=True)
    _git(repo.parent, "init", "-q", str(repo))
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    for name in ("logprob.py", "topk.py", "_utils.py", "reference.py"):
        (repo / "kernels" / name).write_text(f"# {name}\n")
    (repo / "README.md").write_text("no figures yet\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "a")
    a = _git(repo, "rev-parse", "HEAD")

    def rows(*specs):  # (kernel, commit, dirty)
        lines = ["date,commit,dirty,device,torch,triton,kernel,ms"]
        lines += [f"2026-12-06,{c},{d},cpu,2.13,3.9,{k},1.0" for k, c, d in specs]
        (repo / "bench" / "results" / "kernels.csv").write_text("\n".join(lines) + "\n")

    def check(readme: str) -> tuple[int, str]:
        (repo / "README.md").write_text(readme)
        out = io.StringIO()
        return stale.check(repo, out=out), out.getvalue()

    rows(("selective_logprob", a, "false"), ("topk_entropy", a, "kernels/topk.py"))
    tag = f"(rows: kernels.csv @ {a[:7]}, selective_logprob: {{}})"
    code, text = check(tag.format("current"))
    assert code == 0, text
    assert [line.split()[-1] for line in text.splitlines() if "topk_entropy" in line] == ["kernels/topk.py"]
    assert "dirty" in [w for line in text.splitlines() if "topk_entropy" in line for w in line.split()]
    (repo / "kernels" / "reference.py").write_text("# reference, changed\n")  # every kernel's baseline
    (repo / "kernels" / "unrelated.py").write_text("# new\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "b")
    b = _git(repo, "rev-parse", "--short", "HEAD")
    code, text = check(tag.format("current"))
    assert code == 1 and "labels rows kernels.csv" in text and f"first in {b}" in text, text
    assert check(tag.format("stale"))[0] == 0
    rows(("selective_logprob", b, "false"))  # measured again at b: current again
    assert check(f"(rows: kernels.csv @ {b}, selective_logprob: current)")[0] == 0
    (repo / "kernels" / "unrelated.py").write_text("# changed\n")
    _git(repo, "commit", "-qam", "c")
    assert check(f"(rows: kernels.csv @ {b}, selective_logprob: current)")[0] == 0  # a file it does not measure
    code, text = check(f"(rows: kernels.csv @ {b}, topk_entropy: current)")
    assert code == 1 and "does not have" in text  # no such rows
    rows(("selective_logprob", "deadbee", "false"))
    code, text = check("")
    assert code == 1 and "name commit deadbee" in text
    rows(("selective_logprob", "unknown", "unknown"))
    (repo / "bench" / "results" / "notes.json").write_text("{}")
    code, text = check("measured at commit 0badc0de1")
    assert code == 1 and "notes.json has no provenance" in text and "names commit 0badc0de1" in text
