"""The node's durable state: one SQLite database (WAL) plus a spool folder, both under `--state`.

Nothing received is lost: `receive` writes the instance to the spool (temp + fsync + rename) and
commits its row before the caller answers the C-STORE with success. Spool and outbox file names
are digests chosen here, never header values. Every later step (scoring, the study's SR,
each delivery) is a row whose state a restart reads back, so unfinished work resumes where it
stopped and finished work is never repeated.

instances   one row per SOP Instance UID: received -> scored | rejected
studies     one row per Study Instance UID: receiving -> scored -> delivered, or not_analysed
            ("failed" is shown while a delivery keeps failing; it is retried until delivered)
deliveries  one row per result object and destination: pending -> delivered
drifting_sources  the calling AE titles the node's drift monitor finds drifting now, for the worklist of
            `medtriage serve --state` (another process) to mark their rows
outbox      the result files deliveries name, written before their rows are committed: a node at start deletes
            those no row names (a node killed in between left them)
node.lock   held by the one node that owns the folder, while it runs
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from medtriage.errors import ConfigError, InputError
from medtriage.io.safe_output import PUBLIC_MODE, AtomicFile, hold_exclusive, inside, remove_partials, sync_folder

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT, sop_class TEXT, spool TEXT NOT NULL,
    name TEXT, calling_aet TEXT, received REAL NOT NULL, state TEXT NOT NULL DEFAULT 'received',
    result TEXT, reason TEXT);
CREATE INDEX IF NOT EXISTS instances_state ON instances(state);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY, study_uid TEXT UNIQUE NOT NULL, state TEXT NOT NULL, first_received REAL,
    last_received REAL, updated REAL, fields TEXT, top_sop TEXT, priority TEXT, probability REAL, finding TEXT,
    reason TEXT, sr_uid TEXT);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY, study_uid TEXT NOT NULL, kind TEXT NOT NULL, destination TEXT NOT NULL,
    file TEXT NOT NULL, sop_uid TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER DEFAULT 0,
    next_attempt REAL DEFAULT 0, last_error TEXT, created REAL, delivered REAL);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries(state, next_attempt);
CREATE INDEX IF NOT EXISTS deliveries_file ON deliveries(file);
CREATE TABLE IF NOT EXISTS overlays (sop_uid TEXT PRIMARY KEY, png BLOB NOT NULL, saliency TEXT);
CREATE TABLE IF NOT EXISTS drifting_sources (source TEXT PRIMARY KEY, since REAL NOT NULL);
"""
DB_FILE, SPOOL_DIR, OUTBOX_DIR, INCOMING_DIR = "node.sqlite", "spool", "outbox", "incoming"
LOCK_FILE = "node.lock"  # held by the node that owns the folder, for as long as it runs
# Columns newer than the first state folders: added when a folder without them is opened (readers of the old
# schema name their columns, so an older node on the same folder keeps working). instances.source: who sent the
# instance as the drift monitor names it (an upload's X-Source); NULL for the node's, whose calling AE title says it.
ADDED_COLUMNS = (("instances", "source", "TEXT"),)
URGENT_KEPT_S = 24 * 3600  # an URGENT study stays listed this long, however many studies arrive after it
# The newest `limit` studies, and up to `limit` URGENT studies of the last URGENT_KEPT_S beyond them (the newest):
# routine arrivals cannot push an urgent study off the list, and a flood of urgent ones cannot make it unbounded.
SHOWN = (
    "WITH newest AS (SELECT id FROM studies ORDER BY last_received DESC, id DESC LIMIT :limit), "
    "urgent AS (SELECT id FROM studies WHERE priority = 'URGENT' AND last_received >= :since "
    "AND id NOT IN (SELECT id FROM newest) ORDER BY last_received DESC, id DESC LIMIT :limit), "
    "shown AS (SELECT id FROM newest UNION ALL SELECT id FROM urgent) "
)
# Each shown study with what its row needs, in one query: its top instance (name, scores, spool), the saliency kept
# with that instance's picture (not the PNG), its number of instances, and the sender of the top instance (or of
# its first one, before it is scored).
SHOWN_ROWS = SHOWN + (
    "SELECT s.*, top.name AS top_name, top.result AS top_result, top.spool AS top_spool, o.saliency AS top_saliency, "
    "(SELECT COUNT(*) FROM instances c WHERE c.study_uid = s.study_uid) AS instance_count, "
    "sender.source AS source, sender.calling_aet AS calling_aet FROM studies s "
    "LEFT JOIN instances top ON top.sop_uid = s.top_sop LEFT JOIN overlays o ON o.sop_uid = s.top_sop "
    "LEFT JOIN instances sender ON sender.sop_uid = COALESCE(s.top_sop, "
    "(SELECT f.sop_uid FROM instances f WHERE f.study_uid = s.study_uid ORDER BY f.received LIMIT 1)) "
    "WHERE s.id IN (SELECT id FROM shown) {only} ORDER BY s.last_received DESC, s.id DESC"
)
SHOWN_TOPS = SHOWN + "SELECT top_sop FROM studies WHERE id IN (SELECT id FROM shown) AND top_sop IS NOT NULL"
UNLISTED = SHOWN + (
    "SELECT (SELECT COUNT(*) FROM studies) - (SELECT COUNT(*) FROM shown) AS evicted, (SELECT COUNT(*) FROM studies "
    "WHERE priority = 'URGENT' AND last_received >= :since AND id NOT IN (SELECT id FROM shown)) AS urgent"
)
# What an in-memory store (a worklist without --state) forgets: the studies the list leaves out, but for the URGENT ones
# of the last URGENT_KEPT_S, which the list counts as urgent and not listed.
FORGOTTEN_STUDIES = SHOWN + (
    "SELECT study_uid FROM studies WHERE id NOT IN (SELECT id FROM shown) AND NOT (priority = 'URGENT' AND last_received >= :since)"
)
SQLITE_BUSY = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED: the database is held by another connection
SQLITE_FULL = 13  # the result code of a write to a full disk or past max_page_count (sqlite3.SQLITE_FULL from 3.11)
SQLITE_READONLY = 8  # the primary result code of a write to a database that cannot be written (SQLITE_READONLY_*)
SQLITE_IOERR = 10  # the primary result code of a failed read, write or sync (SQLITE_IOERR_FSYNC and its kin)
MAX_INSTANCE_BYTES = 4 << 30  # default --max-instance-bytes: above the largest instances sent in practice (whole-slide levels)
MIN_FREE_BYTES = 1 << 30  # default --min-free-bytes: room kept for results, the database and logs
MAX_ASSOCIATIONS = 10  # default --max-associations (pynetdicom's): connections served at once, one more is refused
ASSOCIATE_WITHIN_S = 10.0  # default --associate-timeout: from a connection to its whole A-ASSOCIATE-RQ, TLS included
# An open study last received later than this past now was received before the clock was set back: an instance
# recorded by another thread or process as the worker reads the time is a moment ahead at most.
CLOCK_SLACK_S = 1.0
# How the reason of a study whose results the disk refused begins (a full disk, an outbox that cannot be written):
# such a study is closed again, by the running worker after a wait and by a node starting on the folder.
UNWRITTEN = "scored, but its results could not be written"
NAMES_PER_QUERY = 500  # outbox file names looked up in one query (SQLite takes 999 parameters, whatever its version)


