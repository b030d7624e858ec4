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
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class UserError(Exception):
    """Bad input the user can fix; the CLI prints the message and exits 2."""


class ConfigError(UserError, ValueError):
    """A bad config value or command line: the message names the key and the fix."""


class PathError(UserError, FileNotFoundError):
    """A path that is missing, of the wrong kind (a file for a directory) or not writable."""


class FileFormatError(UserError, ValueError):
    """A file that exists but cannot be read as what it should be (truncated, corrupt, not UTF-8)."""


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
