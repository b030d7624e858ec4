"""Peak host memory per rank while a checkpoint is taken: the sharded save (rptfast.checkpoint.save, DCP) against
the full-state gather that checkpoints did before it (get_model_state_dict / get_optimizer_state_dict with
full_state_dict and cpu_offload: the whole model and AdamW state on rank 0, before a byte is written).

    torchrun --nproc_per_node=2 bench/checkpoint_memory.py --mode dcp --out /tmp/ckpt-mem
    torchrun --nproc_per_node=2 bench/checkpoint_memory.py --mode gather --layers 4

The model is Qwen3-shaped, random, sharded with FSDP2 as the trainer does (fp32 masters; built on the meta device
and materialised after sharding, so that a rank's resident set is its shard and nothing freed before);
the default shape is bench/throughput-0.7b.toml's (28 layers, hidden 1024, vocab 151936: 0.66B parameters, 8.0 GB
of masters and moments). AdamW's state is made by DCP's own zero-gradient step. Memory is the resident set of each
rank, sampled every 5 ms from /proc (`rss`), before and at the peak of the checkpoint; the last line is JSON.
Gloo on the CPU: run it where the memory fits (`gather` holds the whole state on rank 0 on top of its shard).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import torch

from rptfast import checkpoint, distributed


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """The peak resident set while the block runs (a sampling thread)."""

    def __enter__(self):
        self.before, self.peak, self.stop = rss(), rss(), False
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def sample(self):
        while not self.stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, rss())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("dcp", "gather"), required=True)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--out", type=Path, default=Path("/tmp/rptfast-ckpt-mem"), help="checkpoint directory (dcp)")
    args = ap.parse_args()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from transformers import AutoModelForCausalLM, Qwen3Config

    d = distributed.init()
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=1024, num_hidden_layers=args.layers, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=64, intermediate_size=3072, tie_word_embeddings=False)
    with torch.device("meta"):  # no rank ever holds the whole model: its shard is made after sharding
        lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    n_params = sum(p.numel() for p in lm.parameters())
    lm = distributed.shard(lm, lm.model.layers, d).to_empty(device="cpu")
    with torch.no_grad():
        for p in lm.parameters():
            (p.to_local() if hasattr(p, "to_local") else p).normal_(0, 0.02)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-6)
    get_optimizer_state_dict(lm, opt)  # AdamW's moments exist, as after a first step
    distributed.barrier(d)
    with Peak() as p:
        if args.mode == "dcp":
            checkpoint.save(args.out, 1, lm, opt, {"cursor": 0}, d, keep=1)
        else:
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = (get_model_state_dict(lm, options=full), get_optimizer_state_dict(lm, opt, options=full))
            distributed.barrier(d)
            del state
    row = {"mode": args.mode, "rank": d.rank, "world": d.world, "params": n_params,
           "state_gb": round(n_params * 12 / 1e9, 2), "rss_before_gb": round(p.before / 1e9, 2),
           "rss_peak_gb": round(p.peak / 1e9, 2), "extra_gb": round((p.peak - p.before) / 1e9, 2),
           "seconds": round(p.seconds, 1)}
    rows = distributed.all_gather_objects(row, d)
    if d.main:
        for r in rows:
            print(f"{r['mode']}: rank {r['rank']}/{r['world']}: {r['params'] / 1e9:.2f}B params ({r['state_gb']} GB "
                  f"of masters + moments); rss {r['rss_before_gb']} GB before, peak {r['rss_peak_gb']} GB "
                  f"(+{r['extra_gb']} GB) in {r['seconds']} s")
        print(json.dumps(rows))
    distributed.shutdown()


if __name__ == "__main__":
    main()
