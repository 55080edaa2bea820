"""`medtriage score` (files and folders -> triage table/JSON/CSV, optional DICOM SR) and `medtriage serve` (HTTP)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Iterator

from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor, Rejection, Score

TOKEN_ENV = "MEDTRIAGE_TOKEN"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
CSV_COLUMNS = ["status", "file", "frame", "finding", "probability", "priority", "sop_uid", "study_uid", "series_uid",
               "modality", "model", "version", "sha256", "provider", "reason"]


def register(subparsers) -> None:
    score = subparsers.add_parser("score", help="score DICOM files or folders with a model package")
    score.add_argument("package", help="model package folder, e.g. models/pneumonia-r18")
    score.add_argument("paths", nargs="*", help="DICOM files or folders (searched recursively)")
    score.add_argument("--npz", metavar="FILE", help="score a split of a MedMNIST-layout npz instead (reference labels in --json)")
    score.add_argument("--split", default="test", choices=["train", "val", "test"], help="the npz split to score (default: test)")
    output = score.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    output.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    score.add_argument("--sr", metavar="OUTDIR", help="also write one DICOM Structured Report per scored file here")
    score.add_argument("--mpp", type=float, default=None, help="scan resolution (µm/pixel) of slides that do not record it")
    score.add_argument("--heatmaps", metavar="OUTDIR", help="write a tile-probability heatmap PNG per slide here")
    score.add_argument("--overlays", metavar="OUTDIR", help="write a PNG per scored DICOM file here: the image with where the model looked")
    _runtime_options(score)
    score.set_defaults(func=run_score)

    serve = subparsers.add_parser("serve", help="serve a model package over HTTP (FastAPI + uvicorn)")
    serve.add_argument("package", help="model package folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token", default=None, help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV})")
    serve.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest accepted request body")
    serve.add_argument("--worklist-size", type=_positive_int, default=None, metavar="N",
                       help="scored files the /worklist page keeps, newest first (default: 256)")
    _runtime_options(serve)
    serve.set_defaults(func=run_serve)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="ONNX Runtime provider (no silent fallback)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")


# --- score ---------------------------------------------------------------------------------------

def collect_files(paths: list[str]) -> tuple[list[Path], list[Rejection], bool]:
    """Files to score (folders expanded recursively, sorted), missing paths as rejections, and
    whether a folder was given (then a progress bar is shown)."""
    files, missing, any_folder = [], [], False
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            any_folder = True
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            missing.append(Rejection(raw, "no such file or folder", "FileNotFoundError"))
    return _whole_slides_as_folders(files), missing, any_folder


def _whole_slides_as_folders(files: list[Path]) -> list[Path]:
    """A DICOM whole-slide image is a series of files (levels, label, overview): it is scored once, as its folder."""
    from medtriage.io.slide_reader import is_dicom_wsi_file

    kept, slide_folders = [], set()
    for path in files:
        if path.suffix.lower() in ("", ".dcm") and is_dicom_wsi_file(path):
            if path.parent not in slide_folders:
                slide_folders.add(path.parent)
                kept.append(path.parent)
        else:
            kept.append(path)
    return kept


def score_paths(predictor: Predictor, files: list[Path], progress: bool, sr_dir: str | None,
                slide_mpp: float | None = None, heatmap_dir: str | None = None,
                overlay_dir: str | None = None) -> Iterator[Score | Rejection]:
    from tqdm import tqdm

    from medtriage.io.pathology import is_slide_path
    from medtriage.serve.slides import score_slide_file

    for path in tqdm(files, desc="scoring", unit="file", disable=not progress, file=sys.stderr):
        if is_slide_path(path):  # whole-slide images: tiles -> one slide score (no DICOM SR)
            yield score_slide_file(predictor, path, slide_mpp, heatmap_dir)
            continue
        outcome = predictor.score_or_reject(path, str(path))
        if isinstance(outcome, Rejection):
            yield outcome
            continue
        if sr_dir:
            rejection = _write_sr(predictor, path, outcome, sr_dir)
            if rejection:
                yield rejection
                continue
        if overlay_dir:
            rejection = _write_overlay(predictor, path, outcome, overlay_dir)
            if rejection:
                yield rejection
                continue
        yield from outcome


def _write_sr(predictor: Predictor, path: Path, scores: list[Score], sr_dir: str) -> Rejection | None:
    from medtriage.errors import MedTriageError
    from medtriage.serve.dicom_results import write_sr

    try:
        write_sr(path, scores, predictor.package, sr_dir)
    except MedTriageError as err:
        return Rejection(str(path), f"scored, but no SR written: {err.reason}", type(err).__name__)
    return None


def _write_overlay(predictor: Predictor, path: Path, scores: list[Score], overlay_dir: str) -> Rejection | None:
    from medtriage.errors import MedTriageError
    from medtriage.serve.saliency import write_overlay

    try:
        write_overlay(predictor, path, scores, overlay_dir)
    except MedTriageError as err:
        return Rejection(str(path), f"scored, but no overlay written: {err.reason}", type(err).__name__)
    return None


def run_score(args: argparse.Namespace) -> int:
    if not args.paths and not args.npz:
        print("error: give DICOM files/folders to score, or --npz FILE", file=sys.stderr)
        return 2
    predictor = Predictor(load_package(args.package), provider=args.provider, threads=args.threads)
    if args.npz:
        return _score_npz(predictor, args)
    files, missing, any_folder = collect_files(args.paths)
    outcomes = list(score_paths(predictor, files, progress=any_folder, sr_dir=args.sr, slide_mpp=args.mpp, heatmap_dir=args.heatmaps,
                               overlay_dir=args.overlays))
    scores = [o for o in outcomes if isinstance(o, Score)]
    rejected = missing + [o for o in outcomes if isinstance(o, Rejection)]
    if args.json:
        print(json.dumps(result_document(predictor, scores, rejected), indent=2))
    elif args.csv:
        write_csv(sys.stdout, predictor, scores, rejected)
    else:
        print(format_table(predictor, scores, rejected))
    print(f"{len(files) + len(missing)} input(s): "
          f"{len({s.file for s in scores})} file(s) scored ({len(scores)} image(s)), {len(rejected)} rejected; "
          f"provider {predictor.provider}", file=sys.stderr)
    return 1 if rejected else 0


def _score_npz(predictor: Predictor, args: argparse.Namespace) -> int:
    """`--npz FILE --split S`: every image of the split through the package's ONNX session."""
    from medtriage.errors import MedTriageError
    from medtriage.serve.npz import score_npz

    try:
        scores, labels = score_npz(predictor, args.npz, args.split)
    except MedTriageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**result_document(predictor, scores, []), "labels": labels}, indent=2))
    elif args.csv:
        write_csv(sys.stdout, predictor, scores, [])
    else:
        print(format_table(predictor, scores, []))
    print(f"{len(labels)} image(s) of {args.npz} [{args.split}] scored; provider {predictor.provider}", file=sys.stderr)
    return 0


