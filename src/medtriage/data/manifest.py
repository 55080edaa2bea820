"""The pooled manifest: one row per image, plus a decoded-array cache so training never decodes twice.

On disk (`<pool_dir>/`):
- `manifest.csv`  one row per image (columns in `COLUMNS`, extra columns allowed)
- `rejects.csv`   one row per input that did not make it, with its reason
- `labels.json`   label names, index = class id
- `pixels.f32`    every image's decoded pixels (float32 in [0, 1], C*H*W each, concatenated);
                  row `i` lives at `offset` with shape (`channels`, `height`, `width`)
- `.pool.lock`, `.*.partial`  the pool's lock and writers' temporary files (`medtriage.data.pool_folder`)

The manifest hash (sha256 of `manifest.csv`) is the data fingerprint a training run records. A loaded manifest reads
only the pixel file it was loaded with: a pool built again meanwhile is refused, never read as the old rows' images.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtriage.data.pool_folder import (
    LABELS_FILE,
    MANIFEST_FILE,
    PIXELS_FILE,
    REJECTS_FILE,
    file_identity,
    new_pixel_file,
    pool_lock,
    remove_stale_partials,
)
from medtriage.errors import DataNotFoundError, InputError, printable
from medtriage.io.safe_output import write_atomic, write_csv_atomic
from medtriage.optional import optional_import

pd = optional_import("pandas")  # not in the torch-free install: needed once a pool is read or summarised

COLUMNS = [
    "site",
    "patient_id",
    "study_uid",
    "series_uid",
    "sop_uid",
    "path",
    "label",
    "split",
    "fingerprint",
    "channels",
    "height",
    "width",
    "offset",
]
REJECT_COLUMNS = ["site", "path", "reason"]
TEXT_COLUMNS = ("site", "patient_id", "study_uid", "series_uid", "sop_uid", "path", "split", "fingerprint")
SPLITS = ("train", "val", "test")
READ_ATTEMPTS = 3  # a pool published while it is read is read again; one that keeps changing is refused


def pixel_fingerprint(pixels: np.ndarray) -> str:
    """Content hash of decoded pixels (shape included), to spot duplicates and changed files."""
    digest = hashlib.sha256(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels, dtype=np.float32).tobytes())
    return digest.hexdigest()[:32]


@dataclass
class Reject:
    site: str
    path: str
    reason: str


class PoolWriter:
    """Streams images into a pool folder; `close()` writes the manifest. Counts in = rows + rejects.

    All or nothing: the pixels stream into a hidden temporary file, and `close()` renames each file into place, the
    manifest (what says a pool is built) last. Until then a reader finds no pool, or the previous one whole; a killed
    build leaves only a hidden `.partial` file (which the next build of the pool removes), and one that fails inside
    `with PoolWriter(...) as writer:` not even that. Two writers of the same pool each write their own files and publish
    them in turn (`pool_lock`): the last to close is the pool, whole."""

    def __init__(self, pool_dir: str | Path, label_names: list[str]):
        self.pool_dir = Path(pool_dir)
        self.pool_dir.mkdir(parents=True, exist_ok=True)
        self.label_names = list(label_names)
        self.rows: list[dict] = []
        self.rejects: list[Reject] = []
        remove_stale_partials(self.pool_dir)  # before this build's own file: a killed build's is as large as the pool
        self._pixels, self._claim = new_pixel_file(self.pool_dir)
        self._offset = 0

    def __enter__(self) -> PoolWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is not None:  # a build that failed: its pixels, as large as the pool, go with it
            self._pixels.discard()
            self._release()

    def _release(self) -> None:
        if self._claim is not None:
            self._claim.close()
            self._claim = None

    def add(self, pixels: np.ndarray, **row) -> dict:
        """Add one decoded image (`[C, H, W]` float in [0, 1]) with its manifest fields."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if pixels.ndim != 3 or not pixels.size:  # an image without pixels would be refused as damaged once written
            raise ValueError(f"pixels must be [C, H, W] with no side 0, got shape {pixels.shape}")
        c, h, w = pixels.shape
        row = {**row, "channels": c, "height": h, "width": w, "offset": self._offset}
        row.setdefault("fingerprint", pixel_fingerprint(pixels))
        self._pixels.file.write(pixels.tobytes())
        self._offset += pixels.size
        self.rows.append(row)
        return row

    def reject(self, site: str, path: str | Path, reason: str) -> None:
        self.rejects.append(Reject(site, str(path), reason))

    def close(self) -> Manifest:
        self._pixels.sync_and_close()  # the slow part, before the lock
        with pool_lock(self.pool_dir):
            # The files cannot all be renamed at once: the old manifest goes first, so that until the new one is in
            # place a reader finds no pool, never the old rows over the new pixels (offsets into another build's images)
            (self.pool_dir / MANIFEST_FILE).unlink(missing_ok=True)
            try:
                self._pixels.commit()
            finally:
                self._release()
            write_atomic(self.pool_dir / LABELS_FILE, json.dumps(self.label_names).encode())
            write_csv_atomic(self.pool_dir / REJECTS_FILE, REJECT_COLUMNS, [vars(r) for r in self.rejects])
            extra = sorted({k for r in self.rows for k in r} - set(COLUMNS))
            write_csv_atomic(self.pool_dir / MANIFEST_FILE, COLUMNS + extra, self.rows)
            return load_manifest(self.pool_dir)


