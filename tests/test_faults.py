"""Faults a run must survive or stop on: non-finite numbers, damaged checkpoints, reused and locked run
directories, and real SIGKILLs of a `rptfast train` process at seeded points (tiny fixture, RPT with the info-gain
reward)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rpt_corpus import prepare_config, write_corpus
from safetensors.torch import load_file
from test_rpt_family import make_cfg as family_cfg
from test_trainer import make_cfg, rows

from rptfast import checkpoint, cli, config, distributed
from rptfast import train as trainer
from rptfast.errors import NonFiniteError
from rptfast.metrics import MetricsLogger
from rptfast.model import load_policy
from rptfast.train import optimize as train_optimize
from rptfast.train import run as train_run


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_no_duplicate_steps(run_dir: Path, last: int) -> None:
    assert [r["step"] for r in rows(run_dir)] == list(range(last + 1))


def test_lr_1e30_stops_with_exit_3_and_saves_nothing(tiny_dir, tmp_path, capsys):
    """The first update makes the weights ~1e30: the post-update check stops the run (exit 3)."""
    cfg = make_cfg(tiny_dir, tmp_path / "run", train__lr=1e30, rollout__engine="torch", train__ckpt_every=1)
    (tmp_path / "c.toml").write_text(config.to_toml(cfg))
    assert cli.main(["train", str(tmp_path / "c.toml")]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rptfast train: stopped: ") and "step 1" in err and "train.lr" in err
    assert not (tmp_path / "run" / "final").exists()
    assert checkpoint.latest(tmp_path / "run") is None
    assert [r["step"] for r in rows(tmp_path / "run")] == [0]  # only the initial evaluation


def test_broken_policy_is_not_scored(tiny_dir, vllm_engine, tmp_path):
    """lr=1e12 leaves finite weights whose logits are not: the next rollout stops the run instead of
    scoring the broken model's samples (token 0 would score as right: reward 1.0)."""
    cfg = make_cfg(tiny_dir, tmp_path / "run", train__lr=1e12, train__eval_every=1)
    with pytest.raises(NonFiniteError, match="non-finite log-probs"):
        trainer.train(cfg, engine=vllm_engine)
    log = rows(tmp_path / "run")
    assert [r["step"] for r in log] == [0]  # step 1's evaluation of the broken weights stopped it, unlogged
    assert not (tmp_path / "run" / "final").exists()


def test_consecutive_skips_stop_the_run(tiny_dir, vllm_engine, tmp_path, monkeypatch):
    real = train_optimize.policy_loss

    def always_nan(*args, **kwargs):
        loss, m = real(*args, **kwargs)
        return loss * float("nan"), m

    monkeypatch.setattr(train_optimize, "policy_loss", always_nan)
    # the two-step loss path (the fused one does not go through update.policy_loss)
    cfg = make_cfg(tiny_dir, tmp_path / "run", train__steps=4, train__max_skipped=2, train__ckpt_every=1,
                   model__fused_loss=False)
    with pytest.raises(NonFiniteError, match="2 updates in a row skipped"):
        trainer.train(cfg, engine=vllm_engine)
    steps = [r for r in rows(tmp_path / "run") if r.get("phase") == "rl"]
    assert [r["skipped"] for r in steps] == [1, 1]
    assert not (tmp_path / "run" / "final").exists()
    assert checkpoint.latest(tmp_path / "run").name == "step_000001"  # taken before the stop, weights untouched


def test_save_refuses_non_finite_tensors(tiny_dir, tmp_path):
    lm = load_policy(tiny_dir, dtype=torch.float32, attn="sdpa", trust_remote_code=False,
                     gradient_checkpointing=False)
    with torch.no_grad():
        lm.model.layers[1].mlp.up_proj.weight[3, 5] = float("inf")
    d = distributed.init()
    with pytest.raises(NonFiniteError, match="up_proj"):
        checkpoint.save(tmp_path, 1, lm, torch.optim.AdamW(lm.parameters()), {}, d, keep=2)
    assert not any(tmp_path.rglob("*"))


