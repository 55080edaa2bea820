"""Where output files go and how they get there: names that never come from a header unchecked, and
writes that are all or nothing.

A header value (SOP Instance UID, patient ID, file name in an upload) is attacker-controlled data:
`output_path` turns it into one harmless name component, adds a short digest of what identifies
the source (so two sources that share a UID, or whose values sanitise alike, never overwrite each
other, while a rerun on the same source lands on the same name) and proves the result resolves
inside the output folder. `write_atomic` (and `AtomicFile`, for a writer that streams) writes to a hidden temporary
file in the same folder, flushes it to disk and renames it into place: a crash leaves the old file or the new one,
never half.
numpy-free and torch-free: used by io, serve and the DICOM node alike.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from medtriage.errors import InputError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

MAX_COMPONENT = 96  # characters of the readable part; the digest and suffix come on top
DIGEST_CHARS = 10
PARTIAL_SUFFIX = ".partial"  # temporary files are hidden (leading dot) and end in this
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_component(value: object, fallback: str = "unnamed") -> str:
    """`value` as one file-name component: letters, digits, '.', '_' and '-' only, no leading dot (so never '.', '..'
    or hidden) nor dash (a shell's `*` would hand it to a command as an option), at most MAX_COMPONENT characters;
    `fallback` when nothing is left."""
    text = _UNSAFE.sub("_", str(value or "")).lstrip("._-")[:MAX_COMPONENT].rstrip("._")
    return text or fallback


def source_digest(source: object) -> str:
    """A short hex digest of what identifies a source (its path, content key or bytes)."""
    data = source if isinstance(source, (bytes, bytearray, memoryview)) else str(source).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]


def output_path(out_dir: str | Path, stem: object, suffix: str, *, source: object | None = None, fallback: str = "unnamed") -> Path:
    """`out_dir/<safe stem>[.<digest of source>]<suffix>`, guaranteed to lie directly inside `out_dir`.

    `stem` is usually a header value; `source` (path, content key or bytes of the input) keeps
    outputs of different inputs apart. Without `source`, a stem that sanitising changed gets the
    digest of its original value, so distinct stems never share a name. `suffix` is program-chosen (e.g. '.SR.dcm') but checked too."""
    if not re.fullmatch(r"(\.[A-Za-z0-9_-]+)*", suffix):
        raise ValueError(f"output suffix {suffix!r} must be dot-separated letters, digits, '_' or '-'")
    safe = safe_component(stem, fallback)
    if source is None and safe != str(stem):
        source = str(stem)  # a stem that had to change carries a digest of its original: no two collapse into one
    digest = f".{source_digest(source)}" if source is not None else ""
    name = f"{safe}{digest}{suffix}"
    return inside(out_dir, name)


def inside(out_dir: str | Path, name: str) -> Path:
    """`out_dir/name`, refused unless it resolves to a direct child of `out_dir` (links included)."""
    folder = Path(out_dir).resolve()
    target = (folder / name).resolve()
    if target.parent != folder or name in ("", ".", ".."):
        raise InputError(
            f"output name {name!r} would leave the output folder",
            where=str(folder),
            hint="names are built from sanitised header values; report this file to the maintainers",
        )
    return target


class AtomicFile:
    """A file that appears at `path` whole or not at all, for writers that stream into it: `file` is a hidden
    temporary file in the same folder; `commit()` flushes it to disk and renames it over `path`; `discard()`, or a
    crash before the commit, leaves `path` as it was."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=PARTIAL_SUFFIX, dir=self.path.parent)
        self.temporary = Path(temporary)
        self.file: BinaryIO = os.fdopen(handle, "wb")

    def sync_and_close(self) -> None:
        """The temporary file's bytes on disk, before it takes the place of anything; once (a writer may sync early,
        outside a lock its commit then takes)."""
        if self.file.closed:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def commit(self, private: bool = False) -> Path:
        try:
            self.sync_and_close()
            if not private:
                os.chmod(self.temporary, PUBLIC_MODE)  # mkstemp makes 0600; give it what open() would
            os.replace(self.temporary, self.path)
        except BaseException:
            self.discard()
            raise
        sync_folder(self.path.parent)
        return self.path

    def discard(self) -> None:
        self.file.close()
        self.temporary.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | Callable[[BinaryIO], object], private: bool = False) -> Path:
    """Write `data` (bytes, or a function that writes to a binary file) to `path` all or nothing (`AtomicFile`);
    `private`: readable by its owner only (0600) from the first byte, for secrets."""
    target = AtomicFile(path)
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            target.file.write(data)
        else:
            data(target.file)
    except BaseException:
        target.discard()
        raise
    return target.commit(private)


def write_atomic_unsynced_folder(path: str | Path, data: bytes) -> Path:
    """`write_atomic` less its folder sync, for a writer that commits many files at once (group commit): `path` holds
    all of `data`, its bytes on disk before its name appears, or what it held before, never part; the rename itself
    is on disk only once the caller has synced the folder (`sync_folder`), which it must do before anything names
    the file as written."""
    target = AtomicFile(path)
    try:
        target.file.write(data)
        target.sync_and_close()
        os.chmod(target.temporary, PUBLIC_MODE)  # mkstemp makes 0600; give it what open() would
        os.replace(target.temporary, target.path)
    except BaseException:
        target.discard()
        raise
    return target.path