class ConflictingInstance(InputError):
    """A received instance whose SOP Instance UID the store already holds for another study, series or SOP class."""


class ConflictingPatient(InputError):
    """A received instance naming a study the store holds for another patient."""


class StoreClosed(Exception):
    """The store was closed (its node stopping) under a thread still at work: what that thread was about to record
    is not recorded, and is done again at the next start (a study scored again, a result sent again)."""


class CommitUncertain(Exception):
    """A COMMIT that failed with an I/O error (a sync the disk refused): its commit record may be written already, so
    the transaction may survive a crash. What it records must stay until the next start can tell."""


def backoff(attempts: int, retry_max: float) -> float:
    """Seconds before the next try after `attempts` failures: 1, 2, 4 ... capped at `retry_max`."""
    # 2.0**1024 overflows: a destination down for a weekend must not turn the backoff into an error (and a hot loop)
    return min(retry_max, 2.0 ** min(attempts, 30))


def _is_full(err: sqlite3.OperationalError) -> bool:
    return getattr(err, "sqlite_errorcode", None) == SQLITE_FULL or "database or disk is full" in str(err)


def _commit(db: sqlite3.Connection) -> None:
    try:
        db.execute("COMMIT")
    except sqlite3.Error as err:
        if (getattr(err, "sqlite_errorcode", 0) & 0xFF) == SQLITE_IOERR:
            raise CommitUncertain(f"the database's commit failed with an I/O error ({err}): it may or may not hold it") from err
        raise


def _is_refused_write(err: sqlite3.OperationalError) -> bool:
    """The disk refused a write (SQLITE_IOERR and its kin) or the database became read-only (SQLITE_READONLY): the
    state folder's disk, for now (a disk remounted read-only after errors), not the instance."""
    return (getattr(err, "sqlite_errorcode", 0) & 0xFF) in (SQLITE_READONLY, SQLITE_IOERR)


def _is_busy(err: sqlite3.OperationalError) -> bool:
    """Another process held the database past the busy timeout (a worklist writing, a backup): for now, not for good."""
    return getattr(err, "sqlite_errorcode", None) in SQLITE_BUSY or "database is locked" in str(err)


