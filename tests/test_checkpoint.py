"""Sharded checkpoints (torch.distributed.checkpoint): two FSDP2 ranks on gloo save; the same two ranks resume
bitwise, one process resumes resharded; the HF export of a tied model; what a checkpoint refuses to read."""

import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from transformers import AutoModelForCausalLM

from rptfast import checkpoint, distributed
from rptfast.errors import FileFormatError, PathError
from rptfast.export import export
from rptfast.model import load_policy
from rptfast.testing import make_tiny_model

FULL = StateDictOptions(full_state_dict=True)  # every rank gets every tensor whole


def build(model_dir: str, d):
    """Policy (FSDP2 over d's ranks), its AdamW and an EMA copy, as the trainer builds them."""
    def one():
        lm = load_policy(model_dir, dtype=torch.float32, attn="sdpa", trust_remote_code=False,
                         gradient_checkpointing=False)
        return distributed.shard(lm, lm.model.layers, d)
    lm, ema = one(), one().requires_grad_(False)
    return lm, torch.optim.AdamW(lm.parameters(), lr=1e-2, weight_decay=0.1), ema


def train_step(lm, opt, ema, step: int, rank: int) -> None:
    """One data-parallel step on a batch of this rank's own, then the EMA update."""
    g = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(0, 512, (2, 13), generator=g)
    lm(ids).logits.log_softmax(-1)[..., :7].mean().backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        for e, p in zip(ema.parameters(), lm.parameters()):
            e.lerp_(p, 0.25)


def full_state(lm, opt, ema) -> dict:
    """Everything a checkpoint must restore, gathered whole (a collective; fine for a tiny test model) and copied
    (unsharded tensors come back by reference: the optimizer's step counters, one rank's weights)."""
    optim = get_optimizer_state_dict(lm, opt, options=FULL)["state"]
    model, ema = get_model_state_dict(lm, options=FULL), get_model_state_dict(ema, options=FULL)
    return {"model": {k: v.clone() for k, v in model.items()}, "ema": {k: v.clone() for k, v in ema.items()},
            "optim": {f"{k}.{m}": v.clone() for k, s in optim.items() for m, v in s.items()}}


