"""The parity task: its data, its reward, and a short run of both phases with the real engine."""

import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from rptfast import config
from rptfast.metrics import read_jsonl
from rptfast.tasks import Prompt
from rptfast.tasks.parity import ParityTask
from rptfast.testing import write_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("char")
    write_tokenizer(path, "char")
    return AutoTokenizer.from_pretrained(path)


def task(tok, d=7, p_cot=0.3, reward="answer", max_tokens=12):
    cfg = config.from_dict({"data": {"task": "parity", "parity_d": d, "parity_p_cot": p_cot,
                                     "parity_reward": reward}, "rollout": {"max_tokens": max_tokens}})
    return ParityTask(tok, cfg.data, cfg.rollout, seed=5)


def text(tok, ids):
    return tok.decode(ids)


def test_long_chain_is_running_parity(tok):
    t = task(tok)
    samples = [(q.tokens[:q.start], q.tokens[q.start:]) for q in t.pretrain_samples(0, 400)]
    n_long = 0
    for prompt, target in samples:
        bits = [int(c) for c in text(tok, prompt)[:-1]]
        assert text(tok, prompt) == "".join(map(str, bits)) + "=" and len(bits) == 7
        assert target[-1] == tok.eos_token_id
        answer = [int(c) for c in text(tok, target[:-1])]
        if len(answer) == 7:
            n_long += 1
            assert answer == [sum(bits[:k + 1]) % 2 for k in range(7)]
        else:
            assert answer == [sum(bits) % 2]
    # p_cot = 0.3 over 400 samples: 120 expected, binomial sd ~ 9
    assert 90 < n_long < 150
    # a pure function of the index: the same stream from any start
    assert [(q.tokens[:q.start], q.tokens[q.start:]) for q in t.pretrain_samples(17, 3)] == samples[17:20]
    assert [p.token_ids for p in t.prompts(5, 2)] == [s[0] for s in samples[5:7]]


def ids(tok, s):
    return [tok.eos_token_id if c == "E" else tok.convert_tokens_to_ids(c) for c in s]


@pytest.mark.parametrize("completion, answer_reward, chain_reward", [
    ("0110110E", 1.0, 1.0),   # the long chain, right
    ("0E", 1.0, 0.0),         # the short answer, right
    ("1E", 0.0, 0.0),         # the short answer, wrong
    ("0110111E", 0.0, 0.0),   # a long chain ending wrong
    ("1110110E", 1.0, 0.0),   # wrong on the way, right at the end: the answer reward takes it
    ("0110110", 0.0, 0.0),    # truncated: no EOS
    ("E", 0.0, 0.0),          # no answer at all
    ("0E1E", 1.0, 0.0),       # tokens after EOS are ignored
    ("0=E", 0.0, 0.0),        # a non-bit token
])
def test_reward(tok, completion, answer_reward, chain_reward):
    x = np.array([0, 1, 0, 1, 1, 0, 1])  # running parity 0110110, parity 0
    prompt = Prompt(0, ids(tok, "0101101="), {"bits": x})
    assert task(tok).score(prompt, ids(tok, completion)) == answer_reward
    assert task(tok, reward="chain").score(prompt, ids(tok, completion)) == chain_reward


def test_bad_parity_settings(tok):
    with pytest.raises(ValueError, match="max_tokens"):
        task(tok, d=16, max_tokens=10)


def test_both_phases_write_table_and_plots(tmp_path):
    """`rptfast train parity` as `make demo` runs it, shortened; in a subprocess because a vLLM engine
    that shuts down tears down vLLM's process-global groups, which the session's engine still uses."""
    sets = [f"train.out_dir={tmp_path / 'run'}", "data.parity_d=6", "rollout.max_tokens=8", "rollout.max_model_len=32",
            "train.ntp_steps=6", "train.steps=3", "train.ntp_sequences=32", "train.prompts_per_step=4", "rollout.n=4",
            "train.eval_every=3", "train.eval_prompts=16", "train.warmup_steps=0", "log.progress=false"]
    r = subprocess.run([sys.executable, "-m", "rptfast", "train", "parity", *[a for s in sets for a in ("--set", s)]],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    rows = read_jsonl(run)
    assert [r["phase"] for r in rows] == ["init"] + ["ntp"] * 6 + ["rl"] * 3
    assert all(np.isfinite(r["loss"]) for r in rows[1:])
    evals = [r["step"] for r in rows if "eval/greedy_acc" in r]
    assert evals == [0, 3, 6, 9]
    table = (run / "parity_table.txt").read_text()
    assert "after NTP (step 6)" in table and "after RL (step 9)" in table
    assert table in r.stdout  # printed at the end
    for png in ("parity_accuracy.png", "parity_length.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "final" / "config.json").exists() and (run / "init" / "tokenizer.json").exists()


def test_rl_phase_same_with_and_without_shared_prompts(tmp_path):
    """The demo shortened, once with prompt-once packing (the default) and once without, same seeds: the
    same metrics within float noise (the later steps sample from weights that AdamW moved by float noise
    in near-zero gradients, so those rewards are held to a sampling tolerance, not equality)."""
    sets = ["data.parity_d=6", "rollout.max_tokens=8", "rollout.max_model_len=32", "train.ntp_steps=6",
            "train.steps=3", "train.ntp_sequences=32", "train.prompts_per_step=4", "rollout.n=4",
            "train.eval_prompts=16", "train.warmup_steps=0", "log.progress=false", "log.tensorboard=false"]
    logs = {}
    for share in ("true", "false"):
        out = tmp_path / share
        args = [*sets, f"train.out_dir={out}", f"train.share_prompts={share}"]
        cmd = [sys.executable, "-m", "rptfast", "train", "parity", *[a for s in args for a in ("--set", s)]]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        logs[share] = read_jsonl(out)
    shared, unshared = logs["true"], logs["false"]
    assert [r["phase"] for r in shared] == [r["phase"] for r in unshared] == ["init"] + ["ntp"] * 6 + ["rl"] * 3
    for a, b in zip(shared[1:7], unshared[1:7]):  # next-token phase: duplicated prompts share too
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["trained_tokens"] <= b["trained_tokens"]
    first_a, first_b = shared[7], unshared[7]  # first RL step: same weights up to float noise, same samples
    for key in ("reward", "response_len", "accuracy"):
        assert first_a[key] == first_b[key], key
    for key in ("loss", "entropy", "grad_norm", "ratio_mean"):
        assert first_a[key] == pytest.approx(first_b[key], rel=1e-3, abs=1e-6), key
    saved = first_b["trained_tokens"] - first_a["trained_tokens"]  # prompts of 7 tokens, once instead of 4 times
    assert saved >= 4 * 3 * 7 and saved % 7 == 0  # more where two of the 4 prompts are the same bits
    for a, b in zip(shared[8:], unshared[8:]):
        assert a["reward"] == pytest.approx(b["reward"], abs=0.1)
        assert a["mismatch_max"] < 1e-4 and b["mismatch_max"] < 1e-4
