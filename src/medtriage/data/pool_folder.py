"""A pool folder's files, and who may write them: builders of one pool take turns on its lock (`pool_lock`), and each
writer holds a claim on its temporary pixel file until it commits, so that a killed build's leftovers (as large as the
pool) can be told from a live writer's file and removed (`remove_stale_partials`).
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from medtriage.errors import InputError
from medtriage.io.safe_output import PARTIAL_SUFFIX, AtomicFile, try_lock

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks
    fcntl = None
MANIFEST_FILE, REJECTS_FILE, LABELS_FILE, PIXELS_FILE = "manifest.csv", "rejects.csv", "labels.json", "pixels.f32"
LOCK_FILE = ".pool.lock"
CLAIM_ATTEMPTS = 3  # a new pixel file removed before its writer could claim it is replaced; again and again is an error
_held = threading.local()  # the pool locks this thread holds, so that a builder's own writer takes its lock again


@contextmanager
def pool_lock(pool_dir: str | Path) -> Iterator[None]:
    """Held while a pool folder is built or published. Builders of one pool started side by side (cross-validation
    folds, DDP ranks, two users) take turns, so each later one finds the pool the one before it finished (and reuses
    it when current), and two writers never interleave their renames (one's manifest over the other's pixels).
    Re-entrant within a thread. Where no lock can be had (no fcntl, a folder that cannot be written or locked), the work
    goes on unlocked: a pool that cannot be written is not built there either."""
    handle = _open_lock(Path(pool_dir))
    if handle is None:
        yield
        return
    try:
        status = os.fstat(handle)
        key, held = (status.st_dev, status.st_ino), _held.__dict__.setdefault("keys", set())
        if key in held or not _lock(handle, pool_dir):
            yield
            return
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
    finally:
        os.close(handle)  # releases the lock


def _open_lock(pool_dir: Path) -> int | None:
    if fcntl is None:
        return None
    try:
        pool_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):  # read-only: a pool of another user's, to reuse
        try:
            return os.open(pool_dir / LOCK_FILE, flags, 0o666)
        except OSError:
            continue
    return None


def _lock(handle: int, pool_dir: str | Path) -> bool:
    """Whether `handle` holds the pool's lock, waited for while another build holds it (False: a file system without
    locks)."""
    locked = try_lock(handle)
    if locked is False:
        print(f"pool {pool_dir}: another build of it is under way; waiting for it to finish", flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
    return locked is not None


def _holds_lock(pool_dir: Path) -> bool:
    """Whether this thread holds the pool's lock, not merely went on where none could be had."""
    try:
        status = os.stat(pool_dir / LOCK_FILE)
    except OSError:
        return False
    return (status.st_dev, status.st_ino) in _held.__dict__.get("keys", set())


def remove_stale_partials(pool_dir: str | Path) -> int:
    """Delete the temporary files that killed builds of the pool left in its folder; returns how many. A pixel file
    is removed only when no writer claims it (`_claim`): writers started side by side each stream into their own,
    under the pool lock or not. The pool's other files are written only under the lock, so while this thread holds
    it, any other is a leftover. Where files cannot be locked, a live file cannot be told from a stale one: all stay."""
    pool_dir = Path(pool_dir)
    if fcntl is None:
        return 0
    locked = _holds_lock(pool_dir)
    removed = 0
    for leftover in pool_dir.glob(f".*{PARTIAL_SUFFIX}"):
        if (locked or leftover.name.startswith(f".{PIXELS_FILE}.")) and _remove_unclaimed(leftover):
            removed += 1
    return removed


def _remove_unclaimed(path: Path) -> bool:
    """Remove `path` unless a writer holds its claim; the lock taken here keeps a writer from claiming it meanwhile."""
    try:
        handle = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)  # for writing: NFS locks it exclusively only so
    except OSError:  # gone, a link, a folder, or not ours to open
        return False
    try:
        status = os.fstat(handle)
        if not stat.S_ISREG(status.st_mode):  # a folder of that name (a staging folder) is no writer's file
            return False
        if not try_lock(handle):  # claimed, or a file system without locks
            return False
        if file_identity(os.stat(path, follow_symlinks=False)) != file_identity(status):  # renamed into place meanwhile
            return False
        path.unlink()
        return True
    except OSError:  # gone meanwhile
        return False
    finally:
        os.close(handle)


def new_pixel_file(pool_dir: Path) -> tuple[AtomicFile, IO[bytes] | None]:
    """A writer's temporary pixel file and its claim on it, a lock held until the writer is done with the file."""
    for _attempt in range(CLAIM_ATTEMPTS):
        pixels = AtomicFile(pool_dir / PIXELS_FILE)
        try:
            return pixels, _claim(pixels.temporary)
        except FileNotFoundError:  # another build removed it as stale before this writer held its claim
            pixels.discard()
    raise InputError(
        f"each of {CLAIM_ATTEMPTS} new temporary pixel files was removed before it could be written",
        where=pool_dir,
        hint="something else in this folder deletes hidden files; build the pool in a folder of its own",
    )


def _claim(path: Path) -> IO[bytes] | None:
    """An open handle on `path` holding a shared lock: while it is open, `_remove_unclaimed` leaves the file alone,
    and the kernel releases it when the writer dies, however it dies. None where files cannot be locked."""
    if fcntl is None:
        return None
    handle = open(path, "rb")  # its own open file: the writer's handle is closed before the commit, this one after
    try:
        fcntl.flock(handle, fcntl.LOCK_SH)  # waits out a remover that locked it first; it then finds it gone
    except OSError:  # a file system without locks: nothing is removed there either
        handle.close()
        return None
    if os.fstat(handle.fileno()).st_nlink == 0:
        handle.close()
        raise FileNotFoundError(path)
    return handle


def file_identity(status: os.stat_result) -> tuple:
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
