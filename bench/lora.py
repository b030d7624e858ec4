"""LoRA against full fine-tuning on one model: the weight sync (bytes moved, time), the copies of the base,
generation, and the trainer's forward and backward.

    python bench/lora.py MODEL_DIR [--rank 16] [--repeats 5] [--csv bench/results/lora.csv]

Three in-process vLLM engines on MODEL_DIR, in its dtype, side by side in one process (a CPU KV cache of 1 GiB
each; an engine shut down mid-process would tear down the others' groups):
- full: what a full fine-tuning run's sync does after each step, update_weights with every HF parameter
  (the engine reloads them layer by layer, and on the CPU repacks each linear weight for oneDNN);
- lora, plain layout (VLLMEngine(plain_cpu_weights=True): the linear weights in vLLM's own layout, which is
  CUDA's, run by torch's GEMM): update_adapter with the rank-r adapters of every linear layer of the decoder
  (B random, so the swap does real work); the trainer's frozen base is then made of views of this engine's
  tensors (model.lora.share_base): the bytes shared are counted;
- lora, oneDNN layout (the CPU default): the same sync; the packed linear weights cannot be viewed, so the
  trainer shares the embedding and norms only and keeps its own copy of the rest: the two-copy cost.
Each sync is timed `repeats` times after one warm-up (median), and generation (8 prompts of 150 tokens x 8
samples x 8 tokens, RPT's shape) `repeats` times after a warm-up, since the plain layout trades oneDNN's
GEMMs for torch's and LoRA adds its branch. Then the trainer: one micro-batch (6 sequences of 200 tokens,
the last 8 scored) through the fused policy loss, forward and backward, full fine-tuning and LoRA
interleaved `repeats` times (medians), since a shared machine's load changes between runs.
Prints tables; the last line is JSON; rows are appended to the CSV with device, commit and date.
"""

import argparse
import csv
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ["date", "commit", "device", "model", "engine", "rank", "sync_mb", "sync_ms", "sync_gbps", "base_mb",
          "base_shared_mb", "generate_s", "forward_s", "backward_s", "note"]


def git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip() or "unknown"


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def generate_s(engine, repeats: int, vocab: int) -> float:
    from rptfast.rollout import SamplingConfig

    prompts = [[(7 * i + 13 * j) % (vocab - 10) + 10 for j in range(150)] for i in range(8)]
    sampling = SamplingConfig(temperature=0.8, max_tokens=8)
    return median_ms(lambda: engine.generate(prompts, 8, sampling, seeds=list(range(8))), repeats) / 1e3


