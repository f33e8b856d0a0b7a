"""Writing results to disk: each file complete or absent, under temporary names that
no two writers share, and failures explained.

A file is written under `.tmp-<pid>-<random>-<name>` beside its final name and renamed
into place: a reader (or a process killed mid-write) never sees half a file, and two
processes (or threads) writing the same file each rename a complete file of their own,
where one shared temporary name let one writer move the other's file away (a crash in
about 1% of simultaneous writes).
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from .errors import StoreWriteError


def _write_bytes(path: Path, data: bytes) -> None:
    """The one place nnexp's results reach the disk (tests make it fail as a full disk would)."""
    with open(path, "wb") as handle:
        handle.write(data)


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file of this writer's own."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{path.name}")
    try:
        _write_bytes(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def failure_reason(error: OSError) -> str:
    """"No space left on device", "Read-only file system", ..."""
    return error.strerror or str(error) or type(error).__name__


def failure_fix(error: OSError) -> str:
    """What the user does about a failed write."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "make the folder writable"
    return "fix that"


def check_writable(path) -> None:
    """Refuse, before a model is loaded or anything computed, a results directory that
    cannot be written: a path through a file, a read-only folder, a full disk. Writes
    (and removes) a small file in the directory, or in its closest existing parent,
    so nothing is created where nothing existed."""
    target = Path(path)
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StoreWriteError(f"cannot create the results directory {target}: {existing} is a file, not a folder; "
                              "choose another --out")
    folder = existing / "examples" if (existing == target and (existing / "examples").is_dir()) else existing
    probe = folder / f".nnexp-write-test-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        _write_bytes(probe, b"\0" * 4096)
    except OSError as error:
        raise StoreWriteError(f"cannot write results into {folder} ({failure_reason(error)}): {failure_fix(error)}, "
                              "or choose another --out") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
