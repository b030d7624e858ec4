"""bench/gpu.py, the one-command GPU suite, cannot rot between GPU sessions: its dry run (CPU, toy sizes)
runs every part end to end here, and its offline install is the one a bare GPU machine gets."""

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("part", ["kernels", "train", "paths"])
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
    probe = ("import importlib.util, sys; sys.path.insert(0, sys.argv[1]); "
             "print(importlib.util.find_spec('rptfast.kernels').origin)")
    # -S: no site-packages, so only the link farm can provide rptfast
    r = subprocess.run([sys.executable, "-S", "-c", probe, str(farm)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip()).resolve() == ROOT / "kernels" / "__init__.py"
