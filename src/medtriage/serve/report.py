"""The forms a scoring job's results take: the JSON document (CLI `--json` and the HTTP answer), CSV, and
the radiologist's table."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from medtriage.errors import printable
from medtriage.io.safe_output import spreadsheet_row
from medtriage.serve.predictor import Predictor, Rejection, Score

CSV_COLUMNS = [
    "status",
    "file",
    "frame",
    "finding",
    "probability",
    "priority",
    "sop_uid",
    "study_uid",
    "series_uid",
    "modality",
    "model",
    "version",
    "sha256",
    "provider",
    "reason",
    "decision",
    "flags",
    "code",
    "field",
    "hint",
]


@dataclass
class Unwritten:
    """A result of a scored file (its SR, its overlay) that could not be written: the file's scores stand, and this
    is listed apart from them, saying what is missing, why and what to do."""

    file: str
    output: str  # "SR" or "overlay"
    reason: str
    error: str  # the error type, e.g. DicomError
    hint: str | None = None

    def as_dict(self) -> dict:
        return {"status": "not_written", **asdict(self)}


def result_document(predictor: Predictor, scores: list[Score], rejected: list[Rejection]) -> dict:
    """The JSON form of a scoring job (CLI --json and the HTTP response)."""
    return {
        "model": {**predictor.package.identity(), "provider": predictor.provider},
        "results": [s.as_dict() for s in scores],
        "rejected": [r.as_dict() for r in rejected],
    }


def write_csv(stream, predictor: Predictor, scores: list[Score], rejected: list[Rejection], unwritten: Sequence[Unwritten] = ()) -> None:
    """One row per scored image, then one per rejection, then one per result not written. `flags` (out_of_scope:<field>,
    unusual_input) is joined by '; ': a score scored despite its scope or content must not read as a routine one in the
    spreadsheet."""
    writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in [s.as_dict() for s in scores] + [r.as_dict() for r in rejected] + [u.as_dict() for u in unwritten]:
        writer.writerow(spreadsheet_row({**row, "flags": "; ".join(row.get("flags") or []), "provider": predictor.provider}))


def format_table(predictor: Predictor, scores: list[Score], rejected: list[Rejection]) -> str:
    """The radiologist's view: file, finding, p(positive), priority, the decision against the operating points, and the
    model that scored it (for a file not scored: why not, and what to do)."""
    package = predictor.package
    labels = file_labels([r.file for r in [*scores, *rejected]])
    header = ["file", "finding", f"p({package.positive_label})", "priority", "decision", "model / why not scored"]
    rows = [
        [_frame_label(s, labels[s.file]), s.finding, f"{s.probability:.2f}", s.priority, _decision(s), package.describe(with_sha=i == 0)]
        for i, s in enumerate(scores)
    ]
    rows += [[labels[r.file], "—", "—", "REJECTED", "—", f"{r.reason} ({r.hint})" if r.hint else r.reason] for r in rejected]
    # the header too: the positive label comes from model.json, which the package's digest does not cover
    header, *rows = [[printable(str(cell)) for cell in row] for row in [header, *rows]]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + "  " + str(row[-1]) for row in [header, *rows]]
    return "\n".join(lines)


def _decision(score: Score) -> str:
    flags = getattr(score, "flags", None)
    return score.decision + (f" [{', '.join(flags)}]" if flags else "") if score.decision else "—"


def file_labels(files: Sequence[str]) -> dict[str, str]:
    """How the table names each file: by its name, or by its path where another file has that name (every series of a
    CD holds an IM000001), so that each row names one file."""
    names = Counter(Path(file).name for file in set(files))
    return {file: Path(file).name if names[Path(file).name] == 1 else file for file in files}


def _frame_label(score: Score, label: str) -> str:
    return f"{label} [frame {score.frame}]" if score.frame is not None else label