def _own(folder: Path) -> int | None:
    """Lock `folder` for this process (released when it closes the descriptor returned, or exits, however); ConfigError
    when another process holds it. A second node on one folder would delete the first one's instances as it receives
    them (its start clears what a killed node left half-written), and both would score and report the same studies."""
    folder.mkdir(parents=True, exist_ok=True)

    def busy(holder: str) -> ConfigError:
        return ConfigError(
            f"the state folder {folder} is in use by another medtriage listen (process {holder})",
            where="--state",
            hint="stop that node first, or give this one a --state folder of its own",
        )

    return hold_exclusive(folder / LOCK_FILE, busy)


def digest_name(*parts: str, suffix: str = ".dcm") -> str:
    """A file name from what identifies the content (e.g. a SOP UID): a digest, never the value itself."""
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:40] + suffix


def _is_result_file(entry: os.DirEntry) -> bool:
    """A file the store named (digest_name's .dcm: a result in the outbox, an instance in the spool), not an atomic
    writer's hidden temporary file."""
    return entry.name.endswith(".dcm") and not entry.name.startswith(".") and entry.is_file(follow_symlinks=False)


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


@dataclass
class Instance:
    sop_uid: str
    study_uid: str
    spool: Path
    name: str
    calling_aet: str = ""


@dataclass
class Delivery:
    id: int
    study_uid: str
    kind: str
    destination: str
    file: Path
    sop_uid: str
    attempts: int


class _Buffered:
    """A file in the store's incoming folder, renamed into the spool by the call that records it: no second copy of
    a large instance on disk. Another call's (a resend, a conflict) is left to its writer: pynetdicom deletes its
    file after the C-STORE handler returns, ignoring one already gone."""

    def __init__(self, path: Path, spool: Path):
        self.path, self.spool = path, spool
        with open(path, "rb") as written:  # its bytes on disk before its row is committed
            os.fsync(written.fileno())

    def commit(self) -> None:
        os.chmod(self.path, PUBLIC_MODE)  # a temporary file's 0600 made what the spool's other files have
        os.replace(self.path, self.spool)
        sync_folder(self.spool.parent)

    def discard(self) -> None:
        pass


