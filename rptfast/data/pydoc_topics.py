"""`rptfast corpus pydoc --out FILE`: a real corpus on every machine, from the standard library.

`pydoc_data.topics.topics` holds the Python Language Reference's topics as plain text (79
topics, about 465 kB with Python 3.11), the help() pages of keywords and symbols. They are
written as JSONL, one document per topic in sorted topic order, `{"text": ..., "topic": ...}`:
the format `rptfast prepare --corpus` reads natively (the text under prepare.text_field's
default "text"; the topic name rides along and prepare ignores it). Any other text goes
through prepare the same way: write it as JSONL with a "text" field, or as .txt files.

`--max-chars N` keeps each topic's first lines up to N characters (whole lines; a topic whose
first line is longer keeps that line): every topic stays, each shorter. The topics run from 57 to
15,122 SmolLM2 tokens (113k in all), and the proxy of `prepare` reads every token, so this is what
sizes prepare's time; `make demo-real` uses 2,000 (26k tokens). Left out: choosing topics by
name (a cut keeps all 79 kinds of text, the short keyword pages and the long tables alike).

The text is the running Python's: another Python version ships other topics, so record the
version (the command prints it) with results made from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from rptfast.errors import ConfigError, atomic_path


def topics() -> dict[str, str]:
    from pydoc_data.topics import topics as table

    return dict(sorted(table.items()))


def head(text: str, max_chars: int) -> str:
    """The first whole lines of `text` within max_chars characters (at least its first line); 0 = all of it."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars + 1)
    return text[:cut] if cut > 0 else text.split("\n", 1)[0]


def write_corpus(path: str | Path, max_chars: int = 0) -> tuple[Path, int, int]:
    """Write the topics (each cut to max_chars, 0 = whole) as JSONL to `path` (a temporary name, then renamed);
    return (path, documents, bytes)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ConfigError(f"--out {str(path)!r}: the pydoc corpus is JSONL; name the file *.jsonl")
    if path.is_dir():
        raise ConfigError(f"--out {str(path)!r} is a directory; give a file path ending in .jsonl")
    if max_chars < 0:
        raise ConfigError(f"--max-chars ({max_chars}) must be >= 0 (0 keeps every topic whole)")
    docs = {name: head(text, max_chars) for name, text in topics().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": text, "topic": name}, ensure_ascii=False) + "\n" for name, text in docs.items()]
    with atomic_path(path, needed=sum(len(line.encode("utf-8")) for line in lines)) as tmp:
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(lines)
    return path, len(docs), sum(len(t.encode("utf-8")) for t in docs.values())
