"""Reading a corpus as a stream of documents: plain text, JSONL, Parquet, `datasets` directories.

Formats, by what a path is:
- `*.txt`: one document per file (prepare.txt_unit = "file"), one per blank-line-separated
  paragraph ("paragraph", the lines of a paragraph joined, its last newline dropped), or one
  per non-blank line ("line", its newline dropped);
- a directory of `*.txt` files (searched recursively, in sorted path order), each read as above;
- `*.jsonl`: one JSON object per line, text in the field prepare.text_field;
- `*.parquet`: text in the column prepare.parquet_column, read a record batch at a time;
- a directory written by `datasets.Dataset.save_to_disk`: the Arrow IPC stream files listed in
  its state.json, column prepare.parquet_column, read with pyarrow (no `datasets` dependency).
  A DatasetDict directory (dataset_dict.json, one folder per split) is refused: name the split.

Memory stays flat in corpus size: one document (a whole file only for txt_unit = "file") or
one record batch is held at a time. `count_documents` counts what `documents` will yield
without decoding or parsing a record (Parquet from its metadata), for the progress bar's total
and for choosing held-out documents across the whole corpus.

What a path cannot give at all (it is missing, its format is unknown, its text field or
column is absent from the file, a column is not a string column) is a `CorpusError` before
any work starts, with the fix in the message; the CLI exits 2 on it. A record that cannot
give a document is yielded with `skip` set to the reason (invalid_utf8, bad_json,
missing_field, not_text, empty, empty_file) and counted in the manifest, never dropped
silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rptfast.errors import ConfigError, FileFormatError, PathError

BATCH_ROWS = 256  # rows per record batch read from Parquet


class CorpusError(ConfigError):
    """A corpus path that cannot be read as asked: the message names the path and the fix."""


@dataclass
class Source:
    path: str  # as given on the command line (document ids start with it)
    format: str  # txt | jsonl | parquet | datasets
    files: list[Path]  # the path itself, or the Arrow files of a datasets directory


@dataclass
class Document:
    index: int  # ordinal in the corpus stream; skipped documents count
    doc_id: str  # "<path>#<record>" (the path alone for a whole-file text document)
    text: str | None  # None when skipped
    skip: str | None = None  # why there is no text


def open_sources(paths: list[str], cfg) -> list[Source]:
    """Check every corpus path before any work starts; cfg is the prepare section."""
    if not paths:
        raise CorpusError("no corpus given: pass --corpus PATH [PATH ...]")
    return [_source(p, cfg) for p in paths]


def _source(path: str, cfg) -> Source:
    p = Path(path)
    if not p.exists():
        raise PathError(f"corpus path {path!r} does not exist; check --corpus")
    try:
        return _open(p, path, cfg)
    except (pa.ArrowException, UnicodeDecodeError) as e:  # ArrowInvalid, ArrowIOError (an OSError too)
        raise FileFormatError(f"corpus path {path!r} cannot be read: {e}; it is truncated or not what its name "
                              f"says: replace it or leave it out of --corpus") from None
    except OSError as e:
        raise PathError(f"corpus path {path!r} cannot be read ({e.strerror}); check its permissions") from None


def _open(p: Path, path: str, cfg) -> Source:
    if p.is_dir():
        if (p / "dataset_dict.json").is_file():
            splits = sorted(x.name for x in p.iterdir() if (x / "state.json").is_file())
            raise CorpusError(f"{path!r} is a DatasetDict (splits: {', '.join(splits)}); pass one split's "
                              f"directory, e.g. {str(p / (splits[0] if splits else 'train'))!r}")
        if not (p / "state.json").is_file():
            texts = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() == ".txt")
            if texts:
                return Source(path, "txt", texts)
            raise CorpusError(f"{path!r} is a directory with no .txt files and not one written by datasets' "
                              f"save_to_disk (no state.json); pass the text, JSONL or Parquet files themselves")
        state = json.loads((p / "state.json").read_text())
        if state.get("_indices_data_files"):
            raise CorpusError(f"{path!r} was saved with an indices mapping (an old `datasets` select/shuffle); "
                              f"re-save it with dataset.flatten_indices().save_to_disk(...)")
        names = [f["filename"] for f in state.get("_data_files", [])]
        for name in names:
            if Path(name).name != name or not (p / name).is_file():
                raise CorpusError(f"{path!r}: state.json lists {name!r}, which is not a file in the directory")
        files = [p / name for name in names]
        if files:
            with pa.memory_map(str(files[0])) as src:
                _check_column(pa.ipc.open_stream(src).schema, cfg.parquet_column, path, "datasets directory")
        return Source(path, "datasets", files)
    suffix = p.suffix.lower()
    if suffix == ".txt":
        return Source(path, "txt", [p])
    if suffix == ".jsonl":
        _check_jsonl(p, path, cfg.text_field)
        return Source(path, "jsonl", [p])
    if suffix == ".parquet":
        _check_column(pq.read_schema(p), cfg.parquet_column, path, "Parquet file")
        return Source(path, "parquet", [p])
    raise CorpusError(f"cannot tell the format of {path!r}: give .txt, .jsonl or .parquet files or a directory "
                      f"written by datasets' save_to_disk")


def _check_column(schema: pa.Schema, column: str, path: str, what: str) -> None:
    if column not in schema.names:
        raise CorpusError(f"{what} {path!r} has no column {column!r} (columns: {', '.join(schema.names)}); "
                          f"set --set prepare.parquet_column=NAME")
    typ = schema.field(column).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)):
        raise CorpusError(f"{what} {path!r}: column {column!r} is {typ}, not text; "
                          f"set --set prepare.parquet_column to a string column")


def _check_jsonl(p: Path, path: str, field: str) -> None:
    """The first record that parses as a JSON object must have the text field."""
    with p.open("rb") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                if field not in record:
                    raise CorpusError(f"JSONL file {path!r}: record {number} has no field {field!r} (fields: "
                                      f"{', '.join(record)}); set --set prepare.text_field=NAME")
                return


def documents(sources: list[Source], cfg, start: int = 0) -> Iterator[Document]:
    """Every document of the corpus in order, from ordinal `start` on (earlier ones are read, not yielded)."""
    index = 0
    for src in sources:
        for doc_id, text, skip in _records(src, cfg):
            if index >= start:
                yield Document(index, doc_id, text, skip)
            index += 1


def _records(src: Source, cfg) -> Iterator[tuple[str, str | None, str | None]]:
    """(doc_id, text, skip reason) per record; one ("path", None, "empty_file") for a file without records."""
    if src.format == "txt":  # a file (named as given) or a directory's files (named by their paths)
        for f in src.files:
            yield from _txt_records(f, src.path if src.files == [Path(src.path)] else str(f), cfg)
        return
    n = 0
    if src.format == "jsonl":
        with src.files[0].open("rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                n += 1
                yield (f"{src.path}#{number}", *_json_text(line, cfg.text_field))
    else:
        for column in _columns(src, cfg.parquet_column):
            for value in column:
                n += 1
                yield f"{src.path}#{n - 1}", *_text_value(value)
    if n == 0:
        yield src.path, None, "empty_file"


def _txt_records(f: Path, name: str, cfg) -> Iterator[tuple[str, str | None, str | None]]:
    """One text file's documents by prepare.txt_unit; one (name, None, "empty_file") for a file without any."""
    n = 0
    if cfg.txt_unit == "file":
        data = f.read_bytes()
        if data.strip():
            n += 1
            yield (name, *_decode(data))
    else:
        for data in (_paragraphs(f) if cfg.txt_unit == "paragraph" else _lines(f)):
            n += 1
            yield (f"{name}#{n - 1}", *_decode(data))
    if n == 0:
        yield name, None, "empty_file"


