"""Config: TOML + --set, with errors that name the key; the CLI exits 2 on them."""

import subprocess
import sys
import tomllib

import pytest

from rptfast import config as C
from rptfast.errors import PathError


def test_defaults_roundtrip_through_toml():
    cfg = C.load(None, ["train.lr=3e-4", "model.path=/models/x", "log.progress=false"])
    assert cfg.train.lr == 3e-4 and cfg.model.path == "/models/x" and cfg.log.progress is False
    assert C.from_dict(tomllib.loads(C.to_toml(cfg))) == cfg


def test_toml_file_and_override(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[train]\nsteps = 7\nlr = 1\n[rollout]\nn = 4\n')
    cfg = C.load(p, ["rollout.n=16"])
    assert (cfg.train.steps, cfg.train.lr, cfg.rollout.n) == (7, 1.0, 16)
    assert isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("tree, overrides, key", [
    ({"train": {"lrr": 1e-5}}, [], "train.lrr"),                      # unknown key (with a suggestion)
    ({"trian": {}}, [], "trian"),                                     # unknown section
    ({"train": {"steps": "ten"}}, [], "train.steps"),                 # wrong type in TOML
    ({}, ["train.steps=ten"], "train.steps"),                         # wrong type on the command line
    ({"rollout": {"n": 1}}, [], "rollout.n"),                         # group size 1
    ({"train": {"lr": -1e-5}}, [], "train.lr"),                       # negative lr
    ({"rollout": {"engine": "sglang"}}, [], "rollout.engine"),        # not a choice
    ({"train": {"steps": 2, "warmup_steps": 5}}, [], "train.warmup_steps"),  # impossible combination
    ({"rollout": {"max_tokens": 512, "max_model_len": 256}}, [], "rollout.max_tokens"),
    ({"algorithm": {"dual_clip": 0.5}}, [], "algorithm.dual_clip"),
    ({"model": {"grad_filter": True}, "algorithm": {"updates_per_batch": 2}}, [], "model.grad_filter"),
    ({}, ["train.lr"], "train.lr"),                                   # --set without a value
    ({"train": {"steps": True}}, [], "train.steps"),                  # bool is not an int
    ({"train": {"master_dtype": "float16"}}, [], "train.master_dtype"),  # not a choice
    ({"model": {"dtype": "float32"}, "train": {"master_dtype": "bfloat16"}}, [], "train.master_dtype"),  # wider compute
])
def test_bad_config_names_the_key(tree, overrides, key):
    with pytest.raises(C.ConfigError) as e:
        C.from_dict(tree, overrides)
    assert key in str(e.value)


def test_unknown_key_suggests():
    with pytest.raises(C.ConfigError, match="Did you mean 'lr'"):
        C.from_dict({"train": {"lrr": 1e-5}})


def test_missing_file_lists_presets(tmp_path):
    with pytest.raises(PathError, match="parity"):
        C.load(tmp_path / "none.toml")


def test_cli_exit_code_2_on_bad_config(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[rollout]\nn = 1\n")
    r = subprocess.run([sys.executable, "-m", "rptfast", "train", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "rollout.n" in r.stderr
    r = subprocess.run([sys.executable, "-m", "rptfast", "train", str(p), "--set", "rollout.n"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "section.key=value" in r.stderr
    r = subprocess.run([sys.executable, "-m", "rptfast", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2


def test_bf16_masters_at_small_lr_warn():
    """bf16 master weights are legal, but below lr 1e-4 the run log says that updates vanish."""
    assert C.warnings_for(C.from_dict({"train": {"lr": 1e-6}})) == []  # fp32 masters: the default
    (line,) = C.warnings_for(C.from_dict({"train": {"lr": 1e-6, "master_dtype": "bfloat16"}}))
    assert "train.master_dtype" in line and "vanish" in line and "float32" in line
    assert C.warnings_for(C.from_dict({"train": {"lr": 1e-3, "master_dtype": "bfloat16"}})) == []
