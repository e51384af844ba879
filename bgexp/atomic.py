"""The one atomic writer: files that must survive a kill are written whole or not at all.

Every writer puts its bytes into a temporary file in the target's own folder (so that the rename
stays on one file system), flushes and fsyncs it, and renames it over the target with `os.replace`
(atomic on POSIX and Windows). A reader, or a run killed at any moment, sees either the previous
file or the new one, never a truncated one; on failure the temporary file is removed and the old
file is left as it was. Temporary names are `.<name>.<pid>.<token>.tmp`: hidden, and without the
target's suffix, so that a temporary file left by a kill -9 matches neither `chunk_*` nor
`*.ckpt`-style globs. Files get the usual permissions (umask), as a plain `open(path, "w")` gives.

A leaf module: imports nothing of bgexp.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Union

import numpy as np

Writer = Union[bytes, str, Callable[[IO[bytes]], None]]


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform opens folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path` for writers that need a file name (OpenMM states, DCD files,
    Lightning checkpoints). When the block ends normally the file is fsynced and renamed onto
    `path`; when it raises, the temporary file is removed and `path` is untouched. The folder is
    created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:  # on disk before the rename makes it the file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Writer) -> Path:
    """Write `path` atomically (see the module docstring) and return it as a Path.

    `write` is the content (bytes, or str written as UTF-8) or a callable that writes it into the
    open binary file it is given (e.g. ``lambda f: np.savez(f, x=x)``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            if isinstance(write, str):
                f.write(write.encode("utf-8"))
            elif isinstance(write, (bytes, bytearray, memoryview)):
                f.write(write)
            elif callable(write):
                write(f)
            else:
                raise TypeError(f"atomic_write({path}): write must be bytes, str or a callable that takes "
                                f"a binary file, got {type(write).__name__}")
            f.flush()
    return path


def json_safe(value: Any) -> Any:
    """`value` with what JSON cannot hold replaced: non-finite floats become None (null), numpy
    scalars and arrays become Python numbers and lists, tuples become lists (dicts and lists are
    converted recursively; anything else is returned as it is)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2,
                      sort_keys: bool = False) -> Path:
    """`obj` as JSON (through `json_safe`: non-finite floats as null, numpy scalars converted),
    written atomically; returns the path."""
    return atomic_write(path, json.dumps(json_safe(obj), indent=indent, sort_keys=sort_keys))
