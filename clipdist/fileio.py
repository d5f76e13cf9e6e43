"""Writes that never leave a half-written file behind: readers see the old version or the new."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is flushed to disk and
    renamed over ``path`` (atomic on POSIX), on failure removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_text(text)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable before anything points at its result."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """``target`` becomes ``source``'s content: a hard link (no second copy of a large file), or a
    copy where links fail (another file system, or one without hard links)."""
    Path(target).unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
