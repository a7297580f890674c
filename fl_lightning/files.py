"""Files written all at once and durably, and files read only if they are plain files."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class NotAFile(OSError):
    """A path that is a FIFO, a device or a folder where a plain file belongs."""


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading if it is a plain file; NotAFile (an OSError) otherwise.

    Opened without blocking and checked on the open descriptor: a FIFO put where a run's
    file belongs would make a plain `open` wait forever for a writer.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise NotAFile(f"{path} is not a plain file")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def write_atomically(path: Path, write: Callable[[Path], None], mode: int = 0o666) -> None:
    """Replace `path` with what `write(temporary_path)` writes, durably and all at once.

    The temporary file, in the same folder, is created exclusively with `mode` (less the
    umask), written, fsynced and renamed over `path`, then the folder is fsynced: after a
    crash or power loss `path` is the old file or the whole new one. On any failure the
    temporary file is removed and `path` is untouched.
    """
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    try:
        write(partial)
        descriptor = os.open(partial, os.O_RDWR)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (its directory entry)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # not possible on this platform: the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
