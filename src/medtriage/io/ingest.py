"""Site-side ingest: walk a site folder, de-identify every DICOM file into the pool, quarantine
what the profile cannot make safe, and log what was done without logging who it was done to.

Pool side (what leaves the site); `<pool>/<site>/` has the shape of a site export, so the pool
builder reads it like any site folder:
- `<pool>/<site>/<MODALITY>.<sop>.dcm`   de-identified files, named by their new SOP Instance UIDs
- `<pool>/<site>/labels.csv`             the site's labels joined before de-identification, keyed by new UIDs
- `<pool>/.ingest/<site>/index.csv`      one row per source file ever seen, keyed by a keyed hash of its
                                         bytes: what makes re-ingest idempotent and incremental
- `<pool>/.ingest/<site>/logs/<run>.json`  one audit log per ingest: counts, profile, versions, time; no PHI
- `<pool>/.ingest/<site>/ingest.lock`      held for the whole ingest: a second ingest of the site is refused
Site side (never pooled), `<quarantine>/`: originals by reason plus `quarantine.csv` with source paths (a file
that cannot be read at all is listed there as `cannot_read`, and one over the size limit as `too_large`, without a
copy, and both are looked at again by the next run).

Every input file ends in exactly one place: counts in = pooled + quarantined (per reason). Files under a hidden name
(a dot first) at any depth of the site folder are not inputs (`medtriage.io.site_folder`).
Torch-free and pandas-free: a site installs only the base package.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import re
import secrets
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array
from pydicom.pixels.utils import get_expected_length
from tqdm import tqdm

from medtriage import __version__
from medtriage.arguments import positive_int, refuse_file_as_folder
from medtriage.errors import ConfigError, DataNotFoundError, ImageTooLargeError, MedTriageError
from medtriage.io.clamped import dicom_source
from medtriage.io.decode_limits import DecodeLimits, check_limits, default_limits, number_of_frames
from medtriage.io.deid import SEVERAL_ISSUERS_IDENTITY, DeidOptions, SiteKey, deidentify, load_site_key, table_library_version
from medtriage.io.encapsulation import claimed_frames, ends_with, misplaced_basic_entry
from medtriage.io.header_warnings import reading, say_header_warnings, saying_header_warnings
from medtriage.io.part10 import encode
from medtriage.io.quarantine import Unsafe, screen
from medtriage.io.safe_output import copy_atomic, output_path, remove_partials, spreadsheet_row, write_atomic, write_new
from medtriage.io.site_folder import SITE_LABELS_FILE, SiteFolder, read_site_folder
from medtriage.io.site_labels import read_site_labels, write_pool_labels
from medtriage.project import project_path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one ingest of a site at a time
    fcntl = None

INDEX_FILE, LOG_DIR, QUARANTINE_LIST = "index.csv", "logs", "quarantine.csv"
LOCK_FILE = "ingest.lock"
LEDGER_DIR = ".ingest"  # hidden: the pool builder skips it
INDEX_COLUMNS = [
    "content_key",
    "outcome",
    "reason",
    "sop_uid",
    "study_uid",
    "series_uid",
    "patient",
    "accession",
    "pixel_sha256",
    "path",
    "flag",
    "run",
]
QUARANTINE_COLUMNS = ["content_key", "reason", "detail", "source", "run"]
# Each input is read whole into a worker's memory, so its size is bounded before it is read. The bound is the decode
# limit on an image's float32 pixels: stored samples are rarely wider than that, so the pool builder could not use a
# larger file anyway.
DEFAULT_MAX_FILE_BYTES = DecodeLimits().max_decoded_bytes
_READ_STEP = 16 << 20  # how much more a file that grew since its size was read is read at a time


@dataclass
class Outcome:
    """What one worker made of one source file. `pending` files still need the duplicate check."""

    source: str
    content_key: str = ""
    status: str = "pending"  # pending | quarantined | already | unread
    reason: str = ""
    detail: str = ""
    sop_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    patient: str = ""
    accession: str = ""
    pixel_sha256: str = ""
    modality: str = ""
    identified_by_name: bool = False
    encoded: bytes = b""  # the de-identified file; the main process decides where it goes


@dataclass
class IngestSummary:
    site: str
    run: str
    counts_in: int = 0
    hidden: int = 0  # files under a hidden name, left out: not inputs, so not in counts_in
    pooled_new: int = 0
    pooled_before: int = 0
    quarantined: Counter = field(default_factory=Counter)  # reason -> count, this run and earlier
    flags: Counter = field(default_factory=Counter)
    identified_by_name: int = 0  # pooled this run by Patient's Name and birth date, for want of a Patient ID
    labels: dict = field(default_factory=dict)
    log_path: str = ""

    @property
    def pooled(self) -> int:
        return self.pooled_new + self.pooled_before

    def line(self) -> str:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.quarantined.items())) or "none"
        flags = "".join(f"; flagged {f} {n}" for f, n in sorted(self.flags.items()))
        by_name = f"; {self.identified_by_name} identified by name, not Patient ID" if self.identified_by_name else ""
        hidden = f"; left out {self.hidden} hidden file(s) (a name starting with '.')" if self.hidden else ""
        return (
            f"{self.site}: in {self.counts_in} = pooled {self.pooled} ({self.pooled_new} new) "
            f"+ quarantined {sum(self.quarantined.values())} ({reasons}){flags}{by_name}{hidden}"
        )


# ---------------------------------------------------------------- one file (runs in a worker)

_WORKER: dict = {}


def _init_worker(
    key: SiteKey,
    options: DeidOptions,
    known: frozenset,
    verify: bool,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    say_warnings: bool = False,
) -> None:
    _WORKER.update(key=key, options=options, known=known, verify=verify, max_file_bytes=max_file_bytes)
    if say_warnings and not saying_header_warnings():  # a worker started afresh (spawn), not forked from the command
        say_header_warnings()


def process_file(source: str) -> Outcome:
    """Read, screen, check and de-identify one file; the main process decides where the result goes."""
    with reading(source):  # pydicom's warnings name the file, those met after the read (de-identifying) included
        return _process_file(source, _WORKER)


def _process_file(source: str, w: dict) -> Outcome:
    try:
        data = _read_bounded(source, w["max_file_bytes"])
    except OSError as err:  # permissions, a file removed since the listing: this file only, never the run
        return Outcome(source, status="unread", reason="cannot_read", detail=f"{type(err).__name__}: {err.strerror or err}")
    if isinstance(data, Unsafe):
        return Outcome(source, status="unread", reason=data.reason, detail=data.detail)
    out = Outcome(source, content_key=w["key"].content_key(data))
    if out.content_key in w["known"]:
        out.status = "already"
        return out
    try:
        with dicom_source(data, source) as buffer:
            ds = pydicom.dcmread(buffer)
    except ImageTooLargeError as err:
        return _quarantine(out, Unsafe("too_large", str(err)))
    except InvalidDicomError:
        return _quarantine(out, Unsafe("not_dicom", "no DICOM preamble/prefix and no recognisable data set"))
    except Exception as err:  # pydicom raises many types on corrupt headers
        return _quarantine(out, Unsafe("unreadable", f"{type(err).__name__}: {err}"))
    try:
        return _deidentified(out, ds, w)
    except Exception as err:  # values pydicom parses lazily can still be malformed: this file only, never the run
        return _quarantine(out, Unsafe("unreadable", f"{type(err).__name__}: {err}"))


def _read_bounded(source: str, limit: int) -> bytes | Unsafe:
    """The file's bytes, or why it is too large to read: its size is checked first, and the read stops past the
    limit, so a file that grows after the check still costs at most the limit. (A read allocates what it asks for:
    it asks for the size found, and for the growth in steps.)"""
    hint = "raise --max-file-bytes if it is genuine"
    with Path(source).open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            return Unsafe("too_large", f"file of {size} bytes exceeds the ingest limit of {limit} bytes: {hint}")
        data = f.read(size + 1)  # one byte more shows whether it grew
        if len(data) > size:  # read on up to one byte past the limit
            while len(data) <= limit and (more := f.read(min(_READ_STEP, limit + 1 - len(data)))):
                data += more
    if len(data) > limit:
        return Unsafe("too_large", f"file grew past the ingest limit of {limit} bytes while it was read: {hint}")
    return data


def _deidentified(out: Outcome, ds, w: dict) -> Outcome:
    problem = screen(ds) or _pixel_problem(ds, w["verify"])
    if problem:
        return _quarantine(out, problem)
    out.pixel_sha256 = hashlib.sha256(ds.PixelData).hexdigest()[:32]  # stored bytes: exact copies, same encoding
    result = deidentify(ds, w["key"], w["options"])
    out.accession = str(ds.get("AccessionNumber", "") or "")
    out.modality = "".join(c for c in str(ds.get("Modality", "") or "OT") if c.isalnum())[:16] or "OT"
    out.sop_uid, out.study_uid, out.series_uid, out.patient = result.sop_uid, result.study_uid, result.series_uid, result.pseudonym
    out.identified_by_name = result.identified_by_name
    out.encoded = encode(ds)
    return out


def _quarantine(out: Outcome, problem: Unsafe) -> Outcome:
    out.status, out.reason, out.detail = "quarantined", problem.reason, problem.detail
    return out


def _pixel_problem(ds, verify: bool) -> Unsafe | None:
    """A truncated or broken file must not reach the pool. By default the check is structural (length of
    native pixels, complete fragments ending in an end-of-image marker): the pool builder decodes every
    file anyway. `verify` decodes here too, at the cost of a second decode."""
    if "PixelData" not in ds:
        name = getattr(ds.get("SOPClassUID", ""), "name", "")
        if "Image" in name or "Rows" in ds:
            return Unsafe("truncated", f"{name or 'image object'} without pixel data: the file ends early")
        return Unsafe("no_pixel_data", f"{name or 'DICOM object'} without pixel data")
    frames = _frame_count(ds)
    if isinstance(frames, Unsafe):
        return frames
    try:
        encapsulated = ds.file_meta.TransferSyntaxUID.is_encapsulated
        if verify:
            check_limits(ds, default_limits(), "ingest")  # what the header claims, before a decoder allocates it
            pixel_array(ds, allow_excess_frames=False)  # decoding is the check, of the frames the header claims
        elif encapsulated and (broken := _broken_frames(ds, frames)):
            return broken
        elif not encapsulated and len(ds.PixelData) < get_expected_length(ds, "bytes"):
            return Unsafe("truncated", f"pixel data holds {len(ds.PixelData)} of {get_expected_length(ds, 'bytes')} bytes")
        return _misplaced_table(ds, frames) if encapsulated else None
    except ImageTooLargeError as err:
        return Unsafe("too_large", str(err))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # decoder plugins raise ValueError/RuntimeError/...; Rust ones panic (BaseException)
        reason = "truncated" if "less than expected" in str(err) or "truncat" in str(err).lower() else "undecodable_pixels"
        return Unsafe(reason, f"{type(err).__name__}: {err}")


def _frame_count(ds) -> int | Unsafe:
    """Number of Frames as decoders and the pool builder take it; 0, a negative or a fraction is no count of frames (read
    as 1, one decoder would decode a frame and another all the data holds)."""
    try:
        frames = number_of_frames(ds)
    except (ValueError, TypeError) as err:
        return Unsafe("unreadable", f"Number of Frames: {err}")
    if frames < 1:
        return Unsafe("unreadable", f"Number of Frames {frames} counts no frame")
    return frames


_END_OF_IMAGE = {"1.2.840.10008.1.2.4": b"\xff\xd9"}  # JPEG, JPEG-LS and JPEG 2000 codestreams all end in FFD9


def _broken_frames(ds, claimed: int) -> Unsafe | None:
    """Frames missing, counted as the pool builder's decoders count them (io.encapsulation), or a frame's last fragment
    without its end-of-image marker: looked at where the frames lie, never copied."""
    marker = next((m for prefix, m in _END_OF_IMAGE.items() if ds.file_meta.TransferSyntaxUID.startswith(prefix)), None)
    data, found, unmarked = ds.PixelData, 0, False
    for last_fragment in claimed_frames(ds, claimed):
        found += 1
        unmarked = unmarked or (marker is not None and not ends_with(data, last_fragment, marker))
    if found < claimed:
        return Unsafe("truncated", f"{found} of {claimed} compressed frames present")
    if unmarked:
        return Unsafe("truncated", "a compressed frame lacks its end-of-image marker")
    return None


def _misplaced_table(ds, claimed: int) -> Unsafe | None:
    """A Basic Offset Table entry that is not where its frame starts: a frame read alone (as the node and scoring read
    one) would be other bytes than the whole image's, and the pool builder refuses the file."""
    misplaced = misplaced_basic_entry(ds, claimed)
    if misplaced is None:
        return None
    return Unsafe("undecodable_pixels", f"the Basic Offset Table does not point at where frame {misplaced + 1} starts")


