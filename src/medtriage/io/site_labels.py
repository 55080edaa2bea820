"""Labels follow the pseudonyms: a site's labels.csv, joined on its original identifiers at the site,
rewritten in the same shape with the new SOP Instance UIDs / accession pseudonyms.

Only key and label columns travel: a hospital export can carry free text (comments, reader names).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from medtriage.errors import ConfigError, InputError
from medtriage.io.safe_output import write_csv_atomic
from medtriage.io.site_key import SiteKey

# A site's label table: about 1.5 million rows of UID, accession number and finding. Parsed, a table takes about ten
# times its file's size in memory, so the file is refused by its size before it is read.
MAX_LABELS_BYTES = 128 << 20

# Column names a hospital export may use, normalised (lower case, no '_' or ' ').
_KEY_COLUMNS = {
    "sop": {"sopuid", "sopinstanceuid", "sop"},
    "study": {"studyuid", "studyinstanceuid"},
    "series": {"seriesuid", "seriesinstanceuid"},
    "accession": {"accession", "accessionnumber"},
    "patient": {"patientid", "patient"},
    "label": {"label", "finding", "diagnosis", "class"},
}


def _column_roles(columns: list[str]) -> dict[str, str]:
    """Role -> the site's column name. Columns with no role (free text, names) are never copied to the pool."""
    roles = {}
    for column in columns:
        norm = column.lower().replace("_", "").replace(" ", "")
        role = next((r for r, names in _KEY_COLUMNS.items() if norm in names), None)
        if role and role not in roles:
            roles[role] = column
    return roles


@dataclass
class SiteLabels:
    """A site's labels.csv as read: its columns, rows and which column plays which role."""

    columns: list[str]
    rows: list[dict]
    roles: dict[str, str]


def read_site_labels(path: Path) -> SiteLabels | None:
    """The site's labels.csv, or None when the site has none. Read before anything is ingested, so a file that cannot
    be used stops the run before it has pooled a file, with what to fix."""
    if not path.is_file():
        return None
    try:
        text = _bounded_bytes(path).decode("utf-8").removeprefix("\ufeff")  # Excel's byte order mark; errors at file offsets
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns, rows = list(reader.fieldnames or []), list(reader)
    except UnicodeDecodeError as err:
        raise InputError(
            f"labels.csv is not UTF-8 text (byte {err.start}: {err.reason})",
            where=path,
            hint="save it as UTF-8 (in Excel: 'CSV UTF-8'), then ingest again",
        ) from err
    except csv.Error as err:
        raise InputError(f"labels.csv cannot be read as CSV ({err})", where=path, hint="export it again as plain CSV") from err
    roles = _column_roles(columns)
    if "label" not in roles or not ({"sop", "accession"} & set(roles)):
        raise ConfigError(
            f"labels.csv needs a label column and a SOP Instance UID or accession column; has {columns}",
            where=path,
            hint="e.g. columns sop_instance_uid,finding",
        )
    return SiteLabels(columns, rows, roles)


def labels_size_problem(size: int) -> str | None:
    """Why a labels file of `size` bytes is refused (None within the limit): the rule ingest and the pool build share."""
    return f"labels.csv holds {size} bytes, over the limit of {MAX_LABELS_BYTES}" if size > MAX_LABELS_BYTES else None


def _bounded_bytes(path: Path) -> bytes:
    """The file's bytes, refused by its size before any is read (and should it grow past the limit while read)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(MAX_LABELS_BYTES + 1) if size <= MAX_LABELS_BYTES else b""
    oversized = labels_size_problem(max(size, len(data)))
    if oversized:
        raise InputError(
            oversized,
            where=path,
            hint="export only the identifier and label columns (e.g. sop_instance_uid,finding), the only ones used, then ingest again",
        )
    return data


def write_pool_labels(labels: SiteLabels | None, pool_labels: Path, pooled: list[dict], key: SiteKey) -> dict:
    """Join the site's labels (original SOP UIDs or accession numbers) onto the pooled files and write them
    in the same shape, keyed by the new values. The site's keys go through the same keyed functions as the
    headers, so the join happens on original identifiers, at the site. Returns counts for the audit log."""
    if labels is None:
        return {"labels_file": False, "images_unlabelled": len(pooled)}
    columns, rows, roles = labels.columns, labels.rows, labels.roles
    by_sop, by_accession, empty = {}, {}, 0
    for row in rows:
        label = (row.get(roles["label"]) or "").strip()
        if not label:
            empty += 1
        elif roles.get("sop") and (row.get(roles["sop"]) or "").strip():
            by_sop[key.uid(row[roles["sop"]])] = label
        elif roles.get("accession") and (row.get(roles["accession"]) or "").strip():
            by_accession[key.accession(row[roles["accession"]])] = label
    out_columns = [c for c in columns if c in roles.values()]  # identifying and free-text columns stay home
    written, used = {}, set()
    for image in sorted(pooled, key=lambda r: r["sop_uid"]):
        match = next(
            ((k, table[k]) for k, table in ((image["sop_uid"], by_sop), (image["accession"], by_accession)) if k and k in table), None
        )
        if match is None:
            continue
        used.add(match[0])
        values = {
            "sop": image["sop_uid"],
            "study": image["study_uid"],
            "series": image["series_uid"],
            "accession": image["accession"],
            "patient": image["patient"],
            "label": match[1],
        }
        row = {roles[r]: values[r] for r in roles}
        written[tuple(row.values())] = row  # accession-keyed exports: one row per accession, as the site wrote it
    write_csv_atomic(pool_labels, out_columns, written.values())  # a killed ingest leaves the previous labels, never half
    labelled = sum(1 for r in pooled if r["sop_uid"] in used or (r["accession"] and r["accession"] in used))
    return {
        "labels_file": True,
        "rows": len(rows),
        "rows_empty_label": empty,
        "rows_matching_no_pooled_image": len(by_sop) + len(by_accession) - len(used),
        "images_labelled": labelled,
        "images_unlabelled": len(pooled) - labelled,
        "columns_not_pooled": len(columns) - len(out_columns),
    }