def update_s(model_dir: str, model_cfg, repeats: int, vocab: int) -> dict[str, tuple[float, float]]:
    """{"full" | "lora": (forward s, backward s)}: medians, the two interleaved."""
    from rptfast.model import PolicyLogprob, Sequence, collate, load_policy, lora, resolve_attn

    g = torch.Generator().manual_seed(0)
    seqs = [Sequence(torch.randint(0, vocab, (200,), generator=g).tolist(), 192, 0.5, [-1.0] * 8) for _ in range(6)]
    mb = collate(seqs, list(range(6)), torch.device("cpu"))
    attn = resolve_attn("auto", torch.device("cpu"), torch.float32)
    models = {}
    for kind in ("full", "lora"):
        lm = load_policy(model_dir, dtype=torch.float32, attn=attn, trust_remote_code=False,
                         gradient_checkpointing=False)
        if kind == "lora":
            lora.add_adapters(lm, model_cfg, torch.float32)
            for _, p in lora.adapter_params(lm):
                p.data.normal_(0, 0.01, generator=g)
        models[kind] = PolicyLogprob(lm)
    times = {k: ([], []) for k in models}
    for _ in range(repeats + 1):  # the first round warms up
        for kind, m in models.items():
            t0 = time.perf_counter()
            loss = m(mb, 1.0, loss=dict(old_logprobs=None, advantages=mb.advantages, mask=mb.mask))[0]
            t1 = time.perf_counter()
            loss.backward()
            times[kind][0].append(t1 - t0)
            times[kind][1].append(time.perf_counter() - t1)
            m.zero_grad(set_to_none=True)
    return {k: (statistics.median(f[1:]), statistics.median(b[1:])) for k, (f, b) in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="HF model directory (e.g. rptfast convert gguf smollm2 --out DIR)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", type=Path, default=ROOT / "bench" / "results" / "lora.csv")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from rptfast import config
    from rptfast.model import lora, native_dtype
    from rptfast.rollout.vllm_engine import VLLMEngine

    dtype = native_dtype(args.model, False)
    cfg = config.from_dict({"model": {"path": args.model, "lora_rank": args.rank}})
    lm = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    vocab = lm.config.vocab_size
    lora.add_adapters(lm, cfg.model, torch.float32)
    g = torch.Generator().manual_seed(0)
    for _, p in lora.adapter_params(lm):
        p.data = torch.randn(p.shape, generator=g) * 0.01  # B != 0: the adapter changes the model
    base_bytes = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if not lora.is_adapter(n))
    full_names = [(lora.base_name(n), p) for n, p in lm.named_parameters() if not lora.is_adapter(n)]
    engine_kw = dict(dtype=dtype, seed=0, max_model_len=256)
    rows = []
    stamp = dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), commit=git_commit(),
                 device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", model=args.model,
                 rank=args.rank)

    full = VLLMEngine(args.model, **engine_kw)
    sent = [0]

    def full_sync():
        full.update_weights((n, p.detach()) for n, p in full_names)
        sent[0] = sum(p.numel() * p.element_size() for _, p in full_names)

    ms = median_ms(full_sync, args.repeats)
    rows.append(dict(engine="full (update_weights)", sync_mb=sent[0] / 2**20, sync_ms=ms, base_mb=base_bytes / 2**20,
                     base_shared_mb=0.0, generate_s=generate_s(full, args.repeats, vocab),
                     note="every parameter, reloaded and repacked"))
    engines = [full]  # all kept alive: a released engine shuts down the process-wide groups the others use
    for share in (True, False):
        engine = VLLMEngine(args.model, lora=lora.engine_config(cfg.model), plain_cpu_weights=share, **engine_kw)
        engines.append(engine)
        nbytes = [0]

        def adapter_sync(engine=engine, nbytes=nbytes):
            nbytes[0] = engine.update_adapter(lora.adapter_tensors(lm, dtype))

        ms = median_ms(adapter_sync, args.repeats)
        trainer_lm = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        lora.add_adapters(trainer_lm, cfg.model, torch.float32)
        shared, total = lora.share_base(trainer_lm, engine.base_tensor)
        layout = "plain (torch GEMM)" if share else "oneDNN packed"
        rows.append(dict(engine=f"lora r={args.rank}, {layout}", sync_mb=nbytes[0] / 2**20, sync_ms=ms,
                         base_mb=total / 2**20, base_shared_mb=shared / 2**20,
                         generate_s=generate_s(engine, args.repeats, vocab),
                         note="adapters only; trainer base = engine tensors" if share else
                         "adapters only; trainer keeps its own linear weights"))
        del trainer_lm
    for r in rows:
        r["sync_gbps"] = r["sync_mb"] * 2**20 / 1e9 / (r["sync_ms"] / 1e3)
    update = update_s(args.model, cfg.model, args.repeats, vocab)
    rows[0]["forward_s"], rows[0]["backward_s"] = update["full"]
    rows[1]["forward_s"], rows[1]["backward_s"] = update["lora"]
    print(f"# {stamp['device']}, {args.model}, {dtype}, {args.repeats} syncs each (median)")
    header = ["engine", "sync MB", "sync ms", "GB/s", "base MB", "shared MB", "generate s", "fwd s", "bwd s"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    table = [header] + [[r["engine"], f"{r['sync_mb']:.1f}", f"{r['sync_ms']:.1f}", f"{r['sync_gbps']:.2f}",
                         f"{r['base_mb']:.0f}", f"{r['base_shared_mb']:.0f}", f"{r['generate_s']:.2f}",
                         fmt(r.get("forward_s")), fmt(r.get("backward_s"))] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new = not args.csv.exists()
    with args.csv.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**stamp, **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}})
    print(json.dumps({**stamp, "dtype": str(dtype), "rows": rows}))


if __name__ == "__main__":
    sys.exit(main())