class NodeStore:
    """SQLite + spool under one folder; `NodeStore(None)` keeps everything in memory (the HTTP service
    without a state folder). Thread-safe: one connection behind a lock (writes are small and short)."""

    def __init__(self, folder: str | Path | None, recover: bool = False):
        """`recover`: this process owns the folder (the node at start): delete half-written files a killed
        process left. Readers (the worklist of `medtriage serve`) leave them, a running node may be writing."""
        self.folder = Path(folder) if folder is not None else None
        self._owned: int | None = None  # the lock file's descriptor, while this process owns the folder
        if self.folder is not None:
            if recover:
                self._owned = _own(self.folder)
            for sub in (SPOOL_DIR, OUTBOX_DIR, INCOMING_DIR):
                (self.folder / sub).mkdir(parents=True, exist_ok=True)
                if recover:
                    remove_partials(self.folder / sub)
            if recover:  # instances a killed process was still receiving: their senders got no success, and resend
                for leftover in (self.folder / INCOMING_DIR).glob("*.dcm"):
                    leftover.unlink(missing_ok=True)
        target = str(self.folder / DB_FILE) if self.folder is not None else ":memory:"
        self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._closed = False
        if self.folder is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed row survives a power cut
        self._db.executescript(SCHEMA)
        self._add_missing_columns()
        if recover:  # the node's drift windows start empty: no source drifts until it has seen enough again
            self._db.execute("DELETE FROM drifting_sources")
            self._remove_unrecorded_results()
            self._remove_unrecorded_instances()
            self.reopen_unwritten()

    def _remove_unrecorded_results(self) -> None:
        """Delete the outbox files no delivery names: the worker writes a study's results, then commits their deliveries'
        rows, and a node killed in between left them, unsent for good (its study, still open, is closed again with
        results of its own). Run by the node that owns the folder only, before its worker starts: a file a running
        worker has not recorded yet is one it is still writing. Files of delivered results are named by their rows."""
        outbox = self.folder / OUTBOX_DIR
        orphans = self._unnamed_files(outbox, "deliveries", "file")
        for name in orphans:
            (outbox / name).unlink(missing_ok=True)
        if orphans:
            log.info(
                "removed %d result file(s) from %s that no delivery names: their study's close was never recorded", len(orphans), outbox
            )

    def _remove_unrecorded_instances(self) -> None:
        """Delete the spool files no instance row names: a file is renamed into the spool within the transaction that
        records its row, and a node killed in between, or whose commit failed without saying whether it landed, left
        it, for good when its sender never sends it again (it got no success). Scanned holding the database's write
        lock: another process (the worklist recording an upload) is then never between its rename and its commit."""
        spool = self.folder / SPOOL_DIR
        with self._immediate():
            orphans = self._unnamed_files(spool, "instances", "spool")
            for name in orphans:
                (spool / name).unlink(missing_ok=True)
        if orphans:
            log.info("removed %d instance file(s) from %s that no instance names: their receipt was never recorded", len(orphans), spool)

    def _unnamed_files(self, folder: Path, table: str, column: str) -> list[str]:
        """The store's files in `folder` that no row of `table` names in `column`, looked up in batches: the folder keeps
        every file recorded (each result delivered, each instance received)."""
        with os.scandir(folder) as entries:
            names = (entry.name for entry in entries if _is_result_file(entry))
            return [name for batch in _batches(names, NAMES_PER_QUERY) for name in self._unrecorded(batch, table, column)]

    def _unrecorded(self, names: list[str], table: str, column: str) -> list[str]:
        """Those of `names` (outbox files, or spool files) that no row of `table` names in `column`."""
        marks = ", ".join("?" * len(names))
        query = f"SELECT {column} AS name FROM {table} WHERE {column} IN ({marks})"  # noqa: S608 -- our own names
        recorded = {row["name"] for row in self._execute(query, names)}
        return [name for name in names if name not in recorded]

    def _add_missing_columns(self) -> None:
        for table, column, kind in ADDED_COLUMNS:
            if column in {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}:
                continue
            try:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            except sqlite3.OperationalError as err:  # the node or the service opening the folder added it first
                if "duplicate column" not in str(err):
                    raise

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()
            if self._owned is not None:
                os.close(self._owned)  # the lock with it: another node may own the folder now
                self._owned = None

    def _execute(self, sql: str, args: tuple | dict = ()) -> list[sqlite3.Row]:
        with self._lock:
            self._require_open()
            return self._db.execute(sql, args).fetchall()

    def _require_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"the state folder {self.folder} was closed: the node is stopping")

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, under the store's lock: committed when the block ends, rolled back when it raises."""
        with self._lock:
            self._require_open()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                _commit(self._db)
            except BaseException:
                if self._db.in_transaction:  # SQLite ends some failed transactions itself (a full database)
                    self._db.execute("ROLLBACK")
                raise

    def _transaction(self, statements: list[tuple[str, tuple]]) -> None:
        with self._immediate() as db:
            for sql, args in statements:
                db.execute(sql, args)

    # --- receiving -------------------------------------------------------------------------------

    def spool_path(self, sop_uid: str) -> Path:
        if self.folder is None:
            raise RuntimeError("an in-memory store has no spool")
        return inside(self.folder / SPOOL_DIR, digest_name(sop_uid))

    def spooled(self, name: str) -> Path:
        """The spool file of a recorded instance (its row holds the name)."""
        return inside(self.folder / SPOOL_DIR, name)

    def has_instance(self, sop_uid: str) -> bool:
        return bool(self._execute("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)))

    @property
    def incoming(self) -> Path:
        """Where instances arriving over the network are buffered until they are spooled (same disk as the spool)."""
        if self.folder is None:
            raise RuntimeError("an in-memory store has no incoming folder")
        return self.folder / INCOMING_DIR

    def receive(
        self,
        data: bytes | Path,
        sop_uid: str,
        study_uid: str,
        series_uid: str,
        sop_class: str,
        fields: dict,
        calling_aet: str = "",
        name: str = "",
        **recorded,
    ) -> bool:
        """Spool and record one instance (its bytes, or a file of them: copied in chunks, or moved when the file is in
        the store's `incoming` folder; an in-memory store keeps no copy), with `recorded` as record_instance takes it
        (an upload's state, result and source). False when this SOP instance was already received (the copy on disk is
        kept, so a resend never produces a second result), by this call's time or by a concurrent one's.
        ConflictingInstance when the SOP Instance UID is held for another study, series or SOP class, ConflictingPatient
        when the study is held for another patient; OSError when the disk or the database is full, the database cannot be
        written (a disk remounted read-only), or another process holds it past the busy timeout (nothing of the instance
        is kept), or its commit failed without saying whether it landed (its spool file kept until the next start)."""
        identity = (sop_uid, study_uid, series_uid, sop_class)
        if self.has_instance(sop_uid):  # a resend: nothing to write
            self._check_resend(*identity)
            return False
        self._check_patient(study_uid, fields)  # before a large file is spooled; record_instance checks again, atomically
        if self.folder is None:
            kept = self.record_instance(*identity, "", fields, calling_aet, name, **recorded)
        else:
            kept = self._spool_and_record(data, identity, fields, calling_aet=calling_aet, name=name, **recorded)
        if not kept:  # a concurrent call recorded this SOP Instance UID first: a resend, or a conflict
            self._check_resend(*identity)
        return kept

    def _spool_and_record(self, data: bytes | Path, identity: tuple[str, str, str, str], fields: dict, **recorded) -> bool:
        """record_instance, with the instance's file put in the spool by the call whose row is inserted, before its commit."""
        spool = self.spool_path(identity[0])
        copy, renamed = self._buffered(data, spool) or self._spool_copy(data, spool), False

        def keep() -> None:
            nonlocal renamed
            copy.commit()
            renamed = True

        kept = False
        try:
            with self._lock:  # the spool file is this call's from its rename until a failed commit removes it
                try:
                    kept = self.record_instance(*identity, spool.name, fields, keep=keep, **recorded)
                except BaseException as err:
                    # unrecorded, it would hold disk for good; its sender gets no success. A commit that may have landed
                    # keeps it: its row may name it, and a resend is then answered success (the next start tells)
                    if renamed and not isinstance(err, CommitUncertain):
                        spool.unlink(missing_ok=True)
                    raise
        except CommitUncertain as err:  # answered as out of resources: the sender sends it again
            raise OSError(
                errno.EIO,
                f"the node's database {self.folder / DB_FILE} may or may not hold instance {identity[0]} ({err}); its file "
                f"{spool} is kept until the node starts again; check the state folder's disk",
            ) from err
        except sqlite3.OperationalError as err:
            if _is_full(err):
                raise OSError(errno.ENOSPC, f"the node's database {self.folder / DB_FILE} is full: {err}") from err
            if _is_busy(err):  # answered as out of resources: the sender keeps the instance and sends it again
                raise OSError(errno.EBUSY, f"the node's database {self.folder / DB_FILE} is held by another process: {err}") from err
            if _is_refused_write(err):  # the state folder's disk remounted read-only, or failing: the sender sends it again
                raise OSError(
                    errno.EIO, f"the node's database {self.folder / DB_FILE} cannot be written ({err}); check the state folder's disk"
                ) from err
            raise
        finally:
            if not kept:
                copy.discard()
        return kept

    def _buffered(self, data: bytes | Path, spool: Path) -> _Buffered | None:
        """An instance the network layer wrote to this store's incoming folder, on the spool's disk: moved, not copied."""
        if isinstance(data, (bytes, bytearray)):
            return None
        data = Path(data)
        if data.parent.resolve() != self.incoming.resolve() or data.stat().st_dev != spool.parent.stat().st_dev:
            return None
        return _Buffered(data, spool)

    @staticmethod
    def _spool_copy(data: bytes | Path, spool: Path) -> AtomicFile:
        """`data` in a temporary file of its own beside `spool`, on disk: concurrent receivers of one SOP Instance UID
        never write the same file, and the slow fsync is done before the database lock is taken."""
        copy = AtomicFile(spool)
        try:
            if isinstance(data, (bytes, bytearray)):
                copy.file.write(data)
            else:
                with open(data, "rb") as original:
                    shutil.copyfileobj(original, copy.file)
            copy.sync_and_close()  # its commit, under the lock, then only renames
        except BaseException:
            copy.discard()
            raise
        return copy

    def _check_resend(self, sop_uid: str, study_uid: str, series_uid: str, sop_class: str) -> None:
        """A resend names the study, series and SOP class it did the first time; another instance reusing the UID
        would otherwise be dropped unseen (its study never listed)."""
        held = self.instance(sop_uid)
        if (held["study_uid"], held["series_uid"] or "", held["sop_class"] or "") != (study_uid, series_uid, sop_class):
            raise ConflictingInstance(
                f"SOP Instance UID {sop_uid} is already held for study {held['study_uid']}, series {held['series_uid']}, "
                f"SOP class {held['sop_class']}; this instance says study {study_uid}, series {series_uid}, SOP class {sop_class}",
                hint="the sending system reuses SOP Instance UIDs: each instance must have its own",
            )

    def _check_patient(self, study_uid: str, fields: dict) -> dict | None:
        """An instance of a held study names that study's patient: merged, another patient's image would be scored and
        reported under the first one's name. A blank Patient ID on either side is unknown, not another patient.
        Returns the study's fields as held (None when the study is not)."""
        rows = self._execute("SELECT fields FROM studies WHERE study_uid = ?", (study_uid,))
        held_fields = json.loads(rows[0]["fields"] or "{}") if rows else None
        held, arriving = (held_fields or {}).get("patient_id", ""), fields.get("patient_id", "")
        if held and arriving and held != arriving:
            raise ConflictingPatient(
                f"study {study_uid} is held for another patient than this instance's (Patient ID differs)",
                hint="the sending system reuses a Study Instance UID across patients: correct the study there and send it again",
            )
        return held_fields

    def record_instance(
        self,
        sop_uid: str,
        study_uid: str,
        series_uid: str,
        sop_class: str,
        spool: str,
        fields: dict,
        calling_aet: str = "",
        name: str = "",
        state: str = "received",
        result: str | None = None,
        source: str | None = None,
        keep: Callable[[], None] | None = None,
    ) -> bool:
        """The instance row, and its study opened (or reopened: a late instance makes a new result), in one transaction;
        False, and nothing changed, when the SOP Instance UID is already held (checked and recorded as one step, so
        of concurrent calls for one UID exactly one records it). ConflictingPatient, and nothing changed, when the study
        is held for another patient. `keep`: run once the row is in, before the commit
        (the spool file put in place). `source`: the sender as the drift monitor names it, when the calling AE title
        does not say it (an upload's X-Source)."""
        now = time.time()
        with self._immediate() as db:
            inserted = db.execute(
                "INSERT OR IGNORE INTO instances (sop_uid, study_uid, series_uid, sop_class, spool, name, calling_aet, "
                "received, state, result, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sop_uid, study_uid, series_uid, sop_class, spool, name or sop_uid, calling_aet, now, state, result, source),
            ).rowcount
            if inserted:
                held = self._check_patient(study_uid, fields)  # in the transaction: a concurrent instance's study is seen
                if held is not None and not held.get("patient_id") and fields.get("patient_id"):
                    # the first instance naming the patient gives the study its fields: later ones are checked against it
                    db.execute("UPDATE studies SET fields = ? WHERE study_uid = ?", (json.dumps(fields), study_uid))
                db.execute(
                    "INSERT INTO studies (study_uid, state, first_received, last_received, updated, fields) "
                    "VALUES (?, 'receiving', ?, ?, ?, ?) ON CONFLICT(study_uid) DO UPDATE SET state = 'receiving', "
                    "last_received = excluded.last_received, updated = excluded.updated",
                    (study_uid, now, now, now, json.dumps(fields)),
                )
                if keep is not None:
                    keep()
        return bool(inserted)

    # --- scoring ---------------------------------------------------------------------------------

    def unscored(self, limit: int = 64) -> list[Instance]:
        rows = self._execute(
            "SELECT sop_uid, study_uid, spool, name, calling_aet FROM instances WHERE state = 'received' ORDER BY received LIMIT ?",
            (limit,),
        )
        return [Instance(r["sop_uid"], r["study_uid"], self.spooled(r["spool"]), r["name"], r["calling_aet"] or "") for r in rows]

    def set_scored(self, sop_uid: str, scores: list[dict]) -> None:
        self._execute("UPDATE instances SET state = 'scored', result = ? WHERE sop_uid = ?", (json.dumps(scores), sop_uid))

    def set_rejected(self, sop_uid: str, reason: str) -> None:
        self._execute("UPDATE instances SET state = 'rejected', reason = ? WHERE sop_uid = ?", (reason, sop_uid))

    def restamp_future_arrivals(self) -> int:
        """Date the open studies last received after now (the wall clock was set back since: an NTP step, a restored
        virtual machine) as received now; returns how many. Left so, a study would wait for the clock to catch up
        before it is quiet, an hour for a clock set back an hour; restamped, it waits `--study-timeout` from now."""
        now = time.time()
        ahead = "FROM studies WHERE state = 'receiving' AND last_received > ?"
        if not self._execute(f"SELECT 1 {ahead} LIMIT 1", (now + CLOCK_SLACK_S,)):  # noqa: S608 -- our own text
            return 0  # the common case reads only: no write lock taken at each poll
        sql = f"UPDATE studies SET last_received = ? WHERE study_uid IN (SELECT study_uid {ahead})"  # noqa: S608
        return self._update(sql, (now, now + CLOCK_SLACK_S))

    def reopen_unwritten(self, study_uid: str | None = None) -> int:
        """Open again the study (or, without one, every study) that failed because the disk refused its results
        (its reason begins with UNWRITTEN): it is closed again once quiet. Returns how many."""
        sql = "UPDATE studies SET state = 'receiving' WHERE state = 'failed' AND sr_uid IS NULL AND substr(reason, 1, ?) = ?"
        args: tuple = (len(UNWRITTEN), UNWRITTEN)
        if study_uid is not None:
            sql, args = sql + " AND study_uid = ?", (*args, study_uid)
        return self._update(sql, args)

    def quiet_studies(self, quiet_seconds: float) -> list[str]:
        """Studies still receiving, silent for `quiet_seconds`, with every instance scored or rejected."""
        rows = self._execute(
            "SELECT study_uid FROM studies s WHERE state = 'receiving' AND last_received <= ? AND NOT EXISTS "
            "(SELECT 1 FROM instances i WHERE i.study_uid = s.study_uid AND i.state = 'received')",
            (time.time() - quiet_seconds,),
        )
        return [r["study_uid"] for r in rows]

    def study_instances(self, study_uid: str) -> list[sqlite3.Row]:
        return self._execute("SELECT * FROM instances WHERE study_uid = ? ORDER BY received", (study_uid,))

    def study_received_since(self, study_uid: str, since: float) -> bool:
        rows = self._execute("SELECT last_received FROM studies WHERE study_uid = ?", (study_uid,))
        return bool(rows) and rows[0]["last_received"] > since

    def reports_sent(self, study_uid: str) -> int:
        """How many SRs the study has had (each has delivery rows: the node always has a destination)."""
        rows = self._execute("SELECT COUNT(DISTINCT sop_uid) AS n FROM deliveries WHERE study_uid = ? AND kind = 'sr'", (study_uid,))
        return int(rows[0]["n"])

    def close_study(
        self,
        study_uid: str,
        top: dict | None,
        reason: str | None,
        sr_uid: str | None,
        deliveries: list[tuple[str, str, str, str]],
        seen: float,
        state: str | None = None,
        instances: int | None = None,
    ) -> bool:
        """The study's result and its deliveries (kind, destination, outbox file, SOP UID) in one transaction.
        Refused (False) when an instance arrived after `seen`, or, given `instances` (how many the result covers),
        when the study holds another number of instances or one not scored yet: an instance whose arrival time was
        taken before `seen` but committed after the caller read the study would otherwise be in no result. The study
        is then closed again later."""
        now = time.time()
        state = state or ("not_analysed" if top is None else "scored")
        values = (top or {}).get
        covers_all = (
            ""
            if instances is None
            else " AND (SELECT COUNT(*) FROM instances i WHERE i.study_uid = studies.study_uid) = ? "
            "AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.study_uid = studies.study_uid AND i.state = 'received')"
        )
        with self._immediate() as db:
            closed = db.execute(
                "UPDATE studies SET state = ?, updated = ?, top_sop = ?, priority = ?, probability = ?, finding = ?, "
                "reason = ?, sr_uid = ? WHERE study_uid = ? AND state = 'receiving' AND last_received <= ?" + covers_all,
                (
                    state,
                    now,
                    values("sop_uid"),
                    values("priority"),
                    values("probability"),
                    values("finding"),
                    reason,
                    sr_uid,
                    study_uid,
                    seen,
                    *(() if instances is None else (instances,)),
                ),
            ).rowcount
            for delivery in deliveries if closed else []:
                db.execute(
                    "INSERT INTO deliveries (study_uid, kind, destination, file, sop_uid, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (study_uid, *delivery, now),
                )
        return bool(closed)

    def outbox_path(self, name: str) -> Path:
        return inside(self.folder / OUTBOX_DIR, name)

    # --- delivering ------------------------------------------------------------------------------

    def pending_destinations(self) -> dict[str, int]:
        """Destination -> how many deliveries to it are still pending."""
        rows = self._execute("SELECT destination, COUNT(*) AS n FROM deliveries WHERE state = 'pending' GROUP BY destination")
        return {row["destination"]: row["n"] for row in rows}

    def due_deliveries(self, limit: int = 16) -> list[Delivery]:
        rows = self._execute(
            "SELECT * FROM deliveries WHERE state = 'pending' AND next_attempt <= ? ORDER BY next_attempt, id LIMIT ?", (time.time(), limit)
        )
        return [
            Delivery(r["id"], r["study_uid"], r["kind"], r["destination"], self.outbox_path(r["file"]), r["sop_uid"], r["attempts"])
            for r in rows
        ]

    def reschedule_past(self, longest_wait: float) -> int:
        """Make due now the pending deliveries due later than `longest_wait` from now, which no backoff schedules: the
        wall clock was set back since their try; returns how many. Left so, a result would wait for the clock to
        catch up, an hour for a clock set back an hour."""
        now = time.time()
        late = "FROM deliveries WHERE state = 'pending' AND next_attempt > ?"
        if not self._execute(f"SELECT 1 {late} LIMIT 1", (now + longest_wait,)):  # noqa: S608 -- our own text
            return 0
        sql = f"UPDATE deliveries SET next_attempt = ? WHERE id IN (SELECT id {late})"  # noqa: S608
        return self._update(sql, (now, now + longest_wait))

    def _update(self, sql: str, args: tuple) -> int:
        with self._immediate() as db:
            return db.execute(sql, args).rowcount

    def next_due(self) -> float | None:
        rows = self._execute("SELECT MIN(next_attempt) AS t FROM deliveries WHERE state = 'pending'")
        return rows[0]["t"] if rows and rows[0]["t"] is not None else None

    def set_delivered(self, delivery_id: int) -> None:
        now = time.time()
        self._transaction(
            [
                ("UPDATE deliveries SET state = 'delivered', delivered = ?, last_error = NULL WHERE id = ?", (now, delivery_id)),
                (
                    (
                        "UPDATE studies SET state = 'delivered', reason = NULL, updated = ? WHERE state IN ('scored', 'failed') "
                        "AND study_uid = (SELECT study_uid FROM deliveries WHERE id = ?) AND NOT EXISTS (SELECT 1 FROM deliveries "
                        "d WHERE d.study_uid = studies.study_uid AND d.state = 'pending')"
                    ),
                    (now, delivery_id),
                ),
            ]
        )

    def set_attempt_failed(self, delivery: Delivery, error: str, retry_at: float) -> None:
        now = time.time()
        reason = f"{delivery.kind} to {delivery.destination} failed {delivery.attempts + 1} time(s): {error}; retrying"
        self._transaction(
            [
                (
                    "UPDATE deliveries SET attempts = attempts + 1, next_attempt = ?, last_error = ? WHERE id = ?",
                    (retry_at, error, delivery.id),
                ),
                (
                    "UPDATE studies SET state = 'failed', reason = ?, updated = ? WHERE study_uid = ? AND state IN ('scored', 'failed')",
                    (reason, now, delivery.study_uid),
                ),
            ]
        )

    # --- the worklist ----------------------------------------------------------------------------

    def shown_studies(self, limit: int) -> list[sqlite3.Row]:
        """The newest `limit` studies and up to `limit` URGENT studies of the last `URGENT_KEPT_S` beyond them, newest
        first, each with its top instance, kept saliency, number of instances and sender (SHOWN_ROWS); one query."""
        return self._execute(SHOWN_ROWS.format(only=""), self._shown_args(limit))

    def shown_top_instances(self, limit: int) -> set[str]:
        """The SOP UIDs of the top instances of the studies `shown_studies(limit)` lists, without their rows."""
        return {row["top_sop"] for row in self._execute(SHOWN_TOPS, self._shown_args(limit))}

    def study_by_id(self, study_id: int, within: int) -> sqlite3.Row | None:
        """The study with that id, as `shown_studies(within)` lists it, if it does."""
        rows = self._execute(SHOWN_ROWS.format(only="AND s.id = :id"), {**self._shown_args(within), "id": study_id})
        return rows[0] if rows else None

    def unlisted(self, limit: int) -> tuple[int, int]:
        """How many studies `shown_studies(limit)` leaves out, and how many of those are URGENT ones of the last
        `URGENT_KEPT_S`; one query."""
        row = self._execute(UNLISTED, self._shown_args(limit))[0]
        return row["evicted"], row["urgent"]

    def forget_unlisted(self, limit: int) -> int:
        """Delete the studies `shown_studies(limit)` leaves out (FORGOTTEN_STUDIES), with their instances, deliveries
        and pictures; returns how many. For an in-memory store only, which nothing else reads: without it, a service
        without --state would keep every upload's row and every picture it drew for as long as it runs."""
        if self.folder is not None:
            raise RuntimeError("a state folder's studies are the node's to keep; only an in-memory store forgets")
        with self._immediate() as db:
            gone = [(row["study_uid"],) for row in db.execute(FORGOTTEN_STUDIES, self._shown_args(limit)).fetchall()]
            db.executemany("DELETE FROM overlays WHERE sop_uid IN (SELECT sop_uid FROM instances WHERE study_uid = ?)", gone)
            for table in ("instances", "deliveries", "studies"):
                db.executemany(f"DELETE FROM {table} WHERE study_uid = ?", gone)  # noqa: S608 -- our own table names
        return len(gone)

    @staticmethod
    def _shown_args(limit: int) -> dict:
        return {"limit": limit, "since": time.time() - URGENT_KEPT_S}

    def mark_drifting(self, source: str, drifting: bool) -> None:
        """Record whether the node's drift monitor finds `source` (a bounded source name) drifting now."""
        if drifting:
            self._execute("INSERT OR IGNORE INTO drifting_sources (source, since) VALUES (?, ?)", (source, time.time()))
        else:
            self._execute("DELETE FROM drifting_sources WHERE source = ?", (source,))

    def drifting_sources(self) -> set[str]:
        return {row["source"] for row in self._execute("SELECT source FROM drifting_sources")}

    def instance(self, sop_uid: str) -> sqlite3.Row | None:
        rows = self._execute("SELECT * FROM instances WHERE sop_uid = ?", (sop_uid,))
        return rows[0] if rows else None

    def counts(self) -> dict:
        """Instances by state and studies by state (for logs, tests and the benchmark)."""
        instances = {r["state"]: r["n"] for r in self._execute("SELECT state, COUNT(*) AS n FROM instances GROUP BY state")}
        studies = {r["state"]: r["n"] for r in self._execute("SELECT state, COUNT(*) AS n FROM studies GROUP BY state")}
        return {"instances": instances, "studies": studies}

    def overlay(self, sop_uid: str) -> tuple[bytes, dict] | None:
        rows = self._execute("SELECT png, saliency FROM overlays WHERE sop_uid = ?", (sop_uid,))
        return (rows[0]["png"], json.loads(rows[0]["saliency"] or "{}")) if rows else None

    def save_overlay(self, sop_uid: str, png: bytes, saliency: dict) -> None:
        self._execute("INSERT OR REPLACE INTO overlays (sop_uid, png, saliency) VALUES (?, ?, ?)", (sop_uid, png, json.dumps(saliency)))