def result_document(predictor: Predictor, scores: list[Score], rejected: list[Rejection]) -> dict:
    """The JSON form of a scoring job (CLI --json and the HTTP response)."""
    return {
        "model": {**predictor.package.identity(), "provider": predictor.provider},
        "results": [s.as_dict() for s in scores],
        "rejected": [r.as_dict() for r in rejected],
    }


def write_csv(stream, predictor: Predictor, scores: list[Score], rejected: list[Rejection]) -> None:
    writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in [s.as_dict() for s in scores] + [r.as_dict() for r in rejected]:
        writer.writerow({**row, "status": row["status"], "provider": predictor.provider})


def format_table(predictor: Predictor, scores: list[Score], rejected: list[Rejection]) -> str:
    """The radiologist's view: file, finding, p(positive), priority, model."""
    package = predictor.package
    header = ["file", "finding", f"p({package.positive_label})", "priority", "model"]
    rows = [[_file_label(s), s.finding, f"{s.probability:.2f}", s.priority, package.describe(with_sha=i == 0)]
            for i, s in enumerate(scores)]
    rows += [[Path(r.file).name, "—", "—", "REJECTED", r.reason] for r in rejected]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + "  " + str(row[-1]) for row in [header, *rows]]
    return "\n".join(lines)


def _file_label(score: Score) -> str:
    name = Path(score.file).name
    return f"{name} [frame {score.frame}]" if score.frame is not None else name


# --- serve ---------------------------------------------------------------------------------------

def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from medtriage.serve.http import create_app
    from medtriage.serve.worklist import DEFAULT_CAPACITY

    predictor = Predictor(load_package(args.package), provider=args.provider, threads=args.threads)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    app = create_app(predictor, token=token, max_bytes=args.max_bytes,
                     worklist_size=DEFAULT_CAPACITY if args.worklist_size is None else args.worklist_size)
    print(f"serving {predictor.package.describe()} on http://{args.host}:{args.port} (provider {predictor.provider}, "
          f"{'token required' if token else 'no token'}; docs at /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
