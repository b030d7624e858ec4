"""A full disk at every place rptfast writes: one line naming the path (and the bytes needed where known), exit 2
(3 mid-training), no traceback, nothing half-written left, the last checkpoint intact and resumable.

Without root, a full disk is a file-size limit: RLIMIT_FSIZE on this process for the duration of the write
(Python ignores SIGXFSZ, so a write past the limit fails with EFBIG, as one into a full disk fails with
ENOSPC); the same translation (rptfast.errors.writing) handles both, and ENOSPC's text is tested directly.
"""

import contextlib
import errno
import resource
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_bad_input import base_toml, write
from test_faults import assert_same_weights
from test_trainer import rows

from rptfast import checkpoint, cli, distributed
from rptfast.errors import DiskFullError, full_disk_errno, writing
from rptfast.metrics import MetricsLogger
from rptfast.model import load_policy

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def disk_full_after(n_bytes: int):
    """Every file this process writes is full at byte n_bytes, for the block."""
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN  # else the kernel kills us instead of failing the write
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def debris(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp" in p.name]


def fails_cleanly(capsys, argv: list[str], limit: int, *names: str, code: int = 2) -> str:
    with disk_full_after(limit):
        rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == code, (rc, err)
    assert "Traceback" not in out + err
    line = err.strip().splitlines()[-1]
    assert "File too large" in line and "free space" in line, line
    for name in names:
        assert name in line, (name, line)
    return line


def test_the_translation_knows_the_libraries():
    """ENOSPC / EDQUOT / EFBIG as an OSError, as safetensors' and Arrow's text, and behind torch.save's
    RuntimeError (its __context__); anything else passes through untouched."""
    assert full_disk_errno(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert full_disk_errno(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    wrapped.__context__ = OSError(errno.EFBIG, "File too large")
    assert full_disk_errno(wrapped) == errno.EFBIG
    assert full_disk_errno(OSError(errno.EACCES, "Permission denied")) is None
    with pytest.raises(DiskFullError, match=r"cannot write '/x/y': No space left on device; it needs 2.0 MB"):
        with writing("/x/y", needed=2_000_000):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError):
        with writing("/x/y"):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_commands_on_a_full_disk(tiny_dir, tmp_path, capsys):
    """corpus pydoc, toy corpus, export, prepare's shards and manifest, and a bench results CSV."""
    out = tmp_path / "out"
    fails_cleanly(capsys, ["corpus", "pydoc", "--out", str(out / "pydoc.jsonl")], 50_000, "pydoc.jsonl", "needs")
    fails_cleanly(capsys, ["toy", "corpus", "--out", str(out / "toy.jsonl")], 50_000, "toy.jsonl")
    d = distributed.init()
    lm = load_policy(tiny_dir, dtype=torch.float32, attn="sdpa", trust_remote_code=False,
                     gradient_checkpointing=False)
    ckpt = checkpoint.save(tmp_path / "run", 1, lm, torch.optim.AdamW(lm.parameters()), {}, d, keep=1)
    fails_cleanly(capsys, ["export", str(ckpt), "--out", str(out / "hf")], 200_000, "hf", "needs")
    corpus = write(tmp_path / "c.txt", "".join(f"line {i} of some text with words {i * 7}\n" for i in range(300)))
    fails_cleanly(capsys, ["prepare", "--corpus", corpus, "--proxy", tiny_dir, "--out", str(out / "samples"),
                           "--set", "prepare.min_entropy=0"], 2_000, "shard-00000.parquet")
    assert not (out / "samples").exists() or not any((out / "samples").iterdir())
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from rpt_toy_sweep import append_row
    finally:
        sys.path.remove(str(ROOT / "bench"))
    csv = out / "results.csv"
    append_row(csv, ["a", "b"], {"a": 1, "b": "x" * 100})
    before = csv.read_bytes()
    with pytest.raises(DiskFullError, match="results.csv"), disk_full_after(len(before) + 50):
        append_row(csv, ["a", "b"], {"a": 2, "b": "y" * 100})
    assert csv.read_bytes() == before  # cut back to its last whole row
    assert debris(tmp_path) == []


def test_convert_on_a_full_disk(tmp_path, capsys, monkeypatch):
    """`rptfast convert`'s directory write (safetensors, which raised a traceback before): reading and
    dequantising the real GGUF takes about 40 s here, so the conversion is replaced by its last stage, the same
    save_file of fp32 weights into the temporary directory; the command's own handling around it is real."""
    from safetensors.torch import save_file

    from rptfast import convert

    def write_weights(src, name, digest, tmp):
        tmp.mkdir(parents=True)
        save_file({"model.embed_tokens.weight": torch.randn(1000, 576)}, tmp / "model.safetensors")

    monkeypatch.setattr(convert, "_convert", write_weights)
    monkeypatch.setattr(convert, "resolve_source", lambda name: Path(__file__))
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: True)
    fails_cleanly(capsys, ["convert", "gguf", "smollm2", "--out", str(tmp_path / "smollm2")], 100_000, "smollm2")
    assert list(tmp_path.iterdir()) == []


def test_metrics_jsonl_on_a_full_disk_keeps_whole_lines(tmp_path):
    m = MetricsLogger(tmp_path, True, 100, progress=False, tensorboard=False, every=1000)
    with pytest.raises(DiskFullError, match="metrics.jsonl.*File too large"), disk_full_after(1_000):
        for step in range(100):
            m.log(step, {"loss": 0.25 * step, "note": "x" * 40})
    m.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text.endswith("\n") and len(rows(tmp_path)) == len(text.splitlines()) > 3


def test_checkpoint_refuses_early_when_the_disk_lacks_room(tiny_dir, tmp_path, monkeypatch):
    """Free space below the checkpoint's size: refused before a byte is written, the bytes named."""
    lm = load_policy(tiny_dir, dtype=torch.float32, attn="sdpa", trust_remote_code=False,
                     gradient_checkpointing=False)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    with pytest.raises(DiskFullError, match=r"step_000003.*No space left on device; it needs [0-9.]+ MB"):
        checkpoint.save(tmp_path, 3, lm, torch.optim.AdamW(lm.parameters()), {}, distributed.init(), keep=1)
    assert debris(tmp_path) == [] and not any(p.is_file() for p in tmp_path.rglob("*"))


def test_full_disk_mid_training_exits_3_and_the_last_checkpoint_resumes(tiny_dir, tmp_path, capsys):
    """Step 2's checkpoint meets a full disk: exit 3 naming it and the intact step 1; no .tmp left; the same
    command with --resume and room on the disk finishes with the weights of a run that never stopped."""
    cfg = write(tmp_path / "c.toml", base_toml(tiny_dir, tmp_path / "run", train__ckpt_every=1, train__steps=2))
    whole = write(tmp_path / "w.toml", base_toml(tiny_dir, tmp_path / "whole", train__steps=2))
    assert cli.main(["train", whole]) == 0
    assert cli.main(["train", cfg, "--set", "train.steps=1"]) == 0
    capsys.readouterr()
    line = fails_cleanly(capsys, ["train", cfg, "--resume"], 1_000_000, "step_000002", "step_000001", "--resume",
                         code=3)
    assert line.startswith("rptfast train: stopped: ")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000001"] and debris(tmp_path) == []
    assert checkpoint.verify(ckpts / "step_000001") is None
    assert cli.main(["train", cfg, "--resume"]) == 0
    assert_same_weights(tmp_path / "whole" / "final", tmp_path / "run" / "final")
    assert [r["step"] for r in rows(tmp_path / "run")] == [0, 1, 2]
