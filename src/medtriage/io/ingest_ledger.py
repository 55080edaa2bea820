"""Where each ingested file ends up, and the record of it: the pool (new files), the quarantine (originals, listed by
reason), the site's index of every input ever seen (what makes a rerun incremental) and the per-run audit log. Runs in
the main process, in input order.

The index is written in batches (group commit): each pooled file is written whole, its bytes on disk before its
rename, and once per batch (`BATCH_FILES` inputs, or `BATCH_SECONDS`, or the run's end or stop) the folders holding
the batch's renames and the quarantine list are synced, and only then are the batch's index rows appended and the index
synced. So a row of the index names only a file that is on disk; a crash before a batch's commit leaves its files in
place without index rows, and as their inputs are not marked done, the next run processes them again and writes the
same files over them (names and bytes follow from the input and the site key). Where such an input has left the site
folder before the next run, no run makes its file again: a run that ends sets aside each pooled file no index row names
(`Ledger.set_aside_unindexed`), as pool readers read the folder, not the index.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pydicom

from medtriage import __version__
from medtriage.io import safe_output
from medtriage.io.deid import SEVERAL_ISSUERS_IDENTITY, DeidOptions, table_library_version
from medtriage.io.ingest_file import Outcome, file_stamp, open_file, quarantined
from medtriage.io.quarantine import Unsafe
from medtriage.io.safe_output import output_path, spreadsheet_row, sync_folder, write_atomic_unsynced_folder

INDEX_FILE, LOG_DIR, QUARANTINE_LIST = "index.csv", "logs", "quarantine.csv"
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
UNINDEXED = "unindexed_pool_file"  # the quarantine's reason for a pooled file no index row names (no input: not counted)
BATCH_FILES = 64  # index rows a batch holds before its commit (one folder sync and one index sync for all)
BATCH_SECONDS = 2.0  # or once its first row is this old: a slow ingest's index still moves on


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
    # What de-identification removed from the compressed frames of the files pooled this run, by kind (COM, APP1...),
    # and from how many files: text a site's encoders write beside the pixels, which no header attribute shows.
    stream_metadata_removed: Counter = field(default_factory=Counter)
    stream_metadata_files: int = 0
    unindexed_set_aside: int = 0  # pooled files no index row names, moved to the quarantine (`Ledger.set_aside_unindexed`)
    labels: dict = field(default_factory=dict)
    log_path: str = ""

    @property
    def pooled(self) -> int:
        return self.pooled_new + self.pooled_before

    def add_pooled(self, out: Outcome) -> None:
        """Count a file pooled by this run."""
        self.pooled_new += 1
        self.identified_by_name += out.identified_by_name
        self.stream_metadata_removed.update(out.stream_metadata)
        self.stream_metadata_files += bool(out.stream_metadata)

    def line(self) -> str:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.quarantined.items())) or "none"
        flags = "".join(f"; flagged {f} {n}" for f, n in sorted(self.flags.items()))
        by_name = f"; {self.identified_by_name} identified by name, not Patient ID" if self.identified_by_name else ""
        hidden = f"; left out {self.hidden} hidden file(s) (a name starting with '.')" if self.hidden else ""
        files = self.stream_metadata_files
        metadata = f"; metadata removed from {files} compressed file(s)" if files else ""
        unindexed = self.unindexed_set_aside
        set_aside = f"; set aside {unindexed} pooled file(s) no index row named (quarantine: {UNINDEXED})" if unindexed else ""
        return (
            f"{self.site}: in {self.counts_in} = pooled {self.pooled} ({self.pooled_new} new) "
            f"+ quarantined {sum(self.quarantined.values())} ({reasons}){flags}{by_name}{hidden}{metadata}{set_aside}"
        )


def ledger_folder(pool: str | Path, site: str) -> Path:
    """Where a site's ingest index and audit logs live inside the pool."""
    return Path(pool) / LEDGER_DIR / site


def write_pooled(path: Path, data: bytes) -> Path:
    """A pooled file at `path`, whole or not at all, its bytes on disk before its name appears; its folder is synced by
    the batch's commit (`Ledger.commit`), before an index row names it."""
    return write_atomic_unsynced_folder(path, data)


