"""rptfast's command line: `rptfast train` (more subcommands land as they work).

Exit codes: 0 done, 2 bad command line or config (the message names the key and the fix).
"""

from __future__ import annotations

import argparse
import os
import sys

from rptfast.config import ConfigError


def _quiet() -> None:
    """Library chatter off; rptfast prints one line per step."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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

    args = parser.parse_args(argv)
    _quiet()
    try:
        from rptfast import config

        if args.command == "train":
            from rptfast.trainer import train

            train(config.load(args.config, args.set), resume=args.resume)
    except (ConfigError, FileNotFoundError) as e:
        print(f"rptfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
