"""One pooled manifest from hospital site folders (`<sites_dir>/<site>/*.dcm` + `labels.csv`).

Every file is decoded through `medtriage.io.dicom` (the same path serving uses) and joined to its
site's `labels.csv` by SOP Instance UID or accession number. Nothing is dropped silently: each file
becomes a manifest row or a reject, and each label row that names no file becomes a reject, so
files + orphan label rows = rows + rejects. Manifest paths are relative to `sites_dir`, so the data
fingerprint does not depend on where the data lives.

Files under a hidden name (a dot first) at any depth are not site data (`medtriage.io.site_folder`). A build that
would hold no image at all is refused, its rejects kept to read.

A pool folder remembers a hash of its inputs (file names, sizes, mtimes, labels.csv contents and
the split settings) and of the manifest and label names it wrote; building again from unchanged inputs reuses it
while those files are still the ones it wrote. A file's size and mtime are taken as it is decoded, before and after: a
file replaced meanwhile is decoded again, so that the hash recorded describes the files the pool holds. Builds of one
pool folder take turns (`pool_lock`): one started while another runs waits for it, then reuses what it built.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from medtriage.data.manifest import Manifest, PoolWriter, load_manifest
from medtriage.data.pool_folder import LABELS_FILE, MANIFEST_FILE, REJECTS_FILE, pool_lock
from medtriage.data.pool_labels import KEY_COLUMNS, LabelsFile, LabelTable, label_problem, parse_labels, read_labels_file, shown
from medtriage.data.sources.medmnist import PNEUMONIA_LABELS
from medtriage.data.splits import assign_splits
from medtriage.errors import DataNotFoundError, DicomError, InputError
from medtriage.io.clamped import bounded_source, read_part10
from medtriage.io.deid import patient_id_text
from medtriage.io.dicom import read_dicom
from medtriage.io.header_warnings import say_header_warnings, saying_header_warnings
from medtriage.io.ingest_ledger import ledger_folder, logged_patient_identities
from medtriage.io.safe_output import write_atomic
from medtriage.io.site_folder import SITE_LABELS_FILE, read_site_folder
from medtriage.progress import progress

DEFAULT_SITES = Path("data/pool/ingested")  # what ingest_sites.py writes: site exports pass de-identification first
DEFAULT_POOL = Path("data/pool/pneumonia_sites")
INPUTS_FILE = "inputs.json"
POOL_FILES = (MANIFEST_FILE, LABELS_FILE)  # what a reused pool is read by; hashed at build time, checked on reuse
POOL_FORMAT = 4  # bump when the way rows are built changes, to invalidate cached pools (4: a DICOM study splits whole)
IN_PROCESS_BELOW = 200  # files; starting worker processes costs more than it saves
READS_OF_A_CHANGING_FILE = 3  # a file that changes each time it is decoded stops the build
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float and Pixel Data: where a header ends


@dataclass
class Decoded:
    """One file's decode result; `pixels` is None when it was rejected (then `error` says why)."""

    site: str
    path: str  # relative to sites_dir
    pixels: object = None
    fields: dict = field(default_factory=dict)
    error: str | None = None
    state: tuple | None = None  # the file's identity, size and times as it was decoded; None: gone
    changed: bool = False  # its state after decoding differed from before: what was decoded is not known