class Ledger:
    """Decides where each outcome ends up (in input order, so duplicates resolve the same way every time), and records
    it in batches (`commit`). `close` commits what is left."""

    def __init__(self, site: str, site_dir: Path, index_path: Path, quarantine: Path, run: str, index: dict, pixels: dict):
        self.site, self.site_dir, self.quarantine, self.run = site, site_dir, quarantine, run
        self.index, self.pixels = index, pixels  # content_key -> row; pixel hash -> "site/sop"
        self.sops = {r["sop_uid"] for r in index.values() if r["outcome"] == "pooled"}
        self.seen: set[str] = set()  # content keys of this run's inputs (already-ingested included)
        self._index_file = _append_csv(index_path, INDEX_COLUMNS)
        self._quarantine_file = None
        self._listed: set[tuple[str, str, str]] = set()  # the quarantine list's rows, as `_listing` keys them
        self._rows: list[dict] = []  # the batch's index rows, in input order, not yet written
        self._since = 0.0  # when the batch's first row came
        # Folders whose entries the batch changed. The first commit also syncs where this run may have made a folder or
        # the index: the site's pool folder and the index, each a new entry in the folder above it.
        self._folders: set[Path] = {site_dir.parent, index_path.parent, index_path.parent.parent}
        self._listed_unsynced = False  # quarantine rows written since the last commit

    def commit(self) -> None:
        """Make the batch durable, in this order: each pooled file is on disk already (synced before its rename); the
        folders holding its renames, and the quarantine list, are synced; then its index rows are appended and the index
        synced. A crash anywhere before the rows are on disk leaves their inputs to the next run."""
        for folder in sorted(self._folders):
            sync_folder(folder)
        self._folders.clear()
        if self._listed_unsynced:  # a quarantined input's row is on disk before the index row that marks it done
            self._quarantine_file[0].flush()
            os.fsync(self._quarantine_file[0].fileno())
            self._listed_unsynced = False
        if self._rows:
            handle, writer = self._index_file
            writer.writerows(self._rows)
            handle.flush()
            os.fsync(handle.fileno())
            self._rows.clear()

    def _commit_if_due(self) -> None:
        if len(self._rows) >= BATCH_FILES or (self._rows and time.monotonic() - self._since >= BATCH_SECONDS):
            self.commit()

    def record(self, out: Outcome, summary: IngestSummary) -> None:
        """Place one input and count it exactly once: pooled (new or before) or quarantined by reason."""
        if out.status == "unread":  # no bytes read, so no key and no copy: listed, not indexed, so the next run looks again
            self._list_quarantined(out)
            summary.quarantined[out.reason] += 1
            return
        if out.content_key in self.seen:  # the same bytes twice in this run: the second copy adds nothing
            quarantined(out, Unsafe("duplicate_file", "byte-identical to another input of this run"))
            self._toquarantined(out, indexed=False)
        elif out.status == "already" or out.content_key in self.index:
            row = self.index[out.content_key]
            if row["outcome"] == "pooled":
                summary.pooled_before += 1
            else:
                summary.quarantined[row["reason"]] += 1
        else:
            if out.status == "pending" and out.sop_uid in self.sops:
                quarantined(out, Unsafe("duplicate_sop_instance", "a different file with the same SOP Instance UID is pooled"))
            if out.status == "quarantined":
                self._toquarantined(out)
            else:
                self._to_pool(out)
                summary.add_pooled(out)
        if out.status == "quarantined":
            summary.quarantined[out.reason] += 1
        self.seen.add(out.content_key)
        self._commit_if_due()

    def set_aside_unindexed(self, content_key: Callable[[bytes], str]) -> int:
        """Move each pooled file that no index row names into the quarantine (`UNINDEXED`, named by `content_key` of its
        bytes), listed there, and return how many. For a run that has recorded all its inputs, the site lock held (no
        other run's batch is in progress): only a run killed after a file's rename, before its batch's commit, leaves
        such a file, and its input has left the site folder since, or this run would have made the file again and named
        it. Pool readers read the folder, not the index, and would take it up with no record of its ingest. It is kept
        (the quarantine may lie on another file system: copied, the copy and its listing on disk) and only then removed
        from the pool; a run killed in between leaves it to the next, which lists it once."""
        named = {row["path"] for row in self.index.values() if row["outcome"] == "pooled"}
        unindexed = [
            path
            for path in sorted(self.site_dir.glob("*.dcm"))
            if path.name not in named and not path.name.startswith(".") and path.is_file() and not path.is_symlink()
        ]
        detail = (
            "no index row names this pooled file: an ingest was killed after writing it, before recording it, and the "
            "input it came from has left the site folder since; set aside so that no pool reader takes it up"
        )
        for path in unindexed:
            data = path.read_bytes()
            out = Outcome(str(path), content_key=content_key(data), status="quarantined", reason=UNINDEXED, detail=detail)
            safe_output.write_atomic(output_path(self.quarantine / UNINDEXED, out.content_key, ".dcm"), data)
            self._list_quarantined(out, once=True)
        if unindexed:
            self.commit()  # the listing on disk (each copy is, with its folder) before the pool loses the files
            for path in unindexed:
                path.unlink(missing_ok=True)
            sync_folder(self.site_dir)
        return len(unindexed)

    def _to_pool(self, out: Outcome) -> None:
        # The site export's own layout, new UIDs; a UID the profile keeps (DICOM root) is still header data.
        target = output_path(self.site_dir, f"{out.modality}.{out.sop_uid}", ".dcm")
        write_pooled(target, out.encoded)  # never a half-written file under its final name
        self._folders.add(target.parent)  # the rename is on disk once the batch commits, before the index names it
        relative = Path(target.name)
        self.sops.add(out.sop_uid)
        twin = self.pixels.get(out.pixel_sha256)
        flag = f"identical_pixels:{twin}" if twin else ""
        self.pixels.setdefault(out.pixel_sha256, f"{self.site}/{out.sop_uid}")
        self._write_index(out, "pooled", path=relative.as_posix(), flag=flag)

    def _toquarantined(self, out: Outcome, indexed: bool = True) -> None:
        target = output_path(self.quarantine / out.reason, out.content_key, _kept_suffix(out.source))
        gone = _copy_as_read(out, target)
        if gone:  # listed, not indexed: the next run reads it again
            out.reason, out.detail = "changed_while_read", gone
        done = indexed and not gone
        self._list_quarantined(out, once=done)
        if done:
            self._write_index(out, "quarantined")

    def _list_quarantined(self, out: Outcome, once: bool = False) -> None:
        """`once`: for an input the index is about to mark done. A run killed before that index row was written listed
        it already, and its input is read again: the row it left stands, as what the index row now completes."""
        if self._quarantine_file is None:
            self._quarantine_file = _append_csv(self.quarantine / QUARANTINE_LIST, QUARANTINE_COLUMNS)
            self._folders.add(self.quarantine)  # the list may be new
            self._listed = _listed(self.quarantine / QUARANTINE_LIST)
        row = {"content_key": out.content_key, "reason": out.reason, "detail": out.detail, "source": out.source, "run": self.run}
        row = spreadsheet_row(row)  # read by people
        if once and _listing(row) in self._listed:
            return
        self._quarantine_file[1].writerow(row)
        self._quarantine_file[0].flush()  # before the index row that marks this input done
        self._listed_unsynced = True  # and on disk before it: the batch's commit syncs it first

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
        self.index[out.content_key] = row  # this run's decisions see it at once; the index file at the commit
        if not self._rows:
            self._since = time.monotonic()
        self._rows.append(row)

    def close(self) -> None:
        """Commit what is left (a run's end, a stop, or an error: every row in the batch names a file written whole),
        then close the lists."""
        try:
            self.commit()
        finally:
            for handle in (self._index_file, self._quarantine_file):
                if handle:
                    handle[0].close()