def assert_equal_states(a: dict, b: dict) -> None:
    for part in ("model", "ema", "optim"):
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def two_ranks(rank: int, port: int, model_dir: str, run_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    d = distributed.init()
    lm, opt, ema = build(model_dir, d)
    for step in range(2):
        train_step(lm, opt, ema, step, rank)
    ckpt = checkpoint.save(Path(run_dir), 2, lm, opt, {"cursor": 16}, d, keep=2, ema=ema)
    saved = full_state(lm, opt, ema)
    train_step(lm, opt, ema, 2, rank)
    after = full_state(lm, opt, ema)
    # resume in fresh objects on the same two ranks: step 3 again, bit for bit
    lm2, opt2, ema2 = build(model_dir, d)
    assert checkpoint.latest(Path(run_dir), d=d) == ckpt
    rest = checkpoint.load(ckpt, lm2, opt2, d, ema=ema2)
    assert rest == {"step": 2, "cursor": 16}
    assert_equal_states(full_state(lm2, opt2, ema2), saved)
    train_step(lm2, opt2, ema2, 2, rank)
    assert_equal_states(full_state(lm2, opt2, ema2), after)
    own = [p.name for p in ckpt.iterdir() if p.name.endswith(".distcp")]
    if rank == 0:
        with open(out, "wb") as f:
            pickle.dump({"saved": saved, "files": sorted(own)}, f)
    distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_save_and_resume_on_two_and_one(tiny_dir, tmp_path):
    """Each of 2 FSDP2 ranks writes its shards of the masters, AdamW moments and EMA; the 2 ranks resume into
    fresh objects and repeat step 3 bit for bit; one process (no FSDP) loads the same checkpoint resharded and
    holds exactly the state the two ranks saved; the HF export equals the saved masters."""
    out = tmp_path / "rank0.pkl"
    mp.start_processes(two_ranks, args=(free_port(), tiny_dir, str(tmp_path / "run"), str(out)), nprocs=2,
                       start_method="spawn")
    got = pickle.loads(out.read_bytes())
    assert got["files"] == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shard file
    d = distributed.init()
    assert d.world == 1
    lm, opt, ema = build(tiny_dir, d)
    ckpt = checkpoint.latest(tmp_path / "run", d=d)
    assert checkpoint.load(ckpt, lm, opt, d, ema=ema)["step"] == 2
    assert_equal_states(full_state(lm, opt, ema), got["saved"])
    hf = AutoModelForCausalLM.from_pretrained(export(ckpt, tmp_path / "hf"), dtype=torch.float32)
    for name, w in hf.state_dict().items():
        assert torch.equal(w, got["saved"]["model"][name]), name


def test_tied_model_checkpoint_and_export(tmp_path):
    """A tied lm_head (SmolLM2, Qwen3-0.6B) is the embedding under a second name: the checkpoint stores it once,
    the resume leaves it tied (one parameter, the moved values, its moments); the bf16 export has no lm_head
    tensor, says bfloat16 in config.json, and loads tied in transformers."""
    tied = make_tiny_model(tmp_path / "tied", vocab=512, layers=1, seed=4, tie_word_embeddings=True)
    d = distributed.init()
    lm, opt, ema = build(str(tied), d)
    train_step(lm, opt, ema, 0, 0)
    ckpt = checkpoint.save(tmp_path / "run", 1, lm, opt, {}, d, keep=2, ema=ema)
    keys = checkpoint._Reader(ckpt).read_metadata().state_dict_metadata
    assert "model.model.embed_tokens.weight" in keys and not any("lm_head" in k for k in keys)
    lm2, opt2, ema2 = build(str(tied), d)
    checkpoint.load(ckpt, lm2, opt2, d, ema=ema2)
    assert lm2.lm_head.weight is lm2.model.embed_tokens.weight and ema2.lm_head.weight is ema2.model.embed_tokens.weight
    assert_equal_states(full_state(lm2, opt2, ema2), full_state(lm, opt, ema))
    hf_dir = export(ckpt, tmp_path / "hf", torch.bfloat16)
    from safetensors.torch import load_file

    stored = load_file(hf_dir / "model.safetensors")
    assert "lm_head.weight" not in stored and all(t.dtype == torch.bfloat16 for t in stored.values())
    assert '"dtype": "bfloat16"' in (hf_dir / "config.json").read_text()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert torch.equal(hf.lm_head.weight, lm.model.embed_tokens.weight.detach().bfloat16().float())


def test_export_shards_and_refusals(tiny_dir, tmp_path, capsys):
    """Output files of at most shard_bytes with their index; a damaged checkpoint, an older-format one on
    --resume, and a .metadata that unpickles anything but DCP's classes are refused with the path named."""
    from rptfast import cli

    d = distributed.init()
    lm, opt, ema = build(tiny_dir, d)
    ckpt = checkpoint.save(tmp_path / "run", 1, lm, opt, {}, d, keep=2)
    (tmp_path / "run" / "config.toml").write_text(f'[model]\npath = "{tiny_dir}"\n')
    sharded = export(ckpt, tmp_path / "sharded", shard_bytes=200_000)
    index = (sharded / "model.safetensors.index.json").read_text()
    files = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(files) > 2 and all(f in index for f in files)
    hf = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)
    for name, w in get_model_state_dict(lm).items():
        assert torch.equal(hf.state_dict()[name], w), name
    assert cli.main(["export", str(ckpt), "--out", str(tmp_path / "cli")]) == 0
    assert "wrote" in capsys.readouterr().out
    # an older-format checkpoint: --resume refuses it, export converts it
    old = tmp_path / "run" / "checkpoints" / "step_000000"
    old.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, old / "model.safetensors")
    checkpoint.write_manifest(old, checkpoint._entries(old, ["model.safetensors"]))
    with pytest.raises(PathError, match="older rptfast.*rptfast export"):
        checkpoint.load(old, lm, opt, d)
    AutoModelForCausalLM.from_pretrained(export(old, tmp_path / "old-hf"))
    # a tampered .metadata
    bad = tmp_path / "run" / "checkpoints" / "step_000001"
    (bad / ".metadata").write_bytes(pickle.dumps(os.system))
    with pytest.raises(FileFormatError, match="posix.system|nt.system"):
        checkpoint._Reader(bad).read_metadata()
    assert cli.main(["export", str(bad), "--out", str(tmp_path / "bad")]) == 2
    assert "is damaged (.metadata has" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