def build_sites_pool(
    sites_dir: str | Path,
    pool_dir: str | Path,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    workers: int | None = None,
    verbose: bool = True,
) -> Manifest:
    """Decode every site's files, join the labels, split by patient, write the pool; reuse it if unchanged."""
    sites_dir, pool_dir = Path(sites_dir).resolve(), Path(pool_dir).resolve()
    files, hidden = _site_files(sites_dir)
    _say(bool(verbose and hidden), f"left out {len(hidden)} hidden name(s), not site data: {', '.join(hidden)}")
    for site in files:
        _refuse_mixed_patient_keys(sites_dir, site)
    labels = {site: read_labels_file(sites_dir / site / SITE_LABELS_FILE) for site in files}
    inputs_hash = _inputs_hash(sites_dir, files, labels, seed, val_fraction, test_fraction)
    with pool_lock(pool_dir):  # a build started meanwhile waits here, then finds this one's pool cached
        if _cached(pool_dir, inputs_hash, verbose):
            manifest = load_manifest(pool_dir)
            _record_sites_dir(pool_dir, sites_dir)
            _say(verbose, f"reusing pool built from the same inputs\n{manifest.summary()}{_empty_sites(sites_dir, files)}")
            return manifest
        (pool_dir / INPUTS_FILE).unlink(missing_ok=True)  # a half-written pool must never look cached
        decoded = _settled(sites_dir, _decode_all(sites_dir, files, workers, verbose))
        tables = {site: parse_labels(labels[site], site) for site in files}
        manifest = _write_pool(pool_dir, decoded, tables, seed, val_fraction, test_fraction)
        if not len(manifest.rows):
            _refuse_empty_pool(sites_dir, pool_dir)
        states = {item.path: item.state for item in decoded}  # as decoded, not as hashed before (a file replaced since)
        decoded_hash = _inputs_hash(sites_dir, files, labels, seed, val_fraction, test_fraction, states=states)
        record = {"inputs_sha256": decoded_hash, "sites_dir": str(sites_dir), "pool_sha256": _pool_hashes(pool_dir)}
        write_atomic(pool_dir / INPUTS_FILE, json.dumps(record, indent=1).encode())
    _say(verbose, manifest.summary() + _empty_sites(sites_dir, files))
    return manifest


def _refuse_mixed_patient_keys(sites_dir: Path, site: str) -> None:
    """A site ingested under two patient-keying rules (its audit logs say so; ingest refuses this now, but pools
    built before did not) may hold a patient under two pseudonyms, which the patient-level split could put on both
    sides of it: every test figure would be in doubt."""
    rules = logged_patient_identities(ledger_folder(sites_dir, site))
    if len(rules) > 1:
        raise InputError(
            f"site {site!r} was ingested keying patients on {' and then on '.join(rules)}: a patient whose files carry "
            "an Issuer of Patient ID may be in the pool twice, under two pseudonyms",
            where=ledger_folder(sites_dir, site),
            hint="ingest the site again into a new pool (medtriage ingest SITE_FOLDER --site NAME --into NEW_POOL) and build from that",
        )


def _refuse_empty_pool(sites_dir: Path, pool_dir: Path) -> None:
    """No pool at all rather than a 0-image one that training would pick up; the rejects stay to say why."""
    (pool_dir / MANIFEST_FILE).unlink()
    raise DataNotFoundError(
        f"no image of the site folders {sites_dir} made it into the pool",
        where=pool_dir / REJECTS_FILE,
        hint="read the reasons there, fix the files or labels.csv at the sites, and build again",
    )


def _empty_sites(sites_dir: Path, files: dict[str, list[Path]]) -> str:
    """A line per site folder without files: it shows in neither the rows nor the rejects."""
    return "".join(f"\nsite {site}: no image files in {sites_dir / site}" for site, paths in files.items() if not paths)


def _say(verbose: bool, text: str) -> None:
    if verbose:
        print(text)


