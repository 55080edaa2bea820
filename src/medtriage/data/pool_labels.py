"""A pooled site's labels.csv as the pool builder reads it: read once within its size limit, parsed into
identifier -> findings, and each image's finding looked up with the reason it cannot be used (no row, conflicting
rows, an empty or unknown finding). The site side's label table (before de-identification) is `medtriage.io.site_labels`.
"""

from __future__ import annotations

import csv
import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from medtriage.data.sources.medmnist import PNEUMONIA_LABELS
from medtriage.errors import printable
from medtriage.io.site_folder import SITE_LABELS_FILE
from medtriage.io.site_labels import MAX_LABELS_BYTES, labels_size_problem

KEY_COLUMNS = {"sop_instance_uid": "sop_uid", "accession_number": "accession_number"}  # labels.csv -> header field
FINDING_COLUMNS = ("finding", "label")
SHOWN_CHARS, HEADER_SHOWN_CHARS = 64, 240  # of a labels.csv cell, and its header, quoted in a reason: a cell can hold 128 KiB


@dataclass
class LabelsFile:
    """A site's labels.csv, read once: the bytes the inputs hash records are the bytes parsed. `data` is None when
    there is nothing to parse (then `problem` says why)."""

    data: bytes | None = None
    problem: str | None = None


@dataclass
class LabelTable:
    """A site's labels.csv: identifier -> [(line number, finding)], or the problem that makes it unusable."""

    site: str
    key_column: str | None = None
    entries: dict = field(default_factory=dict)
    problem: str | None = None


def read_labels(path: Path, site: str) -> LabelTable:
    """Parse a hospital's labels.csv; header names are matched ignoring case, spaces and dashes."""
    return parse_labels(read_labels_file(path), site)


def read_labels_file(path: Path) -> LabelsFile:
    """The bytes of a site's labels.csv, from one open file: its size is bounded on that file, before it is read and
    again by what was read (a file replaced or grown after the check is not read past it). Parsed, a table takes
    about ten times its file's size in memory."""
    missing = LabelsFile(problem=f"site has no {SITE_LABELS_FILE} (expected {path})")
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO of that name must not wait for a writer
    except FileNotFoundError:
        return missing
    except OSError as err:
        return LabelsFile(problem=f"{SITE_LABELS_FILE} cannot be opened ({err.strerror}; expected a readable file at {path})")
    try:
        status = os.fstat(handle)
        if not stat.S_ISREG(status.st_mode):  # a folder or a device of that name
            return missing
        oversized = labels_size_problem(status.st_size)
        if not oversized:
            with os.fdopen(handle, "rb", closefd=False) as f:
                data = f.read(MAX_LABELS_BYTES + 1)
            oversized = labels_size_problem(len(data))
    finally:
        os.close(handle)
    if oversized:
        return LabelsFile(problem=f"{oversized} (keep only its identifier and finding columns)")
    return LabelsFile(data)


def parse_labels(labels: LabelsFile, site: str) -> LabelTable:
    """The label table of a site's labels.csv as read (`read_labels_file`), or the problem that makes it unusable."""
    table = LabelTable(site, problem=labels.problem)
    if labels.data is None:
        return table
    # A spreadsheet's export that cannot be read: the site's files are rejected, the run goes on
    try:
        text = labels.data.decode("utf-8-sig")  # Excel's byte order mark goes
    except UnicodeDecodeError as err:
        table.problem = f"{SITE_LABELS_FILE} is not UTF-8 text (byte {err.start}: {err.reason}; save it again as 'CSV UTF-8')"
        return table
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        _read_label_rows(reader, table)
    except csv.Error as err:
        table.key_column, table.entries = None, {}
        table.problem = (
            f"{SITE_LABELS_FILE} cannot be read as CSV (line {reader.line_num}: {printable(str(err))}; "
            "export it again with only its identifier and finding columns)"
        )
    return table


def _read_label_rows(reader, table: LabelTable) -> None:
    header = [_column_name(h) for h in next(reader, [])]
    key = next((c for c in KEY_COLUMNS if c in header), None)
    finding = next((c for c in FINDING_COLUMNS if c in header), None)
    if key is None or finding is None:
        table.problem = (
            f"{SITE_LABELS_FILE} lacks columns ({' or '.join(KEY_COLUMNS)}, and finding; found {shown(str(header), HEADER_SHOWN_CHARS)})"
        )
        return
    table.key_column = key
    key_at, finding_at = header.index(key), header.index(finding)
    ended = reader.line_num
    for values in reader:
        line, ended = ended + 1, reader.line_num  # where the row starts: a quoted cell may span several lines
        if any(value.strip() for value in values):  # a row of blank cells is a blank line, as a spreadsheet writes it
            padded = values + [""] * (len(header) - len(values))
            table.entries.setdefault(padded[key_at].strip(), []).append((line, padded[finding_at].strip().lower()))


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """A labels.csv cell (or its header) as a reason quotes it: short, and on one line."""
    return printable(value[:limit]) + ("..." if len(value) > limit else "")


def _column_name(header: str) -> str:
    return header.strip().lower().replace(" ", "_").replace("-", "_")


def label_problem(table: LabelTable, key: str) -> str | None:
    if table.problem:
        return table.problem
    entries = table.entries.get(key) if key else None  # a blank identifier names no image: it must not match a blank cell
    if not entries:
        return f"no label row in {SITE_LABELS_FILE} ({table.key_column} {shown(key) if key else 'missing in the header'})"
    findings = {finding for _, finding in entries}
    lines = ", ".join(str(line) for line, _ in entries)
    if len(findings) > 1:
        return f"conflicting findings in {SITE_LABELS_FILE} ({shown(str(sorted(findings)))} on lines {lines})"
    finding = findings.pop()
    if not finding:
        return f"empty finding in {SITE_LABELS_FILE} (line {lines})"
    if finding not in PNEUMONIA_LABELS:
        return f"unknown finding in {SITE_LABELS_FILE} ('{shown(finding)}' on line {lines}; expected {' or '.join(PNEUMONIA_LABELS)})"
    return None