def copy_atomic(source: str | Path, path: str | Path) -> Path:
    """The file `source` copied to `path` all or nothing, in chunks (never whole in memory)."""
    with open(source, "rb") as original:
        return write_atomic(path, lambda target: shutil.copyfileobj(original, target))


def write_csv_atomic(path: str | Path, columns: list[str], rows: Iterable[dict]) -> Path:
    """`rows` as a CSV file with a header of `columns` (a row with a key outside them is an error), all or nothing."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return write_atomic(path, text.getvalue().encode())


# How a spreadsheet recognises a formula (or DDE) in a cell: a sign, or a tab or CR, first. It may trim leading blanks
# and read full-width signs as their ASCII forms before deciding what a cell is.
_FORMULA_LIKE = re.compile(r"[\t\r]|\s*[=+\-@\uff1d\uff0b\uff0d\uff20\ufe62\ufe63\ufe66]")
_PLAIN_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")  # '-0.5' is a number, not a formula


def spreadsheet_text(value):
    """A CSV cell for people: text from headers and paths is untrusted, and a cell that starts like a formula would
    run when the CSV is opened in a spreadsheet, so it is prefixed with ' to stay text. (Not for CSVs the program
    reads back.) Numbers and None stay as they are; anything else (a Path, a header value object) is written as its
    text, so it is checked as text."""
    if value is None or isinstance(value, (int, float)):
        return value
    text = str(value)
    if _PLAIN_NUMBER.match(text):
        return value
    return "'" + text if _FORMULA_LIKE.match(text) else value


def spreadsheet_row(row: dict) -> dict:
    """A CSV row for people: every cell through `spreadsheet_text`."""
    return {key: spreadsheet_text(value) for key, value in row.items()}


def write_new(path: str | Path, data: bytes) -> bool:
    """Write `data` to `path` readable by its owner only (0600), unless `path` exists: for secrets made on first use.
    Written whole to a temporary file (`AtomicFile`, 0600 until committed), then hard-linked into place, which fails
    when another writer got there first (theirs stands: two processes never end up using two different secrets).
    Returns whether this call wrote it."""
    target = AtomicFile(path)
    try:
        target.file.write(data)
        target.sync_and_close()
        os.link(target.temporary, target.path)
    except FileExistsError:
        return False
    finally:
        target.discard()  # the temporary name only: a link in place keeps the data
    sync_folder(target.path.parent)
    return True


def remove_partials(folder: str | Path) -> int:
    """Delete temporary files a killed writer left in `folder` (not recursive); returns how many. A folder with such a
    name (a bundle's staging folder) is not a writer's file: it stays."""
    removed = 0
    for leftover in Path(folder).glob(f".*{PARTIAL_SUFFIX}"):
        if leftover.is_dir() and not leftover.is_symlink():
            continue
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed


# A filesystem that cannot sync a folder at all says so with these; it keeps renames in order without being asked.
_FOLDER_SYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


def sync_folder(folder: str | Path) -> None:
    """Put the renames in `folder` on disk (POSIX). Raises OSError when the disk reports a failure (EIO, ENOSPC): the
    names may be lost at a power cut, so no caller may answer success. Skipped where folders cannot be opened (Windows)
    or synced (`_FOLDER_SYNC_UNSUPPORTED`)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _FOLDER_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0o022)  # read once at import: os.umask is process-wide and not thread-safe
    os.umask(mask)
    return mask


_UMASK = _read_umask()
PUBLIC_MODE = 0o666 & ~_UMASK  # what open() gives a new file


def try_lock(descriptor: int, shared: bool = False) -> bool | None:
    """Whether `descriptor` now holds flock's lock (exclusive, or `shared`) without waiting: False when another
    process holds one in its way, None where there are no such locks (no fcntl, some network shares)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(descriptor, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP: a file system without locks
        return None
    return True


def hold_exclusive(path: Path, busy: Callable[[str], Exception]) -> int | None:
    """A descriptor of `path` (made if missing) holding flock's exclusive lock, this process's pid written in it for
    the next one's refusal: `busy(holder pid)` is raised when another process holds it. The lock goes when the
    descriptor is closed or the process ends, however it ends. None where there are no such locks (Windows, some
    network shares): the work goes on unlocked there, as every other lock of the project does."""
    if fcntl is None:
        return None
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = try_lock(descriptor)
        if locked is False:
            raise busy(os.read(descriptor, 32).decode("ascii", "replace").strip() or "unknown")
    except BaseException:
        os.close(descriptor)
        raise
    if locked is None:
        os.close(descriptor)
        return None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return descriptor


@contextmanager
def held_exclusive(path: Path, busy: Callable[[str], Exception]) -> Iterator[None]:
    """`hold_exclusive` for the length of a `with` block: the lock goes when the block ends, however it ends."""
    descriptor = hold_exclusive(path, busy)
    try:
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)