# ---------------------------------------------------------------- the site run (main process)


def ingest_site(
    site: str,
    src: str | Path,
    pool: str | Path,
    *,
    key: SiteKey,
    options: DeidOptions | None = None,
    quarantine: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
    verify_pixels: bool = False,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    refuse_empty: bool = False,
) -> IngestSummary:
    """De-identify `src` into `<pool>/<site>/`; quarantine the rest. Re-running adds only new files. A file over
    `max_file_bytes` is listed in the quarantine as too_large, unread and not copied. `refuse_empty`: a site folder
    without inputs is refused (DataNotFoundError) before the pool is touched."""
    options = options or DeidOptions()
    src, pool = Path(src).resolve(), Path(pool).resolve()
    if not src.is_dir():
        raise DataNotFoundError("site folder not found", where=src, hint="pass the folder holding the site's DICOM export")
    if not site or any(c in site for c in "/\\") or site.startswith("."):
        raise ConfigError(f"invalid site name {site!r}", hint="use a short name such as site_a")
    site_dir, ledger_dir = pool / site, ledger_folder(pool, site)
    quarantine = Path(quarantine).resolve() if quarantine else pool.parent / f"{pool.name}-quarantine" / site
    _check_folders(src, pool, quarantine)
    for what, folder in (("pool folder (--into)", pool), ("site's pool folder", site_dir), ("quarantine folder", quarantine)):
        refuse_file_as_folder(folder, what)  # here, before the site lock: not with a traceback halfway through a run
    labels = read_site_labels(src / SITE_LABELS_FILE)  # a labels file that cannot be used stops the run before it starts
    contents = read_site_folder(src)
    if refuse_empty:
        _refuse_empty_site_folder(src, contents)
    run = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    started = time.time()
    with _site_lock(ledger_dir, site):
        _check_patient_identity(ledger_dir, options, site)
        _drop_torn_line(ledger_dir / INDEX_FILE)  # before reading: a torn row must not mark its input done
        index = _read_index(ledger_dir / INDEX_FILE)
        sources = [str(path) for path in contents.inputs]
        summary = IngestSummary(site, run, counts_in=len(sources), hidden=len(contents.hidden))
        site_dir.mkdir(parents=True, exist_ok=True)
        remove_partials(site_dir)  # temporary files of a killed run; their inputs are not in the index, so they run again
        ledger = _Ledger(site, site_dir, ledger_dir / INDEX_FILE, quarantine, run, index, _pooled_pixels(pool))
        init_args = (key, options, frozenset(index), verify_pixels, max_file_bytes, saying_header_warnings())
        for out in _map(sources, workers, progress, site, init_args):
            ledger.record(out, summary)
        ledger.close()
        rows = ledger.index.values()
        summary.flags = Counter(r["flag"].split(":")[0] for r in rows if r["flag"] and r["content_key"] in ledger.seen)
        summary.labels = write_pool_labels(labels, site_dir / SITE_LABELS_FILE, [r for r in rows if r["outcome"] == "pooled"], key)
        summary.log_path = str(_write_log(ledger_dir, summary, options, workers, started))
    return summary


