"""`rptfast corpus pydoc --out FILE`: a real corpus on every machine, from the standard library.

`pydoc_data.topics.topics` holds the Python Language Reference's topics as plain text (79
topics, about 465 kB with Python 3.11), the help() pages of keywords and symbols. They are
written as JSONL, one document per topic in sorted topic order, `{"text": ..., "topic": ...}`:
the format `rptfast prepare --corpus` reads natively (the text under prepare.text_field's
default "text"; the topic name rides along and prepare ignores it). Any other text goes
through prepare the same way: write it as JSONL with a "text" field, or as .txt files.

The text is the running Python's: another Python version ships other topics, so record the
version (the command prints it) with results made from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rptfast.errors import ConfigError


def topics() -> dict[str, str]:
    from pydoc_data.topics import topics as table

    return dict(sorted(table.items()))


def write_corpus(path: str | Path) -> tuple[Path, int, int]:
    """Write the topics as JSONL to `path` (a temporary name, then renamed); return (path, documents, bytes)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ConfigError(f"--out {str(path)!r}: the pydoc corpus is JSONL; name the file *.jsonl")
    if path.is_dir():
        raise ConfigError(f"--out {str(path)!r} is a directory; give a file path ending in .jsonl")
    docs = topics()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for name, text in docs.items():
            f.write(json.dumps({"text": text, "topic": name}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path, len(docs), sum(len(t.encode("utf-8")) for t in docs.values())