def count_documents(sources: list[Source], cfg) -> int:
    """How many documents `documents` yields (skipped ones included), without decoding any."""
    total = 0
    for src in sources:
        if src.format == "txt":
            for f in src.files:
                if cfg.txt_unit == "file":
                    n = 1
                else:
                    n = sum(1 for _ in (_paragraphs(f) if cfg.txt_unit == "paragraph" else _lines(f)))
                total += max(n, 1)
            continue
        if src.format == "jsonl":
            with src.files[0].open("rb") as fh:
                n = sum(1 for line in fh if line.strip())
        elif src.format == "parquet":
            n = pq.ParquetFile(src.files[0]).metadata.num_rows
        else:
            n = 0
            for f in src.files:
                with pa.memory_map(str(f)) as mm:
                    n += sum(batch.num_rows for batch in pa.ipc.open_stream(mm))
        total += max(n, 1)
    return total


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                yield line.removesuffix(b"\n").removesuffix(b"\r")


def _paragraphs(path: Path) -> Iterator[bytes]:
    lines: list[bytes] = []
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield b"".join(lines).removesuffix(b"\n")
                lines = []
    if lines:
        yield b"".join(lines).removesuffix(b"\n")


def _decode(data: bytes) -> tuple[str | None, str | None]:
    try:
        return _text_value(data.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "invalid_utf8"


def _json_text(line: bytes, field: str) -> tuple[str | None, str | None]:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    except ValueError:
        return None, "bad_json"
    if not isinstance(record, dict):
        return None, "bad_json"
    if field not in record:
        return None, "missing_field"
    return _text_value(record[field])


def _text_value(value) -> tuple[str | None, str | None]:
    if not isinstance(value, str):
        return None, "not_text"
    if not value.strip():
        return None, "empty"
    return value, None


def _columns(src: Source, column: str) -> Iterator[list]:
    """Record batches of one column; damage found only while reading (a corrupt page) names the file."""
    try:
        yield from _batches(src, column)
    except pa.ArrowException as e:
        raise FileFormatError(f"corpus path {src.path!r} is damaged ({e}); replace it or leave it out of --corpus, "
                              f"then run the same prepare again (it resumes)") from None


def _batches(src: Source, column: str) -> Iterator[list]:
    if src.format == "parquet":
        for batch in pq.ParquetFile(src.files[0]).iter_batches(batch_size=BATCH_ROWS, columns=[column]):
            yield batch.column(0).to_pylist()
        return
    for f in src.files:
        with pa.memory_map(str(f)) as mm:
            reader = pa.ipc.open_stream(mm)
            _check_column(reader.schema, column, src.path, "datasets directory")
            for batch in reader:
                yield batch.column(column).to_pylist()
