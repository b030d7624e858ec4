"""LoRA against full fine-tuning on one model: the weight sync (bytes moved, time) and the copies of the base.

    python bench/lora_sync.py MODEL_DIR [--rank 16] [--repeats 5] [--csv bench/results/lora_sync.csv]

Three in-process vLLM engines on MODEL_DIR, in its dtype, side by side in one process (a CPU KV cache of 1 GiB
each; an engine shut down mid-process would tear down the others' groups):
- full: what a full fine-tuning run's sync does after each step, update_weights with every HF parameter
  (the engine reloads them layer by layer, and on the CPU repacks each linear weight for oneDNN);
- lora, plain layout (model.lora_share_base = true): update_adapter with the rank-r adapters of every linear
  layer of the decoder (B random, so the swap does real work); the trainer's frozen base is then made of
  views of this engine's tensors (model.lora.share_base): the bytes shared are counted;
- lora, oneDNN layout (model.lora_share_base = false): the same sync; the CPU backend's packed weights
  cannot be viewed, so the trainer keeps its own copy of the base: the two-copy cost.
Each sync is timed `repeats` times after one warm-up (median), and generation (8 prompts x 8 samples x 16
tokens) once per engine after a warm-up, since the plain layout trades oneDNN's GEMMs for torch's.
Prints a table; the last line is JSON; rows are appended to the CSV with device, commit and date.
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
          "base_shared_mb", "generate_s", "note"]


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


def generate_s(engine) -> float:
    from rptfast.rollout import SamplingConfig

    prompts = [[(7 * i + j) % 1000 + 10 for j in range(24)] for i in range(8)]
    sampling = SamplingConfig(temperature=1.0, max_tokens=16)
    engine.generate(prompts, 8, sampling, seeds=list(range(8)))  # warm-up
    t0 = time.perf_counter()
    engine.generate(prompts, 8, sampling, seeds=list(range(8)))
    return time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="HF model directory (e.g. rptfast convert gguf smollm2 --out DIR)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", type=Path, default=ROOT / "bench" / "results" / "lora_sync.csv")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from rptfast import config
    from rptfast.model import lora, native_dtype
    from rptfast.rollout.vllm_engine import VLLMEngine

    dtype = native_dtype(args.model, False)
    cfg = config.from_dict({"model": {"path": args.model, "lora_rank": args.rank}})
    lm = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
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
                     base_shared_mb=0.0, generate_s=generate_s(full), note="every parameter, reloaded and repacked"))
    for share in (True, False):
        engine = VLLMEngine(args.model, lora=lora.engine_config(cfg.model), share_base=share, **engine_kw)
        nbytes = [0]

        def adapter_sync(engine=engine, nbytes=nbytes):
            nbytes[0] = engine.update_adapter(lora.adapter_tensors(lm, dtype))

        ms = median_ms(adapter_sync, args.repeats)
        trainer_lm = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        lora.add_adapters(trainer_lm, cfg.model, torch.float32)
        shared, total = lora.share_base(trainer_lm, engine.base_tensor)
        layout = "plain (torch GEMM)" if share else "oneDNN packed"
        rows.append(dict(engine=f"lora r={args.rank}, {layout}", sync_mb=nbytes[0] / 2**20, sync_ms=ms,
                         base_mb=total / 2**20, base_shared_mb=shared / 2**20, generate_s=generate_s(engine),
                         note="adapters only; trainer base = engine tensors" if share else
                         "adapters only; trainer keeps its own base"))
        del trainer_lm
    for r in rows:
        r["sync_gbps"] = r["sync_mb"] * 2**20 / 1e9 / (r["sync_ms"] / 1e3)
    print(f"# {stamp['device']}, {args.model}, {dtype}, {args.repeats} syncs each (median)")
    header = ["engine", "sync MB", "sync ms", "GB/s", "base MB", "shared MB", "generate s"]
    table = [header] + [[r["engine"], f"{r['sync_mb']:.1f}", f"{r['sync_ms']:.1f}", f"{r['sync_gbps']:.2f}",
                         f"{r['base_mb']:.0f}", f"{r['base_shared_mb']:.0f}", f"{r['generate_s']:.2f}"] for r in rows]
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
