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
A pooled file no index row names (a run killed before recording it, its input gone from the site folder since) is moved
to the quarantine as `unindexed_pool_file` by the next run that ends (`Ledger.set_aside_unindexed`).
Site side (never pooled), `<quarantine>/`: originals by reason plus `quarantine.csv` with source paths (a file
that cannot be read at all is listed there as `cannot_read`, one over the size limit as `too_large`, and one changed or
removed after it was read as `changed_while_read`, without a copy, and all are looked at again by the next run).

Every input file ends in exactly one place: counts in = pooled + quarantined (per reason). Files under a hidden name
(a dot first) at any depth of the site folder are not inputs (`medtriage.io.site_folder`). A run stopped by Ctrl-C,
SIGTERM or SIGHUP finishes and records the files in progress (committing the index's last batch, `Ledger.commit`),
begins no other and ends (exit status 128 + the signal's number) before the pool's labels and the audit log are written:
the next run takes up the rest, and writes them.
Torch-free and pandas-free: a site installs only the base package.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice, takewhile
from pathlib import Path

from medtriage.arguments import path as path_argument  # `path` names a file in this module's loops
from medtriage.arguments import positive_int, refuse_file_as_folder
from medtriage.errors import ConfigError, DataNotFoundError, MedTriageError
from medtriage.io.deid import DeidOptions
from medtriage.io.header_warnings import say_header_warnings, saying_header_warnings
from medtriage.io.ingest_file import DEFAULT_MAX_FILE_BYTES, NOT_STARTED, init_pool_worker, init_worker, process_file
from medtriage.io.ingest_ledger import (
    INDEX_FILE,
    IngestSummary,
    Ledger,
    drop_torn_line,
    ledger_folder,
    logged_patient_identities,
    pooled_pixels,
    read_index,
    write_audit_log,
)
from medtriage.io.safe_output import hold_exclusive, remove_partials, write_new
from medtriage.io.site_folder import SITE_LABELS_FILE, SiteFolder, read_site_folder
from medtriage.io.site_key import SiteKey, load_site_key
from medtriage.io.site_labels import read_site_labels, write_pool_labels
from medtriage.progress import progress as with_progress
from medtriage.project import project_path
from medtriage.signals import STOPPING, handling

LOCK_FILE = "ingest.lock"
IN_FLIGHT_PER_WORKER = 2  # files handed to the workers at a time, per worker: enough to keep each busy


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
    _refuse_linked_outputs(contents.inputs, pool, quarantine)
    if refuse_empty:
        _refuse_empty_site_folder(src, contents)
    run = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    started = time.time()
    with _site_lock(ledger_dir, site) as locked:
        _check_patient_identity(ledger_dir, options, site)
        drop_torn_line(ledger_dir / INDEX_FILE)  # before reading: a torn row must not mark its input done
        index = read_index(ledger_dir / INDEX_FILE)
        sources = [str(path) for path in contents.inputs]
        summary = IngestSummary(site, run, counts_in=len(sources), hidden=len(contents.hidden))
        site_dir.mkdir(parents=True, exist_ok=True)
        remove_partials(site_dir)  # temporary files of a killed run; their inputs are not in the index, so they run again
        ledger = Ledger(site, site_dir, ledger_dir / INDEX_FILE, quarantine, run, index, pooled_pixels(pool))
        with closing(ledger), _stop_requests(site) as stop:
            init_args = (key, options, frozenset(index), verify_pixels, max_file_bytes, saying_header_warnings())
            with closing(_map(sources, workers, progress, site, init_args, stop.flag)) as outcomes:
                for done, out in enumerate(outcomes, 1):
                    ledger.record(out, summary)
                    stop.done = done
            ledger.commit()  # the last batch, while a stop is still heard as one (close commits it after an error)
            if stop.signum is None and locked:  # every input recorded, and no other run's batch in progress
                summary.unindexed_set_aside = ledger.set_aside_unindexed(key.content_key)
        if stop.signum is not None:
            raise IngestStopped(site, stop.signum, stop.done, len(sources))
        rows = ledger.index.values()
        summary.flags = Counter(r["flag"].split(":")[0] for r in rows if r["flag"] and r["content_key"] in ledger.seen)
        summary.labels = write_pool_labels(labels, site_dir / SITE_LABELS_FILE, [r for r in rows if r["outcome"] == "pooled"], key)
        summary.log_path = str(write_audit_log(ledger_dir, summary, options, workers, started))
    return summary


class IngestStopped(KeyboardInterrupt):
    """A run stopped by a signal once the files in progress were recorded: a rerun takes up the rest."""

    def __init__(self, site: str, signum: int, done: int, total: int):
        self.signum = signum
        super().__init__(
            f"ingest of site {site!r} stopped by {signal.Signals(signum).name} after {done} of {total} files: run the "
            "same ingest again to take up the rest (what this run recorded is not ingested again)"
        )


@dataclass
class _Stop:
    """A stop asked of the run: `flag` is shared with the workers (`ingest_file.process_file`)."""

    flag: object = field(default_factory=lambda: multiprocessing.RawValue("b", 0))
    signum: int | None = None
    done: int = 0  # the files recorded so far


@contextmanager
def _stop_requests(site: str) -> Iterator[_Stop]:
    """Ctrl-C, SIGTERM and SIGHUP stop the run in the block: no file is begun after, those in progress are finished and
    recorded, and the next run takes up the rest. A second signal stops it at once (KeyboardInterrupt). A signal the
    process ignores (nohup, a background job) stays ignored. Only the main thread may set signal handlers: elsewhere
    the block runs with the process's own."""
    stop = _Stop()

    def request(signum, frame):
        if stop.signum is not None:
            raise KeyboardInterrupt(f"signal {signum}")
        stop.signum, stop.flag.value = signum, 1
        _say(f"stopping the ingest of site {site!r}: files in progress are finished, no other is begun (a second signal stops at once)")

    with handling(STOPPING, request, keep_ignored=True):
        yield stop


def _say(line: str) -> None:
    """`line` on stderr from a signal handler: written straight to the descriptor, as the handler may have come in the
    middle of a write to sys.stderr (a progress line)."""
    try:
        os.write(sys.stderr.fileno(), f"{line}\n".encode())
    except (OSError, ValueError):  # no terminal left (a hang-up), or no stderr descriptor
        pass


@contextmanager
def _site_lock(ledger_dir: Path, site: str) -> Iterator[bool]:
    """Held for a whole ingest of one site. A second ingest of the site at once would delete the first one's temporary
    files as a killed run's leftovers, and both would write the index: it is refused instead. Gives whether the lock
    is held: not where the file system has no locks (`hold_exclusive`), where the run goes on unlocked."""
    ledger_dir.mkdir(parents=True, exist_ok=True)

    def busy(holder: str) -> MedTriageError:
        return MedTriageError(
            f"another ingest of site {site!r} into this pool is running (process {holder})",
            where=ledger_dir / LOCK_FILE,
            hint="wait for it to finish, then run this ingest again: it adds only what the other did not",
        )

    descriptor = hold_exclusive(ledger_dir / LOCK_FILE, busy)
    try:
        yield descriptor is not None
    finally:
        if descriptor is not None:
            os.close(descriptor)


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


def _check_folders(src: Path, pool: Path, quarantine: Path) -> None:
    """Identifiable originals (the site folder, the quarantine) stay out of the pool, and no output lies inside the
    site folder: the next run would read it back as input and pool every image again under new pseudonyms."""
    if quarantine.is_relative_to(pool):
        raise ConfigError("the quarantine holds identifiable originals and must not be inside the pool", where=quarantine)
    if src.is_relative_to(pool) or pool.is_relative_to(src):
        raise ConfigError("the site folder and the pool must not be inside one another", where=pool)
    if quarantine.is_relative_to(src):
        raise ConfigError("the quarantine must not be inside the site folder (a rerun would ingest it)", where=quarantine)


def _refuse_linked_outputs(inputs: list[Path], pool: Path, quarantine: Path) -> None:
    """A link in the site folder may lead into the pool or the quarantine: what it reaches would be ingested again,
    pooled images under second pseudonyms and quarantined originals as duplicates."""
    for path in inputs:
        real = path.resolve()
        for what, folder in (("pool", pool), ("quarantine", quarantine)):
            if real.is_relative_to(folder):
                raise ConfigError(
                    f"an entry of the site folder leads into the {what} ({real})",
                    where=path,
                    hint=f"remove the link from the site folder, or point it at the site's own files, not the {what}",
                )


def _map(sources: list[str], workers: int, progress: bool, site: str, init_args: tuple, stop=None):
    """Outcomes in input order, up to the first file `stop` (`init_worker`'s) came before: the files after it are left
    to the next run, even one done meanwhile, so that the ledger sees every input before them and none after."""

    def shown(outcomes):  # a bar on a terminal; plain lines in the log of a scheduled ingest
        started = takewhile(lambda out: out.status != NOT_STARTED, outcomes)
        return with_progress(started, len(sources), f"ingest {site}", "file", disable=not progress)

    stop = multiprocessing.RawValue("b", 0) if stop is None else stop
    if workers <= 1:
        init_worker(*init_args, stop)
        yield from shown(map(process_file, sources))
        return
    pool = ProcessPoolExecutor(max_workers=workers, initializer=init_pool_worker, initargs=(os.getpid(), *init_args, stop))
    try:
        yield from shown(_in_order(pool, sources, IN_FLIGHT_PER_WORKER * workers, stop))
    finally:
        stop.value = 1  # the run is over (done, stopped or failed): a worker begins none of the files still handed out
        pool.shutdown(cancel_futures=True)


def _in_order(pool: ProcessPoolExecutor, sources: Iterable[str], window: int, stop) -> Iterator:
    """Outcomes in input order (the ledger resolves duplicates by it), with at most `window` files handed out at a
    time: each outcome carries a file's bytes, and `Executor.map` would take every input at once, so the outcomes
    after one slow file would pile up in memory while it waits. None is handed out once `stop` is set."""
    sources = iter(sources)
    pending = deque(pool.submit(process_file, source) for source in islice(sources, window))
    while pending:
        yield pending.popleft().result()
        for source in islice(sources, 0 if stop.value else 1):  # the next input, if any is left
            pending.append(pool.submit(process_file, source))


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
    parser.add_argument(
        "--sites", type=path_argument, default=project_path("data/sites"), help="folder of site folders (default: %(default)s)"
    )
    parser.add_argument("--into", type=path_argument, default=project_path("data/pool/ingested"), help="pool folder (default: %(default)s)")
    parser.add_argument("--keys", type=path_argument, help="folder of <site>.key secrets (default: SITES/.keys)")
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
    try:
        summaries = ingest_sites(
            args.sites,
            args.into,
            keys_dir=args.keys,
            create_keys=args.create_keys,
            workers=args.workers,
            verify_pixels=args.verify_pixels,
            max_file_bytes=args.max_file_bytes,
        )
    except IngestStopped as stopped:
        return _stopped(stopped)
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
    p.add_argument("src", metavar="SRC", type=path_argument, help="the site's DICOM export folder (labels.csv at its top, optional)")
    p.add_argument("--site", required=True, help="site name, e.g. site_a")
    p.add_argument("--into", required=True, metavar="POOL", type=path_argument, help="pool folder (what leaves the site)")
    p.add_argument(
        "--secret-file",
        type=path_argument,
        help="the site's secret key file (else $MEDTRIAGE_SITE_SECRET); keep it outside the pool and SRC",
    )
    p.add_argument("--quarantine", type=path_argument, help="where originals that cannot be pooled go (default: POOL-quarantine/SITE)")
    p.add_argument("--workers", type=positive_int, default=1, help="worker processes (default 1)")
    p.add_argument(
        "--retain",
        default=",".join(DeidOptions().retain_characteristics),
        help="patient characteristics to retain, comma-separated ('' for none; default: %(default)s)",
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
    try:
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
    except IngestStopped as stopped:
        return _stopped(stopped)
    print(summary.line())
    print(f"audit log: {summary.log_path}")
    return 0


def _stopped(stopped: IngestStopped) -> int:
    """A command's end after a stop: what was done and what to do, and the exit status of a process the signal ended."""
    print(stopped, file=sys.stderr)
    return 128 + stopped.signum