def _copy_as_read(out: Outcome, target: Path) -> str | None:
    """Copy the source to `target` as the worker read it; else copy nothing and say why. A file changed or removed
    since (an export still being written or cleaned up) no longer holds the bytes judged and named by their key."""
    why = "since it was read: wait for the export to finish, then ingest again (it looks at this file again)"
    try:
        original, status = open_file(out.source)
    except OSError as err:
        return f"the file went ({type(err).__name__}: {err.strerror or err}) {why}"
    changed = f"the file changed {why}"
    if original is None:  # no longer a regular file
        return changed
    with original:
        if file_stamp(status) == out.stamp:
            safe_output.write_atomic(target, lambda copy: shutil.copyfileobj(original, copy))
            if file_stamp(os.fstat(original.fileno())) == out.stamp:
                return None
            target.unlink()
    return changed


def _listed(path: Path) -> set[tuple[str, str, str]]:
    with open(path, newline="") as f:
        return {_listing(row) for row in csv.DictReader(f)}


def _listing(row: dict) -> tuple[str, str, str]:
    """What makes two quarantine rows one listing: the same bytes (content key), from the same source, for one reason."""
    return row.get("content_key"), row.get("reason"), row.get("source")


def _kept_suffix(source: str) -> str:
    """The source's extension (so a quarantined .dcm stays one), when it is a plain one."""
    suffix = Path(source).suffix[:8]
    return suffix if re.fullmatch(r"\.[A-Za-z0-9_-]+", suffix) else ""


def _append_csv(path: Path, columns: list[str]):
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_line(path)
    new = not path.exists() or path.stat().st_size == 0
    handle = open(path, "a", newline="")
    writer = csv.DictWriter(handle, fieldnames=columns)
    if new:
        writer.writeheader()
    return handle, writer


def drop_torn_line(path: Path) -> None:
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


def read_index(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {row["content_key"]: row for row in csv.DictReader(f)}


def pooled_pixels(pool: Path) -> dict[str, str]:
    """Pixel hash -> 'site/sop' over every site already in the pool: spots the same image at two sites."""
    found: dict[str, str] = {}
    for index_path in sorted((pool / LEDGER_DIR).glob(f"*/{INDEX_FILE}")):
        for row in read_index(index_path).values():
            if row["outcome"] == "pooled" and row["pixel_sha256"]:
                found.setdefault(row["pixel_sha256"], f"{index_path.parent.name}/{row['sop_uid']}")
    return found


def write_audit_log(ledger_dir: Path, summary: IngestSummary, options: DeidOptions, workers: int, started: float) -> Path:
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
            "stream_metadata_removed": dict(sorted(summary.stream_metadata_removed.items())),
            "stream_metadata_files": summary.stream_metadata_files,
            "unindexed_pool_files_set_aside": summary.unindexed_set_aside,
        },
        "flags": dict(summary.flags),
        "labels": summary.labels,
    }
    return safe_output.write_atomic(ledger_dir / LOG_DIR / f"{summary.run}.json", json.dumps(log, indent=2).encode())


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