def test_damaged_checkpoints_fall_back(tiny_dir, vllm_engine, tmp_path):
    """Truncate the newest checkpoint and flip one bit in the one before: --resume verifies their
    manifests, falls back to the third, and finishes with the weights of the undisturbed run."""
    cfg = make_cfg(tiny_dir, tmp_path / "run", train__steps=4, train__ckpt_every=1, train__keep_ckpts=3)
    final = trainer.train(cfg, engine=vllm_engine)
    whole = tmp_path / "whole"
    final.rename(whole)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000003", "step_000004"]
    w = ckpts / "step_000004" / "__0_0.distcp"
    w.write_bytes(w.read_bytes()[:-100])
    s = ckpts / "step_000003" / "__0_0.distcp"
    data = bytearray(s.read_bytes())
    data[len(data) // 2] ^= 0x10
    s.write_bytes(bytes(data))
    assert checkpoint.verify(ckpts / "step_000002") is None
    said = []
    assert checkpoint.latest(tmp_path / "run", say=said.append, check=True).name == "step_000002"
    assert "__0_0.distcp has" in said[0] and "SHA-256" in said[1]
    for name in ("step_000003", "step_000004"):  # put the damage back for the resume itself
        (ckpts / f"{name}.damaged").rename(ckpts / name)
    resumed = trainer.train(cfg, resume=True, engine=vllm_engine)
    assert_same_weights(whole, resumed)
    assert_no_duplicate_steps(tmp_path / "run", 4)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000003", "step_000003.damaged",
                                                       "step_000004", "step_000004.damaged"]


def test_run_dir_reuse_extend_and_lock(tiny_dir, vllm_engine, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_dir, out, train__steps=1)

    def no_engine(*args, **kwargs):
        raise config.ConfigError("engine refused")

    # a start that fails after claiming the directory does not brick it
    monkeypatch.setattr(train_run, "make_engine", no_engine)
    with pytest.raises(config.ConfigError, match="engine refused"):
        trainer.train(cfg)
    monkeypatch.undo()
    assert (out / "config.toml").exists()
    with pytest.raises(trainer.RunDirError, match="holds no checkpoint"):
        trainer.train(cfg, resume=True, engine=vllm_engine)
    trainer.train(cfg, engine=vllm_engine)
    # a finished run extends with a larger train.steps, and only that may change
    with pytest.raises(trainer.RunDirError, match=r"train.seed differ.*only train.steps"):
        trainer.train(make_cfg(tiny_dir, out, train__steps=2, train__seed=5), resume=True, engine=vllm_engine)
    longer = make_cfg(tiny_dir, out, train__steps=2)
    trainer.train(longer, resume=True, engine=vllm_engine)
    assert_no_duplicate_steps(out, 2)
    assert (out / "config.toml").read_text() == config.to_toml(longer)
    with pytest.raises(trainer.RunDirError, match="past train.ntp_steps"):
        trainer.train(make_cfg(tiny_dir, out, train__steps=1), resume=True, engine=vllm_engine)
    # a second process on the same directory is refused while the first holds it
    held = trainer.lock_run_dir(out)
    try:
        with pytest.raises(trainer.RunDirError, match=f"in use by another rptfast process \\(pid {os.getpid()}\\)"):
            trainer.train(make_cfg(tiny_dir, out, train__steps=3), resume=True, engine=vllm_engine)
    finally:
        held.close()


@pytest.fixture(scope="module")
def store(tiny_dir, tmp_path_factory):
    """An RPT sample store of the tiny model (test_rpt_family's, made again for this module)."""
    from rptfast.data.prepare import prepare

    root = tmp_path_factory.mktemp("faults-store")
    paths, _, _ = write_corpus(root / "corpus")
    prepare(prepare_config(max_positions_per_doc=3, eval_fraction=0.0), paths, tiny_dir, str(root / "store"))
    return str(root / "store")


KILL_SEED = 32  # the kill points are drawn from it; a failure names the points, so it can be replayed


