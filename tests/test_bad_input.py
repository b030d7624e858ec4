"""Bad input across train, prepare, eval and bench: exit 2, one line naming the key or path, no traceback.

Each case runs `rptfast.cli.main` in-process (every one fails before an engine starts, so
they take seconds); one goes through a subprocess to prove the process exit code itself.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from rptfast import cli
from rptfast import train as trainer
from rptfast.data.store import FORMAT


def base_toml(tiny_dir, out, **sections) -> str:
    tree = {
        "model": {"path": tiny_dir},
        "data": {"task": "first_token", "first_token_set": 64, "prompt_len": 6},
        "rollout": {"engine": "torch", "n": 4, "max_tokens": 2, "max_model_len": 128},
        "train": {"steps": 1, "prompts_per_step": 4, "micro_batch_tokens": 128, "out_dir": str(out)},
        "log": {"progress": False, "tensorboard": False},
    }
    for key, value in sections.items():
        section, name = key.split("__")
        tree.setdefault(section, {})[name] = value
    lines = []
    for section, table in tree.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {'nan' if v != v else json.dumps(v)}" for k, v in table.items()]  # TOML spells NaN nan
    return "\n".join(lines) + "\n"


def write(path: Path, text: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def expect_exit_2(capsys, argv: list[str], *names: str) -> str:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    assert "Traceback" not in out + err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"rptfast {argv[0]}: error: "), line
    for name in names:
        assert name in line, (name, line)
    return line


@pytest.fixture(scope="module")
def broken(tiny_dir, tmp_path_factory):
    """Model directories with one defect each, made once from the tiny fixture."""
    root = tmp_path_factory.mktemp("broken")

    def copy(name):
        d = root / name
        shutil.copytree(tiny_dir, d)
        return d

    d = copy("truncated")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size - 1000])
    d = copy("garbage")
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    d = copy("noconfig")
    (d / "config.json").unlink()
    d = copy("noeos")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["eos_token"] = None
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("eos_token_id", None)
    (d / "config.json").write_text(json.dumps(cfg))
    d = copy("shape")  # weights saved for another intermediate_size
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 64
    (d / "config.json").write_text(json.dumps(cfg))
    for name, value in (("nan_weights", float("nan")), ("overflow", 3e38)):  # NaN weights; finite ones that overflow
        d = copy(name)
        w = load_file(d / "model.safetensors")
        w["model.norm.weight"] = torch.full_like(w["model.norm.weight"], value)
        save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    (root / "a_file").write_text("not a directory")
    return root


def train_cases(tiny_dir, tmp: Path, broken: Path):
    """(argv, names the message must hold), one per bad input."""
    good = write(tmp / "good.toml", base_toml(tiny_dir, tmp / "run"))

    def cfg(name, **sections):
        return write(tmp / f"{name}.toml", base_toml(tiny_dir, tmp / name, **sections))

    return [
        (["train", str(tmp / "missing.toml")], ["missing.toml", "does not exist"]),
        (["train", str(tmp)], [str(tmp), "is a directory"]),
        (["train", write(tmp / "binary.toml", b"\x89PNG\r\n\x1a\n\xff\xfe\x00")], ["binary.toml", "not UTF-8"]),
        (["train", write(tmp / "syntax.toml", "[train\nlr = ")], ["syntax.toml", "not valid TOML"]),
        (["train", good, "--set", "train.lr=inf"], ["train.lr", "finite"]),
        (["train", cfg("nan", train__lr=float("nan"))], ["train.lr", "finite"]),
        (["train", good, "--set", "train.steps=99999999999"], ["train.steps", "sensible"]),
        (["train", good, "--set", "train.out_dir="], ["train.out_dir", "empty"]),
        (["train", good, "--set", "train.out_dir=  "], ["train.out_dir", "empty"]),
        (["train", cfg("ctrl", train__out_dir="runs/a\u0007b")], ["train.out_dir", "control character"]),
        (["train", good, "--set", "data.prompt_len=200", "--set", "rollout.max_model_len=512"],
         ["train.micro_batch_tokens", "data.prompt_len"]),
        (["train", good, "--set", "data.prompt_len=127", "--set", "train.micro_batch_tokens=512"],
         ["rollout.max_model_len", "data.prompt_len"]),
        (["train", good, "--set", "rollout.max_model_len=4096", "--set", "train.micro_batch_tokens=4096"],
         ["rollout.max_model_len", "max_position_embeddings"]),
        (["train", good, "--set", "data.task=parity", "--set", "model.path=", "--set", "rollout.max_tokens=4"],
         ["rollout.max_tokens", "data.parity_d"]),
        (["train", good, "--set", f"model.path={tmp / 'no-such-model'}"], ["no-such-model", "does not exist"]),
        (["train", good, "--set", f"model.path={broken / 'a_file'}"], ["a_file", "is a file"]),
        (["train", good, "--set", f"model.path={broken / 'noconfig'}"], ["noconfig", "config.json"]),
        (["train", good, "--set", f"model.path={broken / 'truncated'}"], ["model.safetensors", "truncated"]),
        (["train", good, "--set", f"model.path={broken / 'garbage'}"], ["model.safetensors", "not a valid"]),
        (["train", good, "--set", f"model.path={broken / 'noeos'}"], ["noeos", "EOS"]),
        (["train", good, "--set", f"model.path={broken / 'shape'}"],
         ["model.path", str(broken / "shape"), "do not match its config.json", "mlp.down_proj.weight is [128, 256]"]),
        (["train", good, "--set", f"train.out_dir={broken / 'a_file' / 'run'}"], ["train.out_dir", "a file"]),
        (["train", good, "--set", "train.out_dir=/sys/rptfast-run"], ["train.out_dir", "cannot write"]),
        (["train", good, "--set", "model.path=nobody-rptfast/no-such-model"], ["model.path", "HF_HUB_OFFLINE"]),
        (["train", good, "--set", "train.frobnicate=1"], ["train.frobnicate"]),
        (["train", good, "--set", "train.lr=fast"], ["train.lr"]),
        (["train", good, "--resume", "--set", f"train.out_dir={tmp / 'fresh'}"], ["--resume", "no checkpoint"]),
    ]


def test_train_bad_inputs(tiny_dir, tmp_path, broken, capsys):
    cases = train_cases(tiny_dir, tmp_path, broken)
    for argv, names in cases:
        t0 = time.perf_counter()
        expect_exit_2(capsys, argv, *names)
        assert time.perf_counter() - t0 < 30, argv  # checked before work (an engine start or hub retries)
    assert not (tmp_path / "fresh" / "config.toml").exists()  # a refused --resume claims nothing


def test_train_refuses_a_locked_run_dir(tiny_dir, tmp_path, capsys):
    cfg = write(tmp_path / "c.toml", base_toml(tiny_dir, tmp_path / "run"))
    held = trainer.lock_run_dir(tmp_path / "run")
    try:
        line = expect_exit_2(capsys, ["train", cfg], str(tmp_path / "run"), "in use", str(os.getpid()))
        assert "--resume" not in line
        expect_exit_2(capsys, ["train", cfg, "--resume"], "in use")
    finally:
        held.close()


def parquet(path: Path, texts: list[str]) -> Path:
    pq.write_table(pa.table({"text": texts}), path)
    return path


def test_prepare_bad_inputs(tiny_dir, tmp_path, broken, capsys):
    corpus = write(tmp_path / "c.txt", "some text " * 50)
    truncated = parquet(tmp_path / "t.parquet", ["a document of some length " * 20] * 50)
    truncated.write_bytes(truncated.read_bytes()[:-30])
    not_parquet = write(tmp_path / "x.parquet", b"PAR1 then nothing")
    a_file = write(tmp_path / "out-file", "x")
    ok = ["prepare", "--corpus", corpus, "--proxy", tiny_dir]
    cases = [
        (ok + ["--out", a_file], ["--out", "is a file"]),
        (ok + ["--out", str(Path(a_file) / "sub")], ["--out", "a file"]),
        (ok + ["--out", "/sys/rptfast-store"], ["--out", "cannot write"]),
        (["prepare", "--corpus", corpus, "--proxy", str(tmp_path / "nope" / "proxy"), "--out", str(tmp_path / "o")],
         ["--proxy", "nope", "does not exist"]),
        (["prepare", "--corpus", corpus, "--proxy", "./proxy-dir", "--out", str(tmp_path / "o")],
         ["--proxy", "proxy-dir", "does not exist"]),
        (["prepare", "--corpus", corpus, "--proxy", "nobody-rptfast/proxy", "--out", str(tmp_path / "o")],
         ["--proxy", "HF_HUB_OFFLINE"]),
        (ok + ["--out", str(tmp_path / "o"), "--set", "model.path=runs/none/final"],
         ["model.path (the policy's tokenizer)", "runs/none/final", "does not exist"]),
        (["prepare", "--corpus", corpus, "--proxy", str(broken / "truncated"), "--out", str(tmp_path / "o")],
         ["model.safetensors", "truncated"]),
        (["prepare", "--corpus", corpus, "--proxy", str(broken / "shape"), "--out", str(tmp_path / "o")],
         ["--proxy", str(broken / "shape"), "do not match its config.json", "the config implies [320, 128]"]),
        (["prepare", "--corpus", corpus, "--proxy", str(broken / "nan_weights"), "--out", str(tmp_path / "o")],
         ["--proxy", "nan_weights", "non-finite values", "model.norm.weight"]),
        (["prepare", "--corpus", str(tmp_path / "none.txt"), "--proxy", tiny_dir, "--out", str(tmp_path / "o")],
         ["none.txt", "does not exist"]),
        (["prepare", "--corpus", str(truncated), "--proxy", tiny_dir, "--out", str(tmp_path / "o")],
         ["t.parquet", "cannot be read"]),
        (["prepare", "--corpus", not_parquet, "--proxy", tiny_dir, "--out", str(tmp_path / "o")],
         ["x.parquet", "cannot be read"]),
        (ok + ["--out", str(tmp_path / "o"), "--set", "prepare.min_entropy=nan"], ["prepare.min_entropy", "finite"]),
        (ok + ["--out", str(tmp_path / "o"), "--set", "prepare.top_k=10000000000"], ["prepare.top_k"]),
    ]
    for argv, names in cases:
        expect_exit_2(capsys, argv, *names)
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_prepare_that_keeps_nothing_exits_2(tiny_dir, tmp_path, broken, capsys):
    """A corpus or proxy from which no sample can come: the counts on one line, then exit 2 naming the cause; no
    store is left behind."""
    text = "The proxy reads this sentence and scores every position of it. " * 8
    cases = [
        ([write(tmp_path / "empty.txt", "")], tiny_dir, [], "empty_file 1", ["empty.txt", "all 1 documents"]),
        ([write(tmp_path / "latin1.txt", ("café crème " * 40).encode("latin-1")),
          write(tmp_path / "cp1252.txt", "“quoted” – dash ".encode("cp1252") * 20)], tiny_dir, [],
         "invalid_utf8 2", ["latin1.txt", "not UTF-8", "convert the files to UTF-8"]),
        ([write(tmp_path / "arrays.jsonl", '["a list"]\n"a string"\n42\n{"text": null}\n')], tiny_dir, [],
         "not_text 1", ["arrays.jsonl", "bad_json 3", "not a JSON object", "one JSON object per line"]),
        ([write(tmp_path / "t.txt", text)], tiny_dir, ["--set", "prepare.min_entropy=1000"],
         "low_entropy", ["none of the", "low_entropy", "prepare.min_entropy (now 1000.0)"]),
        ([write(tmp_path / "t.txt", text)], str(broken / "overflow"), [], None,
         ["--proxy", "overflow", "non-finite logits", "every one of the"]),
    ]
    for corpus, proxy, extra, counts, names in cases:
        out = tmp_path / "store"
        line = expect_exit_2(capsys, ["prepare", "--corpus", *corpus, "--proxy", proxy, "--out", str(out), *extra],
                             "no sample kept" if counts else "--proxy", *names)
        if counts:
            assert counts in line
        assert not out.exists(), line
    capsys.readouterr()
    assert cli.main(["prepare", "--corpus", write(tmp_path / "e.txt", ""), "--proxy", tiny_dir, "--out",
                     str(tmp_path / "store")]) == 2
    out, _ = capsys.readouterr()
    assert out.strip().splitlines() == ["prepare: 1 documents (1 skipped: empty_file 1), 0 tokens, 0 positions scored "
                                        "(0 dropped), 0 samples (0 held out)"]


def test_eval_bad_inputs(tiny_dir, tmp_path, broken, capsys):
    store = tmp_path / "store"
    write(store / "manifest.json", json.dumps({"format": FORMAT, "shards": [{"file": "shard-00000.parquet"}]}))
    write(store / "shard-00000.parquet", b"PAR1" + b"\x00" * 100)
    a_file = write(tmp_path / "a_file", "x")
    ev = ["eval", "--model", tiny_dir, "--data", str(store)]
    cases = [
        (ev + ["--out", str(Path(a_file) / "r.json")], ["--out", "a file"]),
        (ev + ["--out", str(tmp_path)], ["--out", "is a directory"]),
        (ev + ["--out", "/sys/rptfast/r.json"], ["--out", "cannot write"]),
        (ev, ["store", "damaged"]),
        (["eval", "--model", tiny_dir, "--data", str(tmp_path / "nostore")], ["nostore", "not a sample store"]),
        (["eval", "--model", str(tmp_path / "m"), "--data", str(store)], ["--model", "does not exist"]),
        (["eval", "--model", str(broken / "garbage"), "--data", str(store)], ["model.safetensors", "not a valid"]),
        (["eval", "--model", str(broken / "shape"), "--data", str(store)], ["--model", "do not match its config.json"]),
        (ev + ["--set", "rollout.max_model_len=4096"], ["rollout.max_model_len", "max_position_embeddings"]),
        (ev + ["--set", "eval.k=0"], ["eval.k"]),
    ]
    for argv, names in cases:
        expect_exit_2(capsys, argv, *names)


def test_bench_bad_inputs(tiny_dir, tmp_path, capsys):
    cfg = write(tmp_path / "b.toml", base_toml(tiny_dir, tmp_path / "run"))
    a_file = write(tmp_path / "a_file", "x")
    cases = [
        (["bench", "throughput", cfg, "--steps", "0"], ["--steps"]),
        (["bench", "throughput", cfg, "--json", str(Path(a_file) / "t.json")], ["--json", "a file"]),
        (["bench", "throughput", cfg, "--csv", str(tmp_path)], ["--csv", "is a directory"]),
        (["bench", "throughput", cfg, "--set", "train.lr=-inf"], ["train.lr", "finite"]),
        (["bench", "throughput", str(tmp_path / "none.toml")], ["none.toml", "does not exist"]),
    ]
    for argv, names in cases:
        expect_exit_2(capsys, argv, *names)


def test_a_missing_local_model_path_never_reaches_the_hub(tiny_dir, tmp_path):
    """A model path that can only be a path (./, /, or more than one "/") and does not exist: exit 2 naming it,
    from the command line before transformers, vLLM or the hub client is imported, with the network cut."""
    good = write(tmp_path / "c.toml", base_toml(tiny_dir, tmp_path / "run"))
    corpus = write(tmp_path / "c.txt", "text " * 20)
    cases = [["train", good, "--set", "model.path=runs/real/nope"], ["train", good, "--set", "model.path=./nope"],
             ["eval", "--model", str(tmp_path / "nope"), "--data", str(tmp_path)],
             ["prepare", "--corpus", corpus, "--proxy", "models/a/nope", "--out", str(tmp_path / "o")],
             ["prepare", "--corpus", corpus, "--proxy", tiny_dir, "--tokenizer", "./tok", "--out", str(tmp_path / "o")]]
    probe = ("import socket, sys\n"
             "def cut(*a, **k): raise AssertionError('the network was asked')\n"
             "socket.create_connection = socket.getaddrinfo = cut\n"
             "from rptfast import cli\n"
             "rc = cli.main(sys.argv[1:])\n"
             "loaded = [m for m in ('transformers', 'vllm', 'huggingface_hub') if m in sys.modules]\n"
             "sys.exit(rc if not loaded else 9)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    for argv in cases:
        r = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=120)
        missing = next(a.removeprefix("model.path=") for a in argv if "nope" in a or a == "./tok")
        assert r.returncode == 2, (argv, r.returncode, r.stderr[-2000:])
        assert f"{missing!r} does not exist (a local path: the hub was not asked)" in r.stderr.strip(), r.stderr


def test_exit_code_2_from_the_process(tiny_dir, tmp_path):
    """One case through a real process (its start-up costs ~20 s on this CPU): the exit status itself."""
    cfg = write(tmp_path / "g.toml", base_toml(tiny_dir, tmp_path / "run"))
    r = subprocess.run([sys.executable, "-m", "rptfast", "train", cfg, "--set", "train.lr=inf"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "train.lr" in r.stderr.strip().splitlines()[-1]