@contextmanager
def _site_lock(ledger_dir: Path, site: str):
    """Held for a whole ingest of one site. A second ingest of the site at once would delete the first one's temporary
    files as a killed run's leftovers, and both would write the index: it is refused instead."""
    ledger_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(ledger_dir / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes, a killed run's too
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise MedTriageError(
                f"another ingest of site {site!r} into this pool is running (process {holder})",
                where=ledger_dir / LOCK_FILE,
                hint="wait for it to finish, then run this ingest again: it adds only what the other did not",
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def _check_patient_identity(ledger_dir: Path, options: DeidOptions, site: str) -> None:
    """A site's patients keep one pseudonym across its ingests: a rule keying them otherwise than an earlier ingest
    did would give a patient whose files carry an issuer a second pseudonym, which patient-level splits could put
    on both sides of a split."""
    wanted = options.describe()["patient_identity"]
    for used, log_path in logged_patient_identities(ledger_dir).items():
        if used != wanted:
            flag = "without --several-id-issuers" if options.several_id_issuers else "with --several-id-issuers"
            raise ConfigError(
                f"site {site!r} was ingested into this pool keying patients on {used}; this ingest keys them on {wanted}: "
                "a patient whose files carry an Issuer of Patient ID would get a second pseudonym",
                where=log_path,
                hint=f"run the ingest {flag}, as before, or ingest the site into a new pool",
            )


def logged_patient_identities(ledger_dir: str | Path) -> dict[str, Path]:
    """How the site's ingests keyed patients, by their audit logs: each rule and the first log that names it. Logs
    from before the rule was logged keyed on issuer and ID, as `--several-id-issuers` does."""
    rules: dict[str, Path] = {}
    for log_path in sorted((Path(ledger_dir) / LOG_DIR).glob("*.json")):
        try:
            used = json.loads(log_path.read_text())["deidentification"].get("patient_identity", SEVERAL_ISSUERS_IDENTITY)
        except (OSError, ValueError, LookupError, TypeError, AttributeError):
            continue  # not an audit log of this tool's: it says nothing of how the pool's patients were keyed
        rules.setdefault(str(used), log_path)
    return rules


def _check_folders(src: Path, pool: Path, quarantine: Path) -> None:
    """Identifiable originals (the site folder, the quarantine) stay out of the pool, and no output lies inside the
    site folder: the next run would read it back as input and pool every image again under new pseudonyms."""
    if quarantine.is_relative_to(pool):
        raise ConfigError("the quarantine holds identifiable originals and must not be inside the pool", where=quarantine)
    if src.is_relative_to(pool) or pool.is_relative_to(src):
        raise ConfigError("the site folder and the pool must not be inside one another", where=pool)
    if quarantine.is_relative_to(src):
        raise ConfigError("the quarantine must not be inside the site folder (a rerun would ingest it)", where=quarantine)


def ledger_folder(pool: str | Path, site: str) -> Path:
    """Where a site's ingest index and audit logs live inside the pool."""
    return Path(pool) / LEDGER_DIR / site


def _map(sources: list[str], workers: int, progress: bool, site: str, init_args: tuple):
    bar = dict(total=len(sources), desc=f"ingest {site}", unit="file", disable=not progress)
    if workers <= 1:
        _init_worker(*init_args)
        yield from tqdm(map(process_file, sources), **bar)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=init_args) as pool:
        yield from tqdm(pool.map(process_file, sources, chunksize=4), **bar)


class _Ledger:
    """Decides where each outcome ends up (in input order, so duplicates resolve the same way every time)."""

    def __init__(self, site: str, site_dir: Path, index_path: Path, quarantine: Path, run: str, index: dict, pixels: dict):
        self.site, self.site_dir, self.quarantine, self.run = site, site_dir, quarantine, run
        self.index, self.pixels = index, pixels  # content_key -> row; pixel hash -> "site/sop"
        self.sops = {r["sop_uid"] for r in index.values() if r["outcome"] == "pooled"}
        self.seen: set[str] = set()  # content keys of this run's inputs (already-ingested included)
        self._index_file = _append_csv(index_path, INDEX_COLUMNS)
        self._quarantine_file = None

    def record(self, out: Outcome, summary: IngestSummary) -> None:
        """Place one input and count it exactly once: pooled (new or before) or quarantined by reason."""
        if out.status == "unread":  # no bytes read, so no key and no copy: listed, not indexed, so the next run looks again
            self._list_quarantined(out)
            summary.quarantined[out.reason] += 1
            return
        if out.content_key in self.seen:  # the same bytes twice in this run: the second copy adds nothing
            _quarantine(out, Unsafe("duplicate_file", "byte-identical to another input of this run"))
            self._to_quarantine(out, indexed=False)
        elif out.status == "already" or out.content_key in self.index:
            row = self.index[out.content_key]
            if row["outcome"] == "pooled":
                summary.pooled_before += 1
            else:
                summary.quarantined[row["reason"]] += 1
        else:
            if out.status == "pending" and out.sop_uid in self.sops:
                _quarantine(out, Unsafe("duplicate_sop_instance", "a different file with the same SOP Instance UID is pooled"))
            if out.status == "quarantined":
                self._to_quarantine(out)
            else:
                self._to_pool(out)
                summary.pooled_new += 1
                summary.identified_by_name += out.identified_by_name
        if out.status == "quarantined":
            summary.quarantined[out.reason] += 1
        self.seen.add(out.content_key)

    def _to_pool(self, out: Outcome) -> None:
        # The site export's own layout, new UIDs; a UID the profile keeps (DICOM root) is still header data.
        target = output_path(self.site_dir, f"{out.modality}.{out.sop_uid}", ".dcm")
        write_atomic(target, out.encoded)  # never a half-written file under its final name
        relative = Path(target.name)
        self.sops.add(out.sop_uid)
        twin = self.pixels.get(out.pixel_sha256)
        flag = f"identical_pixels:{twin}" if twin else ""
        self.pixels.setdefault(out.pixel_sha256, f"{self.site}/{out.sop_uid}")
        self._write_index(out, "pooled", path=relative.as_posix(), flag=flag)

    def _to_quarantine(self, out: Outcome, indexed: bool = True) -> None:
        target = output_path(self.quarantine / out.reason, out.content_key, _kept_suffix(out.source))
        copy_atomic(out.source, target)
        self._list_quarantined(out)
        if indexed:
            self._write_index(out, "quarantined")

    def _list_quarantined(self, out: Outcome) -> None:
        if self._quarantine_file is None:
            self._quarantine_file = _append_csv(self.quarantine / QUARANTINE_LIST, QUARANTINE_COLUMNS)
        row = {"content_key": out.content_key, "reason": out.reason, "detail": out.detail, "source": out.source, "run": self.run}
        self._quarantine_file[1].writerow(spreadsheet_row(row))  # read by people
        self._quarantine_file[0].flush()  # before the index row that marks this input done

    def _write_index(self, out: Outcome, outcome: str, path: str = "", flag: str = "") -> None:
        row = {
            "content_key": out.content_key,
            "outcome": outcome,
            "reason": out.reason,
            "sop_uid": out.sop_uid,
            "study_uid": out.study_uid,
            "series_uid": out.series_uid,
            "patient": out.patient,
            "accession": out.accession,
            "pixel_sha256": out.pixel_sha256,
            "path": path,
            "flag": flag,
            "run": self.run,
        }
        self.index[out.content_key] = row
        self._index_file[1].writerow(row)
        self._index_file[0].flush()  # an interrupted run keeps what it recorded

    def close(self) -> None:
        for handle in (self._index_file, self._quarantine_file):
            if handle:
                handle[0].close()


def _kept_suffix(source: str) -> str:
    """The source's extension (so a quarantined .dcm stays one), when it is a plain one."""
    suffix = Path(source).suffix[:8]
    return suffix if re.fullmatch(r"\.[A-Za-z0-9_-]+", suffix) else ""


def _append_csv(path: Path, columns: list[str]):
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_line(path)
    new = not path.exists() or path.stat().st_size == 0
    handle = open(path, "a", newline="")
    writer = csv.DictWriter(handle, fieldnames=columns)
    if new:
        writer.writeheader()
    return handle, writer


def _drop_torn_line(path: Path) -> None:
    """A run killed mid-write may leave a last line without its newline: cut it, so the next row starts clean
    (that input is not marked done, so this run processes it again)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        start = f.seek(max(0, size - 65536))  # a row is far shorter than this
        tail = f.read()
        if not tail.endswith(b"\n"):
            f.truncate(start + tail.rfind(b"\n") + 1)


def _read_index(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {row["content_key"]: row for row in csv.DictReader(f)}


def _pooled_pixels(pool: Path) -> dict[str, str]:
    """Pixel hash -> 'site/sop' over every site already in the pool: spots the same image at two sites."""
    found: dict[str, str] = {}
    for index_path in sorted((pool / LEDGER_DIR).glob(f"*/{INDEX_FILE}")):
        for row in _read_index(index_path).values():
            if row["outcome"] == "pooled" and row["pixel_sha256"]:
                found.setdefault(row["pixel_sha256"], f"{index_path.parent.name}/{row['sop_uid']}")
    return found


def _write_log(ledger_dir: Path, summary: IngestSummary, options: DeidOptions, workers: int, started: float) -> Path:
    """The per-ingest audit log: counts, profile, versions and time. Names no patient, path or original UID."""
    log = {
        "site": summary.site,
        "run": summary.run,
        "started_utc": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 3),
        "workers": workers,
        "software": {
            "medtriage": __version__,
            "pydicom": pydicom.__version__,
            "table": table_library_version(),
            "python": platform.python_version(),
        },
        "deidentification": options.describe(),
        "counts": {
            "in": summary.counts_in,
            "hidden_left_out": summary.hidden,
            "pooled": summary.pooled,
            "pooled_new": summary.pooled_new,
            "pooled_before": summary.pooled_before,
            "quarantined": dict(summary.quarantined),
            "quarantined_total": sum(summary.quarantined.values()),
            "identified_by_name": summary.identified_by_name,
        },
        "flags": dict(summary.flags),
        "labels": summary.labels,
    }
    return write_atomic(ledger_dir / LOG_DIR / f"{summary.run}.json", json.dumps(log, indent=2).encode())


# ---------------------------------------------------------------- several sites at once


def ingest_sites(
    sites_dir: str | Path, pool: str | Path, *, keys_dir: str | Path | None = None, create_keys: bool = False, **kwargs
) -> list[IngestSummary]:
    """Ingest every `<sites_dir>/<site>/` with that site's own key `<keys_dir>/<site>.key` (default
    `<sites_dir>/.keys`). `create_keys` makes missing keys: for simulated sites; a real site makes its own."""
    sites_dir, pool = Path(sites_dir).resolve(), Path(pool).resolve()
    if not sites_dir.is_dir():
        raise DataNotFoundError("site folders not found", where=sites_dir, hint="create them with `python scripts/make_sites.py`")
    keys_dir = Path(keys_dir).resolve() if keys_dir else sites_dir / ".keys"
    if keys_dir.is_relative_to(pool):
        raise ConfigError("site keys must not live inside the pool", where=keys_dir)
    if pool.is_relative_to(sites_dir) or sites_dir.is_relative_to(pool):  # before any site is ingested, not at the pool's turn
        raise ConfigError("the site folders and the pool must not be inside one another", where=pool)
    folders = sorted(p for p in sites_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    summaries = []
    for folder in folders:
        key_file = keys_dir / f"{folder.name}.key"
        if not key_file.exists() and create_keys:
            write_new(key_file, (secrets.token_hex(32) + "\n").encode())  # a concurrent ingest's key, if first, stands
        summaries.append(ingest_site(folder.name, folder, pool, key=load_site_key(key_file), **kwargs))
    return summaries


def add_sites_arguments(parser) -> None:
    parser.add_argument("--sites", default=project_path("data/sites"), help="folder of site folders (default: %(default)s)")
    parser.add_argument("--into", default=project_path("data/pool/ingested"), help="pool folder (default: %(default)s)")
    parser.add_argument("--keys", help="folder of <site>.key secrets (default: SITES/.keys)")
    parser.add_argument("--create-keys", action="store_true", help="create missing keys (simulated sites only)")
    parser.add_argument("--workers", type=positive_int, default=1, help="worker processes per site (default 1)")
    parser.add_argument(
        "--verify-pixels",
        action="store_true",
        help="decode every image during ingest (one whose header claims more than the decode limits is quarantined as too_large, undecoded)",
    )
    _add_max_file_bytes(parser)


def _add_max_file_bytes(parser) -> None:
    parser.add_argument(
        "--max-file-bytes",
        type=positive_int,
        default=DEFAULT_MAX_FILE_BYTES,
        help="larger input files are listed in the quarantine as too_large, unread (default: %(default)s)",
    )


def run_sites(args) -> int:
    say_header_warnings()  # pydicom's, once per file and naming it
    summaries = ingest_sites(
        args.sites,
        args.into,
        keys_dir=args.keys,
        create_keys=args.create_keys,
        workers=args.workers,
        verify_pixels=args.verify_pixels,
        max_file_bytes=args.max_file_bytes,
    )
    for summary in summaries:
        print(summary.line())
    print(f"pool: {Path(args.into).resolve()}; next: python scripts/build_pool.py --sites {args.into}")
    return 0


# ---------------------------------------------------------------- `medtriage ingest`


def _refuse_empty_site_folder(src: Path, contents: SiteFolder) -> None:
    """A folder with nothing to ingest is a mistyped path or an export not copied yet, not a site with no images: an
    ingest of it would report success and leave an empty site in the pool."""
    if not contents.inputs:
        raise DataNotFoundError(
            "no files to ingest in the site folder",
            where=src,
            hint="pass the folder holding the site's DICOM export (its files may be in subfolders)",
        )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="de-identify a site's DICOM folder into the pool (quarantine the rest)",
        description="De-identify (PS3.15 Annex E basic profile + modified dates + patient "
        "characteristics) every file under SRC into POOL/SITE; unsafe files go to quarantine.",
    )
    p.add_argument("src", metavar="SRC", help="the site's DICOM export folder (labels.csv at its top, optional)")
    p.add_argument("--site", required=True, help="site name, e.g. site_a")
    p.add_argument("--into", required=True, metavar="POOL", help="pool folder (what leaves the site)")
    p.add_argument("--secret-file", help="the site's secret key file (else $MEDTRIAGE_SITE_SECRET); keep it outside the pool and SRC")
    p.add_argument("--quarantine", help="where originals that cannot be pooled go (default: POOL-quarantine/SITE)")
    p.add_argument("--workers", type=positive_int, default=1, help="worker processes (default 1)")
    p.add_argument(
        "--retain",
        default=",".join(DeidOptions().retain_characteristics),
        help="patient characteristics to retain, comma-separated ('' for none)",
    )
    p.add_argument("--no-modified-dates", action="store_true", help="remove dates instead of shifting them per patient")
    p.add_argument("--verify-pixels", action="store_true", help="decode every image here (default: structural check)")
    p.add_argument(
        "--several-id-issuers",
        action="store_true",
        help="the site's Patient IDs come from several issuers (one ID may name two patients): key patients on "
        "Issuer of Patient ID and Patient ID (default: one Patient ID is one patient, whatever its issuer)",
    )
    _add_max_file_bytes(p)
    p.set_defaults(func=_run_ingest)


def _run_ingest(args) -> int:
    say_header_warnings()  # pydicom's, once per file and naming it
    pool, secret = Path(args.into).resolve(), Path(args.secret_file).resolve() if args.secret_file else None
    if secret and secret.is_relative_to(pool):
        raise ConfigError("the site secret must not live inside the pool", where=args.secret_file)
    if secret and secret.is_relative_to(Path(args.src).resolve()):  # it would be ingested: copied to quarantine
        raise ConfigError("the site secret must not live inside the site folder", where=args.secret_file)
    options = DeidOptions(
        modified_dates=not args.no_modified_dates,
        retain_characteristics=tuple(k for k in args.retain.split(",") if k),
        several_id_issuers=args.several_id_issuers,
    )
    summary = ingest_site(
        args.site,
        args.src,
        pool,
        key=load_site_key(args.secret_file),
        options=options,
        quarantine=args.quarantine,
        workers=args.workers,
        progress=True,
        verify_pixels=args.verify_pixels,
        max_file_bytes=args.max_file_bytes,
        refuse_empty=True,
    )
    print(summary.line())
    print(f"audit log: {summary.log_path}")
    return 0
