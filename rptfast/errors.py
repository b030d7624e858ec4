"""The errors rptfast reports to a user, and the one place (cli.py) that turns them into exit codes.

- `UserError` (exit 2): bad input the user can fix: a config value, a command-line flag, a path
  or a file. The message is one line that names the key or path and the fix. Subclasses say
  which kind: `ConfigError` (a value), `PathError` (a path that is missing, of the wrong kind
  or not writable), `FileFormatError` (a file that exists but cannot be read as what it should
  be: truncated, corrupt, not UTF-8).
- `TrainingStopped` (exit 3): the run cannot go on correctly (the engine samples from other
  weights than the trainer's, say); nothing is saved for the step that raised it, and the last
  complete checkpoint is left untouched. `NonFiniteError` is the case of non-finite numbers.

Library errors (safetensors, Arrow, OS, Unicode) are translated where a file is opened, by the
code that knows which key or path it was: never by a catch-all at the top, which would turn
rptfast's own bugs into "bad input".

A full disk is translated in one place, `writing` (and `atomic_path`, which writes under a temporary
name and renames): every write rptfast makes runs inside it, and an out-of-space error there becomes
`DiskFullError` (exit 2; the trainer turns it into exit 3 mid-run) naming the path, the bytes needed
where the caller knows them and the bytes free, after the temporary file or directory is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


class UserError(Exception):
    """Bad input the user can fix; the CLI prints the message and exits 2."""


class ConfigError(UserError, ValueError):
    """A bad config value or command line: the message names the key and the fix."""


class PathError(UserError, FileNotFoundError):
    """A path that is missing, of the wrong kind (a file for a directory) or not writable."""


class FileFormatError(UserError, ValueError):
    """A file that exists but cannot be read as what it should be (truncated, corrupt, not UTF-8)."""


class DiskFullError(PathError):
    """A write that ran out of space (or into a quota or a file-size limit): the path, the bytes it needed where
    known, the bytes free; nothing half-written is left behind."""


class TrainingStopped(RuntimeError):
    """The run cannot go on correctly; the CLI prints the message and exits 3."""


class NonFiniteError(TrainingStopped):
    """Training produced non-finite numbers it cannot recover from."""


EXIT_USER, EXIT_STOPPED = 2, 3


def check_writable_dir(path: str | Path, what: str) -> None:
    """Refuse, before any work, a directory path that could not be created or written.

    `what` names the key or flag (e.g. "train.out_dir"). The nearest existing ancestor must be
    a directory in which a file can be created (probed with a temporary file, because
    os.access says yes to root on a read-only mount); nothing is created at `path` itself.
    """
    p = Path(path)
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        if probe.is_symlink():  # a dangling link: mkdir would fail on it
            raise PathError(f"{what} {str(path)!r}: {str(probe)!r} is a broken symlink; fix it or choose another path")
        probe = probe.parent
    if not probe.is_dir():
        hint = "is a file" if probe == p else f"is under {str(probe)!r}, which is a file"
        raise PathError(f"{what} {str(path)!r} {hint}, not a directory; choose another path")
    try:
        fd, name = tempfile.mkstemp(prefix=".rptfast-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise PathError(f"{what} {str(path)!r}: cannot write in {str(probe)!r} ({e.strerror}); "
                        f"choose a writable directory") from None


def run_script(main: Callable[[], int | None]) -> int:
    """A script's main (bench/), with a UserError (a full disk, say) as one line on stderr and exit 2, as
    the rptfast command reports it, instead of a traceback."""
    try:
        return main() or 0
    except UserError as e:
        print(f"{Path(sys.argv[0]).name}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER


def looks_like_path(name: str) -> bool:
    """A model name that can only mean a local path: absolute, starting with ".", or with more than one "/"
    (a hub name is `org/name`). Such a name that does not exist is an error at once, never a hub lookup."""
    return name.startswith((".", "/")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_model_path(path: str, key: str) -> None:
    """Refuse at once (no import, no network) a model path that looks like a path and does not exist."""
    if path and looks_like_path(path) and not Path(path).exists():
        raise PathError(f"{key} {path!r} does not exist (a local path: the hub was not asked); give a HF model "
                        f"directory (config.json + weights + tokenizer) or a hub name (org/name)")


# what a write into a full disk raises, by errno; libraries that keep only the OS's text (safetensors, Arrow) are
# matched on os.strerror(code), and torch.save reports the OSError of a Python file object as its __context__
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def full_disk_errno(e: BaseException | None) -> int | None:
    """ENOSPC, EDQUOT or EFBIG when `e` (or what it wraps, or a rank's failure in a torch.distributed.checkpoint
    CheckpointException) is a write into a full disk; else None."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FULL:
            return e.errno
        text = str(e)
        for code in FULL:
            if os.strerror(code) in text or f"os error {code})" in text:
                return code
        todo += [e.__cause__, e.__context__]
        todo += [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    return None


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return None


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n:,} bytes"


def disk_full_message(path: str | Path, code: int, needed: int | None = None) -> str:
    free = _free_bytes(Path(path))
    need = f"; it needs {_mb(needed)}" if needed else ""
    have = f", {_mb(free)} free there" if free is not None else ""
    limit = " (the process's file-size limit, ulimit -f)" if code == errno.EFBIG else ""
    return (f"cannot write {str(path)!r}: {os.strerror(code)}{limit}{need}{have}; free space or choose another "
            f"path, then run the same command again")


def remove(path: Path) -> None:
    """A file or a directory tree, gone (a missing one is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def writing(path: str | Path, needed: int | None = None, debris: Path | None = None) -> Iterator[None]:
    """Writes to `path` inside the block: a full disk becomes DiskFullError naming it (with `needed` bytes where
    the caller knows them); `debris` (a temporary file or directory) is removed on any failure."""
    try:
        yield
    except BaseException as e:
        if debris is not None:
            remove(debris)
        code = full_disk_errno(e)
        if code is None:
            raise
        raise DiskFullError(disk_full_message(path, code, needed)) from None


@contextlib.contextmanager
def appending(path: str | Path, needed: int | None = None) -> Iterator[None]:
    """Appends to the file `path` inside the block (a row of metrics.jsonl, of a results CSV): on failure it is
    cut back to its size before the block (no torn row; a file the block created is removed), and a full disk
    becomes DiskFullError (see `writing`). Write unbuffered inside it: a buffer would flush the row later."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else None
    try:
        with writing(path, needed):
            yield
    except BaseException:
        if size is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            os.truncate(path, size)
        raise


@contextlib.contextmanager
def atomic_path(final: str | Path, needed: int | None = None) -> Iterator[Path]:
    """A temporary name beside `final` to write a file or a directory under; renamed onto `final` when the block
    ends, removed (and a full disk translated, see `writing`) when it fails. A directory replaces a previous one."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    remove(tmp)
    with writing(final, needed, debris=tmp):
        yield tmp
        if tmp.is_dir() and final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