@dataclass
class Manifest:
    """A pool folder, read back. `rows` is a pandas DataFrame (one row per image)."""

    pool_dir: Path
    rows: object  # pandas.DataFrame
    rejects: object  # pandas.DataFrame
    label_names: list[str]
    fingerprint: str
    _pixels: np.ndarray | None = field(default=None, repr=False)
    pixel_identity: tuple | None = field(default=None, repr=False)  # of the pixel file the rows were read with

    @property
    def sites(self) -> list[str]:
        return sorted(self.rows["site"].unique())

    def split(self, name: str) -> object:
        """Rows of one split (`train`, `val` or `test`)."""
        return self.rows[self.rows["split"] == name]

    def pixels(self) -> np.ndarray:
        """The whole pixel cache, flat float32 mapped into memory (nothing read yet): the file these rows were read
        with, never a later build's (whose images at the same offsets are other images)."""
        if self._pixels is None:
            self._pixels = _map_pixels(self.pool_dir / PIXELS_FILE, self.pixel_identity)
        return self._pixels

    def image(self, index: int) -> np.ndarray:
        """Decoded pixels of manifest row `index` as float32 `[C, H, W]`, read from the cache."""
        row = self.rows.iloc[index]
        c, h, w, offset = (int(row[k]) for k in ("channels", "height", "width", "offset"))
        return np.array(self.pixels()[offset : offset + c * h * w]).reshape(c, h, w)

    def images(self, indices: Iterable[int]) -> Iterator[np.ndarray]:
        for i in indices:
            yield self.image(int(i))

    def summary(self) -> str:
        """Per-site counts by split and label, and rejects, as a printable table."""
        table = pd.crosstab([self.rows["site"], self.rows["split"]], self.rows["label"].map(lambda i: self.label_names[int(i)]))
        text = f"pool {self.pool_dir} ({len(self.rows)} images, fingerprint {self.fingerprint[:12]})\n{table}"
        if len(self.rejects):
            kind = self.rejects["reason"].str.split(" (", n=1, regex=False).str[0].rename("reason")  # details vary per file
            text += f"\nrejected {len(self.rejects)}:\n{self.rejects.groupby(['site', kind]).size().to_string()}"
        return text


def manifest_hash(pool_dir: str | Path) -> str:
    return hashlib.sha256((Path(pool_dir) / MANIFEST_FILE).read_bytes()).hexdigest()