def test_sigkill_at_seeded_points_and_resume_is_bitwise(tiny_dir, store, tmp_path):
    """SIGKILL a real `rptfast train` three times, at points drawn from KILL_SEED: a moment after a checkpoint
    (a fraction of a step), the middle of a checkpoint write (when its .tmp directory appears), and another
    moment; --resume after each; the final weights and the info-gain EMA bit for bit those of a run never
    interrupted. The run is RPT with RLP's info-gain reward (its fp32 EMA in the checkpoints), a linear thought
    budget (a function of the step) and prompt-once packing (train.share_prompts, on by default); the torch
    engine keeps each process start to seconds."""
    kw = dict(rollout={"budget_schedule": "linear", "max_tokens_end": 6}, algorithm={"ema_decay": 0.8},
              train={"steps": 5, "ckpt_every": 1, "keep_ckpts": 2})
    whole = trainer.train(family_cfg(tiny_dir, store, tmp_path / "whole", **kw))
    cfg = family_cfg(tiny_dir, store, tmp_path / "killed", **kw)
    assert cfg.train.share_prompts and cfg.data.reward == "info_gain"
    path = tmp_path / "killed.toml"
    path.write_text(config.to_toml(cfg))
    cmd = [sys.executable, "-m", "rptfast", "train", str(path)]
    ckpts = tmp_path / "killed" / "checkpoints"
    rng = random.Random(KILL_SEED)
    plan = [("moment", rng.uniform(0.0, 1.5)), ("write", 0.0), ("moment", rng.uniform(0.0, 1.5))]
    done = []
    for i, (kind, delay) in enumerate(plan):
        proc = subprocess.Popen(cmd + (["--resume"] if i else []), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seen = {p.name for p in ckpts.iterdir()} if ckpts.is_dir() else set()
        deadline, caught = None, False
        while proc.poll() is None:
            names = {p.name for p in ckpts.iterdir()} if ckpts.is_dir() else set()
            writing = any(n.endswith(".tmp") for n in names)
            if kind == "write" and writing and any(not n.endswith(".tmp") for n in names):
                caught = True
                break
            fresh = {n for n in names - seen if not n.endswith(".tmp")}
            if kind == "moment" and deadline is None and fresh:
                deadline = time.monotonic() + delay
            if deadline is not None and time.monotonic() > deadline:
                caught = True
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=300)
        assert caught and rc == -signal.SIGKILL, (f"kill {i} ({kind}, seed {KILL_SEED}) came too late: the run "
                                                  f"ended with rc {rc}: {proc.stderr.read()[-2000:]}")
        done.append(f"{kind} after {sorted(n for n in os.listdir(ckpts))}")
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    print("killed: " + "; ".join(done) + f"; {r.stdout.splitlines()[0]}")
    assert_same_weights(whole, tmp_path / "killed" / "final")
    last = [run / "checkpoints" / "step_000005" for run in (tmp_path / "whole", tmp_path / "killed")]
    a, b = (checkpoint.read(ckpt, checkpoint.keys(ckpt, "ema.")) for ckpt in last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_no_duplicate_steps(tmp_path / "killed", 5)
    budgets = [r["budget"] for r in rows(tmp_path / "killed") if "budget" in r]
    assert budgets == [r["budget"] for r in rows(tmp_path / "whole") if "budget" in r] and budgets[-1] == 6


def test_metrics_restart_drops_rows_after_the_checkpoint_and_torn_lines(tmp_path, capsys):
    m = MetricsLogger(tmp_path, True, 5, progress=False, tensorboard=False, every=1)
    for step in range(5):
        m.log(step, {"loss": 0.5 + step})
    m.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # the line a SIGKILL tore
    m = MetricsLogger(tmp_path, True, 5, progress=False, tensorboard=False, every=1)
    m.restart_at(2)
    m.log(3, {"loss": -1.0})
    m.close()
    assert [(r["step"], r["loss"]) for r in rows(tmp_path)] == [(0, 0.5), (1, 1.5), (2, 2.5), (3, -1.0)]
    m = MetricsLogger(tmp_path, True, 5, progress=False, tensorboard=False, every=1)
    m.restart_at(0)  # a fresh start in a reused directory
    m.close()
    assert rows(tmp_path) == []