def _site_files(sites_dir: Path) -> tuple[dict[str, list[Path]], list[str]]:
    """Site name -> every input file in its folder, sorted; and the outermost hidden names left out, relative to
    `sites_dir`."""
    if not sites_dir.is_dir():
        raise DataNotFoundError(
            "site folders not found", where=sites_dir, hint="create them with `python scripts/make_sites.py` (or `medtriage make-sites`)"
        )
    sites, hidden = {}, []
    for folder in sorted(p for p in sites_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        contents = read_site_folder(folder)
        sites[folder.name] = contents.inputs
        hidden += [str(folder.name / root) for root in contents.hidden_roots()]
    if not sites:
        raise DataNotFoundError(
            "no site folders inside", where=sites_dir, hint="expected <sites_dir>/<site>/*.dcm with a labels.csv per site"
        )
    return sites, hidden


def _inputs_hash(
    sites_dir: Path, files: dict[str, list[Path]], labels: dict[str, LabelsFile], *settings, states: dict[str, tuple | None] | None = None
) -> str:
    """The hash of the inputs: each file's size and mtime as it is now, or as `states` (relative path -> `file_state`)
    recorded it when decoded."""
    digest = hashlib.sha256(json.dumps([POOL_FORMAT, PNEUMONIA_LABELS, *settings]).encode())
    for site, paths in files.items():
        for path in paths:
            relative = str(path.relative_to(sites_dir))
            state = file_state(path) if states is None else states[relative]
            digest.update(f"{relative}|{'<gone>' if state is None else f'{state[2]}|{state[3]}'}\n".encode())
        table = labels[site]
        digest.update(table.data if table.data is not None else f"<{table.problem}>".encode())
    return digest.hexdigest()


def file_state(path: Path) -> tuple | None:
    """(device, inode, size, mtime, ctime) of `path`, None when it is gone: the same before and after a file is decoded
    only if it was neither replaced nor written meanwhile."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


def _settled(sites_dir: Path, decoded: list[Decoded]) -> list[Decoded]:
    """`decoded` with each file that changed while it was decoded decoded again, until it stays the same: the pool, and
    the inputs hash it records, must describe the same file. One that changes each time stops the build."""
    for _ in range(READS_OF_A_CHANGING_FILE - 1):
        changed = [index for index, item in enumerate(decoded) if item.changed]
        if not changed:
            return decoded
        for index in changed:
            decoded[index] = decode_file((str(sites_dir), decoded[index].site, decoded[index].path))
    changing = next((item for item in decoded if item.changed), None)
    if changing is not None:
        raise InputError(
            f"a site file changed each time it was read ({READS_OF_A_CHANGING_FILE} times) while the pool was built",
            where=sites_dir / changing.path,
            hint="build the pool again once nothing writes to the site folders (an ingest still running?)",
        )
    return decoded


def _cached(pool_dir: Path, inputs_hash: str, verbose: bool) -> bool:
    """Same inputs, and the pool's files still the ones the build wrote: an edited manifest (a flipped label) or
    label names would otherwise be trained on as if built from the sites."""
    try:
        record = json.loads((pool_dir / INPUTS_FILE).read_text())
        recorded, pool_hashes = record["inputs_sha256"], record["pool_sha256"]
    except (OSError, ValueError, KeyError, TypeError):  # pools recorded before the file hashes are built again once
        return False
    if recorded != inputs_hash or not isinstance(pool_hashes, dict) or not (pool_dir / MANIFEST_FILE).is_file():
        return False
    changed = [name for name, digest in _pool_hashes(pool_dir).items() if pool_hashes.get(name) != digest]
    _say(bool(verbose and changed), f"{', '.join(changed)} differs from what the build wrote; building the pool again")
    return not changed


def _record_sites_dir(pool_dir: Path, sites_dir: Path) -> None:
    """Reused from the same files in another place (site folders moved or copied): source files are picked where they
    now lie (`split_files`), not where the pool was first built from."""
    record = json.loads((pool_dir / INPUTS_FILE).read_text())
    if record.get("sites_dir") != str(sites_dir):
        write_atomic(pool_dir / INPUTS_FILE, json.dumps({**record, "sites_dir": str(sites_dir)}, indent=1).encode())


def _pool_hashes(pool_dir: Path) -> dict[str, str | None]:
    return {name: _file_hash(pool_dir / name) for name in POOL_FILES}


def _file_hash(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _decode_all(sites_dir: Path, files: dict[str, list[Path]], workers: int | None, verbose: bool) -> list[Decoded]:
    jobs = [(str(sites_dir), site, str(path.relative_to(sites_dir))) for site, paths in files.items() for path in paths]
    workers = min(workers or os.cpu_count() or 1, max(len(jobs), 1))
    started = time.perf_counter()
    bar = dict(total=len(jobs), desc="decoding site DICOM", unit="file", disable=not verbose)
    if workers == 1 or len(jobs) < IN_PROCESS_BELOW:
        results = [decode_file(job) for job in progress(jobs, **bar)]
        workers = 1
    else:  # spawn: safe even when the caller already started threads (torch, MLflow)
        spawn, say_warnings = multiprocessing.get_context("spawn"), (saying_header_warnings(),)
        with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_init_worker, initargs=say_warnings) as pool:
            results = list(progress(pool.map(decode_file, jobs, chunksize=32), **bar))
    seconds = time.perf_counter() - started
    _say(verbose, f"decoded {len(jobs)} files in {seconds:.1f} s ({len(jobs) / max(seconds, 1e-9):.0f} files/s, {workers} worker(s))")
    return results


def _init_worker(say_warnings: bool) -> None:
    """A worker started afresh (spawn) says pydicom's warnings as the command that started it does."""
    if say_warnings and not saying_header_warnings():
        say_header_warnings()


def decode_file(job: tuple[str, str, str]) -> Decoded:
    """Worker: first frame as [C, H, W] plus the identifiers the manifest and the label join need, and the file's state
    (`file_state`) as it was decoded."""
    sites_dir, site, relative = job
    path = Path(sites_dir) / relative
    before = file_state(path)
    decoded = _decode(site, relative, path)
    decoded.state = file_state(path)
    decoded.changed = decoded.state != before
    return decoded


def _decode(site: str, relative: str, path: Path) -> Decoded:
    try:
        image = read_dicom(path, frame=0)
    except DicomError as err:
        return Decoded(site, relative, fields=_header_ids(path), error=err.reason)
    fields = {
        "patient_id": patient_id_text(image.patient_id),  # the padding a site writes is not part of who it is
        "study_uid": image.study_uid,
        "series_uid": image.series_uid,
        "sop_uid": image.sop_uid,
        "accession_number": image.accession_number,
        **acquisition_facts(image),
    }
    return Decoded(site, relative, pixels=image.pixels[0], fields=fields)


def acquisition_facts(image) -> dict:
    """The header facts a model's declared scope is built from (export writes them into model.json)."""
    return {
        "modality": image.modality,
        "sop_class_uid": image.sop_class_uid,
        "photometric": image.photometric,
        "bits_stored": image.bits_stored,
        "rows": image.rows,
        "columns": image.columns,
        "body_part": image.body_part,
        "view_position": image.view_position,
        "pixel_spacing_mm": "" if image.pixel_spacing is None else "\\".join(f"{v:g}" for v in image.pixel_spacing),
    }


def _header_ids(path: Path) -> dict:
    """Identifiers of a file whose pixels failed, so its label row is not reported a second time. Read through
    `bounded_source`: a failed file is the likeliest to claim value lengths it does not hold. A deflated data set is
    inflated only as far as its pixel data (where pydicom inflates it whole), within the decode limits."""
    try:
        with bounded_source(path, str(path)) as source:  # values are read inside: pydicom's warnings of them name the file
            ds = read_part10(source, str(path), stop_when=_at_pixels, force=True)
            return {"sop_uid": str(ds.get("SOPInstanceUID", "")), "accession_number": str(ds.get("AccessionNumber", ""))}
    except Exception:
        return {}


def _at_pixels(tag, _vr, _length) -> bool:
    """pydicom's stop_before_pixels (its filereader's `_at_pixel_data`): the data set is read up to its pixel data."""
    return tag in PIXEL_TAGS


def _write_pool(
    pool_dir: Path, decoded: list[Decoded], tables: dict[str, LabelTable], seed: int, val_fraction: float, test_fraction: float
) -> Manifest:
    with PoolWriter(pool_dir, PNEUMONIA_LABELS) as writer:
        used: dict[str, set] = {site: set() for site in tables}
        accepted, seen_sops = [], {}
        for item in decoded:
            table = tables[item.site]
            key = str(item.fields.get(KEY_COLUMNS.get(table.key_column, "")) or "").strip()
            used[item.site].add(key)
            reason = item.error or _no_patient(item) or _duplicate(item, seen_sops) or label_problem(table, key)
            if reason:
                writer.reject(item.site, item.path, reason)
            else:
                accepted.append((item, PNEUMONIA_LABELS.index(table.entries[key][0][1])))
        _reject_orphan_rows(writer, tables, used)
        rows = [{"site": item.site, "label": label, **item.fields} for item, label in accepted]
        for (item, label), split in zip(accepted, assign_splits(rows, val_fraction, test_fraction, seed)):
            fields = {k: v for k, v in item.fields.items() if k != "accession_number"}
            writer.add(item.pixels, site=item.site, path=item.path, label=label, split=split, **fields)
        return writer.close()


def _no_patient(item: Decoded) -> str | None:
    """Splits keep each patient's images together; images without a Patient ID would all form one pseudo-patient
    per site, a block that lands in one split whole, and a study UID is no stand-in: a patient's other studies could
    still land in another split. So they are rejected, visibly, rather than grouped by a guess."""
    if item.fields["patient_id"]:
        return None
    return "no Patient ID in the header (patient-level splits need one; fill PatientID at the site and export again)"


def _duplicate(item: Decoded, seen_sops: dict[str, str]) -> str | None:
    """Images are told apart by their SOP Instance UID: one without it would be every other one's duplicate."""
    sop = item.fields["sop_uid"].strip()
    if not sop:
        return "no SOP Instance UID (0008,0018) in the header (the pool tells images apart by it; export the image again)"
    if sop in seen_sops:
        return f"duplicate SOP Instance UID (same image as {seen_sops[sop]})"
    seen_sops[sop] = item.path
    return None


def _reject_orphan_rows(writer: PoolWriter, tables: dict[str, LabelTable], used: dict[str, set]) -> None:
    for site, table in tables.items():
        for key, entries in table.entries.items():
            if not key or key not in used[site]:
                for line, _ in entries:
                    writer.reject(
                        site,
                        f"{site}/{SITE_LABELS_FILE}:{line}",
                        f"label row matches no image ({table.key_column} {shown(key) or '(empty)'})",
                    )


def split_files(pool_dir: str | Path, split: str = "test", per_label: int = 1) -> list[Path]:
    """The first `per_label` source files of each label at each site in one split: DICOM to hand to `medtriage score`
    (every finding shows up in its table)."""
    pool_dir = Path(pool_dir)
    manifest = load_manifest(pool_dir)
    sites_dir = _recorded_sites_dir(pool_dir)
    rows = manifest.split(split).sort_values(["site", "label", "path"]).groupby(["site", "label"]).head(per_label)
    return [_site_file(sites_dir, path, pool_dir) for path in rows["path"]]


def _recorded_sites_dir(pool_dir: Path) -> Path:
    try:
        return Path(json.loads((pool_dir / INPUTS_FILE).read_text())["sites_dir"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataNotFoundError(
            "this pool does not record the site folders it was built from",
            where=pool_dir / INPUTS_FILE,
            hint="source files can be picked only from a pool built from site folders (`python scripts/build_pool.py`)",
        ) from err


def _site_file(sites_dir: Path, relative: str, pool_dir: Path) -> Path:
    """A manifest path is data: it names a file inside the site folders, never one elsewhere."""
    path = PurePath(relative)
    if not relative or path.is_absolute() or ".." in path.parts:
        raise InputError(
            f"manifest path {relative!r} does not lie inside the site folders",
            where=pool_dir / MANIFEST_FILE,
            hint=f"the pool is damaged or was edited by hand; delete {pool_dir} and build it again",
        )
    return sites_dir / path