def load_manifest(pool_dir: str | Path) -> Manifest:
    """Read a pool folder written by `PoolWriter`. Writers publish one at a time, pixels before the manifest, so a
    read between two looks at the same pixel file saw that file's manifest; one that saw the pixels replaced is done
    again, and the manifest keeps the file's identity to read no other."""
    pool_dir = Path(pool_dir).resolve()
    for _attempt in range(READ_ATTEMPTS):
        before = _pixel_identity(pool_dir)
        manifest = _read_pool(pool_dir, before)
        if _pixel_identity(pool_dir) == before:
            return manifest
    raise InputError(
        f"the pool was built again each of the {READ_ATTEMPTS} times it was read",
        where=pool_dir,
        hint="wait for the builds of this pool to finish, then run again",
    )


def _read_pool(pool_dir: Path, pixel_identity: tuple | None) -> Manifest:
    where = pool_dir / MANIFEST_FILE
    try:
        text = where.read_bytes()  # once: the rows, the header check and the fingerprint all come from these bytes
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataNotFoundError(
            "no pooled manifest here",
            where=pool_dir,
            hint="build it first: `python scripts/make_sites.py`, `python scripts/ingest_sites.py`, then `python scripts/build_pool.py`, "
            "or point data.pool_dir at an existing pool",
        ) from None
    # Identifiers are text exactly as written: pandas would make site "01" the number 1, series "1.20" the float 1.2,
    # and a patient pseudonymised "NA" missing (then no group, so the leakage audit would not see that patient).
    header = list(_read_csv(where, io.BytesIO(text), header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0])
    if repeated := sorted({c for c in header if header.count(c) > 1}):  # pandas would read the second as 'label.1'
        raise _damaged(f"manifest header names columns {repeated} twice", where)
    rows = _read_csv(
        where,
        io.BytesIO(text),
        dtype={c: str for c in TEXT_COLUMNS},
        keep_default_na=False,
        na_values={c: [""] for c in header if c not in TEXT_COLUMNS},  # other columns: empty = missing, as before
    )
    rejects = _read_rejects(pool_dir / REJECTS_FILE)
    label_names = _read_label_names(pool_dir)
    _check_rows(rows, label_names, pool_dir, stored=pixel_identity[2] // 4 if pixel_identity else 0)
    fingerprint = hashlib.sha256(text).hexdigest()
    return Manifest(pool_dir, rows, rejects, label_names, fingerprint, pixel_identity=pixel_identity)


def _pixel_identity(pool_dir: Path) -> tuple | None:
    """What tells one pixel file from the next build's: a rebuild renames a new file (another inode) into place."""
    try:
        status = os.stat(pool_dir / PIXELS_FILE)
    except OSError:
        return None
    return file_identity(status) if stat.S_ISREG(status.st_mode) else None


def _map_pixels(path: Path, identity: tuple | None) -> np.ndarray:
    """The pixel file mapped into memory (nothing read yet), refused unless it is the one the rows were read with."""
    try:
        with open(path, "rb") as f:
            if identity is None or file_identity(os.fstat(f.fileno())) == identity:
                return np.memmap(f, dtype=np.float32, mode="r")  # the mapping keeps this file, whatever replaces it
    except FileNotFoundError:
        pass
    raise InputError(
        f"{PIXELS_FILE} changed since this manifest was read: the pool was built again, and its pixels belong to other rows",
        where=path,
        hint="load the pool again (start the run again) to use the new build; keep one pool folder per build to use both",
    )


# A pool folder is data on disk that anyone may have edited or cut short: what training and serving rely on is
# checked on reading, so a damaged pool is refused with the row at fault rather than failing later or training wrong.
INTEGER_COLUMNS = {"label": 0, "channels": 1, "height": 1, "width": 1, "offset": 0}  # column -> smallest valid value


def _damaged(reason: str, where: Path) -> InputError:
    return InputError(reason, where=where, hint=f"the pool is damaged or was edited by hand; delete {where.parent} and build it again")


def _read_csv(path: Path, source, **options):
    """A pool CSV file (read from `source`: its path or its bytes) as a table; one cut short to nothing, left with an
    open quote or not UTF-8 is refused as damaged."""
    try:
        return pd.read_csv(source, **options)
    except ValueError as err:  # pandas' EmptyDataError and ParserError, and UnicodeDecodeError, are ValueErrors
        raise _damaged(f"not a readable CSV file ({printable(str(err))})", path) from err


def _read_rejects(path: Path):
    if not path.exists():
        return pd.DataFrame(columns=REJECT_COLUMNS)
    rejects = _read_csv(path, path, dtype=str, keep_default_na=False)
    if missing := [c for c in REJECT_COLUMNS if c not in rejects.columns]:
        raise _damaged(f"the rejects table lacks its column(s) {missing}", path)
    return rejects


def _read_label_names(pool_dir: Path) -> list[str]:
    try:
        names = json.loads((pool_dir / LABELS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _damaged(f"label names unreadable ({err})", pool_dir / LABELS_FILE) from err
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _damaged("label names must be a non-empty JSON list of strings", pool_dir / LABELS_FILE)
    return names


def _check_rows(rows, label_names: list[str], pool_dir: Path, stored: int) -> None:
    """`stored`: how many float32 values the pixel file holds."""
    where = pool_dir / MANIFEST_FILE
    missing = [c for c in COLUMNS if c not in rows.columns]
    if missing:
        raise _damaged(f"manifest lacks columns {missing}", where)
    numbers = {}
    for column, smallest in INTEGER_COLUMNS.items():
        values = pd.to_numeric(rows[column], errors="coerce")
        largest = len(label_names) - 1 if column == "label" else np.inf
        bad = values.isna() | (values % 1 != 0) | (values < smallest) | (values > largest)
        span = f"{smallest}..{largest}" if column == "label" else f">= {smallest}"
        _refuse(bad, rows[column], f"{column} not an integer {span}", where)
        numbers[column] = values.astype(np.float64)
    _refuse(~rows["split"].isin(SPLITS), rows["split"], f"split not one of {', '.join(SPLITS)}", where)
    # Where each image ends, in floats: an offset or side of 2**64 would wrap around as an int64 (to a negative offset
    # that reads another image's pixels) and a product of large sides would overflow. Every value is at least 0, so
    # once every end lies within the cache, each value does and the int64 conversion below is exact.
    ends = numbers["offset"] + numbers["channels"] * numbers["height"] * numbers["width"]
    _refuse(ends > stored, ends.map(int), f"pixels ending past the {stored} values stored in {PIXELS_FILE}", where)
    for column, values in numbers.items():
        rows[column] = values.astype(np.int64)
    _refuse_shared_pixels(rows["offset"].to_numpy(), ends.astype(np.int64).to_numpy(), where)


def _refuse_shared_pixels(starts: np.ndarray, ends: np.ndarray, where: Path) -> None:
    """Each row's pixels are its own (the writer appends every image): an offset edited to point into another row's
    pixels would give that row another image silently. Sorted by offset, no image may begin before the previous ends."""
    order = np.argsort(starts, kind="stable")
    clashes = np.flatnonzero(starts[order][1:] < ends[order][:-1])
    if len(clashes):
        row, other = int(order[clashes[0] + 1]), int(order[clashes[0]])
        raise _damaged(
            f"pixels of line {row + 2} (offset {int(starts[row])}) overlap those of line {other + 2} ({len(clashes)} row(s) in all)",
            where,
        )


def _refuse(bad, values, what: str, where: Path) -> None:
    """Raise naming the first bad row (its line in the CSV file, the header being line 1) and how many there are."""
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        raise _damaged(f"{what}: {values.tolist()[first]!r} on line {first + 2} ({int(bad.sum())} row(s) in all)", where)
