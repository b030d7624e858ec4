"""The console line's skip reasons, the no-reward warning, optional trackers and quiet start-up."""

import importlib.util
import json
import os

import pytest

from rptfast import config
from rptfast.config import ConfigError
from rptfast.metrics import MetricsLogger, console_line, quiet_startup


def test_skip_reasons_are_told_apart():
    dropped = console_line({"step": 3, "phase": "rl", "skipped": 1, "skip_reason": "all_equal", "all_equal_frac": 1.0,
                            "groups_kept": 0, "reward": 0.0})
    assert "SKIPPED (no group kept: all_equal_frac 1.00, groups_kept 0" in dropped and "non-finite" not in dropped
    assert "SKIPPED (non-finite loss or gradient)" in console_line({"step": 3, "skipped": 1, "loss": float("nan")})
    assert "SKIPPED" not in console_line({"step": 3, "skipped": 0, "loss": 0.1})


def test_no_reward_warning_after_three_steps_and_reset(tmp_path, capsys):
    log = MetricsLogger(tmp_path, True, 10, progress=False, tensorboard=False, every=1)
    dropped = {"phase": "rl", "skipped": 1, "skip_reason": "all_equal", "reward": 0.0}
    for step in (1, 2):
        log.log(step, dropped)
    log.log(3, {"phase": "rl", "skipped": 0, "reward": 0.25})  # a kept group resets the count
    for step in (4, 5, 6, 7):
        log.log(step, dropped)
    log.close()
    out = capsys.readouterr().out
    assert out.count("3 steps in a row kept no group (no rollout earned a reward") == 1
    assert out.index("3 steps in a row") > out.index("step     6")


def test_tensorboard_off_is_said(tmp_path, capsys):
    log = MetricsLogger(tmp_path, True, 1, progress=False, tensorboard=True, every=1)
    log.log(1, {"loss": 1.0})
    log.close()
    if importlib.util.find_spec("tensorboard") is None:
        assert "TensorBoard off: tensorboard is not installed (pip install 'rptfast[tb]'" in capsys.readouterr().out
    else:
        assert any((tmp_path / "tb").iterdir())


@pytest.mark.parametrize("kind", ["wandb", "trackio"])
def test_trackers_are_optional(kind, tmp_path, monkeypatch):
    """Not installed: a clear error naming the key. Installed: an offline run gets the numbers (no network)."""
    if importlib.util.find_spec(kind) is None:
        with pytest.raises(ConfigError, match=f"log.{kind} = true but {kind} is not installed; pip install {kind}"):
            MetricsLogger(tmp_path, True, 1, progress=False, tensorboard=False, every=1, **{kind: True})
        with pytest.raises(ConfigError, match=f"log.{kind} = true but {kind} is not installed"):
            config.from_dict({"log": {kind: True}})  # refused when the config loads, before any work
        return
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    log = MetricsLogger(tmp_path, True, 1, progress=False, tensorboard=False, every=1, run_config={"a.b": 1},
                        **{kind: True})
    log.log(1, {"loss": 0.5, "phase": "rl"})
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 0.5


def test_quiet_startup_hides_fd_output_and_replays_it_on_failure(capfd):
    with quiet_startup(False):
        os.write(2, b"NUMA binding: noise from C++\n")
        os.write(1, b"chatter\n")
    assert capfd.readouterr() == ("", "")
    with pytest.raises(RuntimeError), quiet_startup(False):
        os.write(2, b"the reason it failed\n")
        raise RuntimeError("start-up failed")
    assert "the reason it failed" in capfd.readouterr().err
    with quiet_startup(True):
        os.write(2, b"shown when verbose\n")
    assert "shown when verbose" in capfd.readouterr().err
