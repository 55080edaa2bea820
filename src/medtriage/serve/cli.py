"""`medtriage score` (files and folders -> triage table/JSON/CSV, optional DICOM SR) and `medtriage serve` (HTTP)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from medtriage.arguments import non_negative_int, path_as_typed, positive_float, positive_int, refuse_file_as_folder, whole_number
from medtriage.arguments import path as path_argument  # `path` names a file in this module's loops
from medtriage.errors import printable
from medtriage.io.decode_limits import DecodeLimits, set_default_limits
from medtriage.io.header_warnings import say_header_warnings
from medtriage.serve.admission import DEFAULT_QUEUE
from medtriage.serve.batching import add_batching_options, concurrent_requests, enable_batching
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor, Rejection, Score
from medtriage.serve.report import Unwritten, file_labels, format_table, result_document, write_csv

TOKEN_ENV = "MEDTRIAGE_TOKEN"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_FILES = 1000
DEFAULT_HEADER_TIMEOUT_S = 20.0  # seconds a client has to send a request's whole head (line and headers)
DEFAULT_MAX_CONNECTIONS = 512  # each holds a file descriptor; Linux's usual soft limit is 1024
MAX_THREADS = 1024  # ONNX Runtime takes minutes to start tens of thousands of threads, and more than the cores only slow it
# Below the 90 s after which systemd (DefaultTimeoutStopSec; the unit sets no TimeoutStopSec) SIGKILLs the service: the
# stop then ends with a line saying which requests were cut off, not silently.
DEFAULT_STOP_TIMEOUT_S = 30.0


def register(subparsers) -> None:
    score = subparsers.add_parser("score", help="score DICOM files or folders with a model package")
    score.add_argument("package", type=path_argument, help="model package folder, e.g. models/pneumonia-sites-r18")
    score.add_argument("paths", nargs="*", type=path_as_typed, help="DICOM files or folders (searched recursively)")
    score.add_argument(
        "--npz", metavar="FILE", type=path_argument, help="score a split of a MedMNIST-layout npz instead (reference labels in --json)"
    )
    score.add_argument("--split", default="test", choices=["train", "val", "test"], help="the npz split to score (default: test)")
    output = score.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    output.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    score.add_argument(
        "--sr",
        metavar="OUTDIR",
        type=path_argument,
        help="also write one DICOM Structured Report per scored DICOM file here "
        "(no SR for whole-slide images: their results are in the table, --json or --csv alone)",
    )
    score.add_argument(
        "--mpp",
        type=positive_float,
        default=None,
        help="scan resolution (µm/pixel) of every slide given, overriding what a slide records (for slides that record none, or a wrong one)",
    )
    score.add_argument("--heatmaps", metavar="OUTDIR", type=path_argument, help="write a tile-probability heatmap PNG per slide here")
    score.add_argument(
        "--overlays",
        metavar="OUTDIR",
        type=path_argument,
        help="write a PNG per scored DICOM file here: the image with where the model looked",
    )
    add_runtime_options(score)
    score.set_defaults(func=run_score)

    serve = subparsers.add_parser("serve", help="serve a model package over HTTP (FastAPI + uvicorn)")
    serve.add_argument("package", type=path_argument, help="model package folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    serve.add_argument("--port", type=whole_number(1, 65535), default=8000, help="HTTP port (default: %(default)s)")
    serve.add_argument(
        "--token-file",
        metavar="FILE",
        type=path_as_typed,
        help=f"require 'Authorization: Bearer <token>' with the token "
        f"in FILE (or in ${TOKEN_ENV}); required for a --host other than loopback",
    )
    serve.add_argument("--token", default=None, help="the token itself (discouraged: other users see it in `ps`)")
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow a non-loopback --host without a token (anyone on the network sees the worklist)",
    )
    serve.add_argument(
        "--root-path",
        metavar="PREFIX",
        type=root_path,
        default="",
        help="the path prefix a reverse proxy publishes the service under and strips before passing requests on, "
        "e.g. /medtriage for https://gateway/medtriage/ (default: none)",
    )
    serve.add_argument("--tls-cert", metavar="PEM", type=path_as_typed, help="serve HTTPS with this certificate (chain) file")
    serve.add_argument("--tls-key", metavar="PEM", type=path_as_typed, help="the private key of --tls-cert")
    serve.add_argument(
        "--max-concurrent",
        type=positive_int,
        default=None,
        metavar="N",
        help="requests decoded and scored at once (default: one per core)",
    )
    serve.add_argument(
        "--queue",
        type=non_negative_int,
        default=DEFAULT_QUEUE,
        metavar="N",
        help="requests that may wait for those; more get 503 + Retry-After (default: %(default)s)",
    )
    serve.add_argument(
        "--max-bytes",
        type=positive_int,
        default=DEFAULT_MAX_BYTES,
        metavar="BYTES",
        help="largest accepted request body; a larger one is answered 413 (default: %(default)s)",
    )
    serve.add_argument(
        "--max-files",
        type=positive_int,
        default=DEFAULT_MAX_FILES,
        metavar="N",
        help="most files in one /v1/score request (default: %(default)s)",
    )
    serve.add_argument(
        "--header-timeout",
        type=positive_float,
        default=DEFAULT_HEADER_TIMEOUT_S,
        metavar="SECONDS",
        help="a connection that has not sent a whole request head by then is closed (default: %(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="open connections held at once; one more is answered 503 and closed (default: %(default)s)",
    )
    serve.add_argument(
        "--worklist-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="studies the /worklist page shows, newest first (default: 256)",
    )
    serve.add_argument(
        "--state",
        metavar="DIR",
        type=path_argument,
        default=None,
        help="keep the worklist in this folder (survives restarts); a DICOM node's --state shows its studies",
    )
    serve.add_argument(
        "--stop-timeout",
        type=positive_float,
        default=DEFAULT_STOP_TIMEOUT_S,
        metavar="SECONDS",
        help="on a stop (SIGTERM, Ctrl-C), how long requests in progress get to be answered; those still running then are "
        "cut off, and the command ends with status 1 if an inference call never returned (default: %(default)s)",
    )
    add_runtime_options(serve)
    add_batching_options(serve)
    serve.set_defaults(func=run_serve)


def add_runtime_options(parser: argparse.ArgumentParser, out_of_scope_help: str = "(results are flagged)") -> None:
    """Options every scoring door shares (score, serve, listen): ONNX Runtime, decode limits, scope."""
    parser.add_argument(
        "--provider", choices=["cpu", "cuda"], default="cpu", help="ONNX Runtime provider, no silent fallback (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=whole_number(1, MAX_THREADS),
        default=None,
        metavar="N",
        help="ONNX Runtime intra-op threads (default: all cores)",
    )
    limits = DecodeLimits()
    for option, default, refused in (
        ("--max-frame-pixels", limits.max_frame_pixels, "whose frames have more pixels, before decoding"),
        ("--max-frames", limits.max_frames, "with more frames, before decoding"),
        ("--max-decoded-bytes", limits.max_decoded_bytes, "whose decoded pixels would take more bytes"),
    ):
        parser.add_argument(option, type=positive_int, default=default, metavar="N", help=f"refuse images {refused} (default: %(default)s)")
    parser.add_argument(
        "--allow-out-of-scope",
        action="store_true",
        help=f"score images outside the model's scope or unlike its training images anyway {out_of_scope_help}",
    )
    parser.add_argument(
        "--reduced-j2k",
        action="store_true",
        help="decode JPEG 2000 images only down to the wavelet level the model's input needs (far faster on large "
        "radiographs; scores differ slightly from a full decode: up to 0.02 on the test radiographs)",
    )


def predictor_from_args(args: argparse.Namespace) -> Predictor:
    """The Predictor the runtime options (`add_runtime_options`) describe."""
    return Predictor(
        load_package(args.package),
        provider=args.provider,
        threads=args.threads,
        allow_out_of_scope=args.allow_out_of_scope,
        reduced_j2k=args.reduced_j2k,
    )


# --- score ---------------------------------------------------------------------------------------

OUTPUT_FOLDERS = ("--sr", "--heatmaps", "--overlays")
DICOMDIR = "DICOMDIR"  # a DICOM CD's or folder's index (PS3.10): it lists the images, it is none
NOT_A_FILE = "not a file: a broken link, a pipe or a device (was the study copied whole?)"
LINKED_FOLDER = "a linked folder is not followed (it may lead back up the tree): pass it by its own path"


def collect_files(paths: list[str]) -> tuple[list[Path], list[Rejection], bool]:
    """Files to score (folders expanded recursively, sorted), missing paths, empty folders and what a folder holds that
    is no file (a broken link, a pipe) or a linked folder as rejections: a mistyped path or a half-copied study must not
    pass for a clean result. Also whether a folder was given (then a progress bar is shown). Hidden files are not images: skipped."""
    files, missing, any_folder = [], [], False
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            any_folder = True
            found, unscorable = _folder_files(path)
            files += found
            missing += unscorable
            if not found:
                missing.append(Rejection(raw, "folder holds no files to score", "DataNotFoundError"))
        elif path.is_file():
            files.append(path)
        else:
            missing.append(Rejection(raw, "no such file or folder", "FileNotFoundError"))
    return _each_once(_whole_slides_as_folders(files)), missing, any_folder


def _each_once(files: list[Path]) -> list[Path]:
    """Each file once, under the name it was first given: a file named twice (a folder and a file in it, a link to it)
    would be scored, counted and given an SR twice."""
    seen, kept = set(), []
    for path in files:
        try:
            key = path.resolve()
        except (OSError, RuntimeError):  # a link loop: no file, rejected when scored
            key = path
        if key not in seen:
            seen.add(key)
            kept.append(path)
    return kept


def _folder_files(folder: Path) -> tuple[list[Path], list[Rejection]]:
    """The files under `folder` (sorted; hidden ones and those in hidden folders skipped, as a viewer's thumbnails, and
    a CD's DICOMDIR, its index of the images) and its entries that are neither a file nor a folder of its own (a broken
    link, a pipe, a linked folder, which is not followed: it may lead back up the tree)."""
    files, unscorable = [], []
    for entry in sorted(p for p in folder.rglob("*") if _listed(p.relative_to(folder))):
        if entry.is_file():
            files.append(entry)
        elif not entry.is_dir():
            unscorable.append(Rejection(str(entry), NOT_A_FILE, "DataNotFoundError"))
        elif entry.is_symlink():
            unscorable.append(Rejection(str(entry), LINKED_FOLDER, "DataNotFoundError"))
    return files, unscorable


def _listed(relative: Path) -> bool:
    return not any(part.startswith(".") for part in relative.parts) and relative.name.upper() != DICOMDIR


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


def score_files(
    predictor: Predictor, files: list[Path], args: argparse.Namespace, progress: bool
) -> tuple[list[list[Score | Rejection | Unwritten]], bool]:
    """Each file's outcomes (its scores or rejection, then what of its results asked for could not be written: its
    scores stand) until the last file or a stop (Ctrl-C; SIGTERM and SIGHUP, from a scheduler or a closed terminal,
    alike), and whether the run was stopped: hours of scoring are not lost to one keystroke."""
    from medtriage.progress import progress as shown
    from medtriage.signals import terminate_as_interrupt

    done: list[list[Score | Rejection | Unwritten]] = []
    try:
        with terminate_as_interrupt(), shown(files, len(files), "scoring", "file", disable=not progress) as bar:
            for path in bar:
                _score_into(done, predictor, path, args)
    except KeyboardInterrupt:
        return done, True
    return done, False


def _score_into(done: list, predictor: Predictor, path: Path, args: argparse.Namespace) -> None:
    """One file's outcomes, appended to `done` as one list once all of it is done."""
    from medtriage.io.pathology import is_slide_path
    from medtriage.signals import signals_held

    if is_slide_path(path):  # whole-slide images: tiles -> one slide score (no DICOM SR)
        scored, picture = _scored_slide(predictor, path, args.mpp, heatmap=bool(args.heatmaps))
        with signals_held():  # as for an SR: a heatmap on disk is a row reported
            heatmap = _write_heatmap(scored, picture, path, args.heatmaps) if picture is not None else []
            done.append([scored, *heatmap])
        return
    outcome = predictor.score_or_reject(path, str(path))
    if isinstance(outcome, Rejection):
        done.append([outcome])
        return
    with signals_held():  # a stop waits until its results are written and counted: an SR on disk is a row reported
        sr = _write_sr(predictor, path, outcome, args.sr) if args.sr else []
        overlay = _write_overlay(predictor, path, outcome, args.overlays) if args.overlays else []
        done.append([*outcome, *sr, *overlay])


def _scored_slide(predictor: Predictor, path: Path, slide_mpp: float | None, heatmap: bool) -> tuple[Score | Rejection, object]:
    """One slide's score, or its rejection, and its heatmap drawn when asked for (written by `_write_heatmap`); a file
    system failure while reading it (a share gone) rejects this slide alone."""
    from medtriage.serve.slides import slide_score_and_heatmap

    try:
        return slide_score_and_heatmap(predictor, path, slide_mpp, heatmap)
    except OSError as err:
        reason = f"cannot read {err.filename or path} ({err.strerror or type(err).__name__}); the slide was not scored"
        return Rejection(str(path), reason, type(err).__name__, hint="check that the slide's files can be read"), None


def _write_heatmap(scored: Score, picture, path: Path, heatmap_dir: str) -> list[Unwritten]:
    from medtriage.serve.slides import save_heatmap

    return _written("heatmap", path, lambda: save_heatmap(scored, picture, heatmap_dir, path))


def _write_sr(predictor: Predictor, path: Path, scores: list[Score], sr_dir: str) -> list[Unwritten]:
    from medtriage.serve.dicom_results import write_sr

    return _written("SR", path, lambda: write_sr(path, scores, predictor.package, sr_dir))


def _write_overlay(predictor: Predictor, path: Path, scores: list[Score], overlay_dir: str) -> list[Unwritten]:
    from medtriage.serve.saliency import write_overlay

    return _written("overlay", path, lambda: write_overlay(predictor, path, scores, overlay_dir))


def _written(what: str, path: Path, write) -> list[Unwritten]:
    """Run one result writer; its typed failure, or the file system's (a full disk), is listed as what is missing, and
    the other files go on."""
    from medtriage.errors import MedTriageError

    try:
        write()
    except MedTriageError as err:
        return [Unwritten(str(path), what, f"no {what} written: {err.reason}", type(err).__name__, err.hint)]
    except OSError as err:
        return [Unwritten(str(path), what, f"no {what} written: {_os_failure(err)}", type(err).__name__, WRITE_HINT)]
    return []


WRITE_HINT = "check that the output folder can be written (free space, permissions, a file where a folder should be)"


def _os_failure(err: OSError) -> str:
    """What the file system refused, and where: 'cannot write /out/x.dcm (No space left on device)'."""
    name = err.filename2 or err.filename  # os.replace's second name is the target, its first the temporary file
    return f"cannot write{f' {name}' if name else ''} ({err.strerror or type(err).__name__})"


def run_score(args: argparse.Namespace) -> int:
    if not args.paths and not args.npz:
        print("error: give DICOM files/folders to score, or --npz FILE", file=sys.stderr)
        return 2
    unused = _unused_with_npz(args)
    if unused:
        print(
            f"error: --npz scores one npz split alone: {', '.join(unused)} would be left out without a word "
            "(score the files in a command of their own)",
            file=sys.stderr,
        )
        return 2
    for option in OUTPUT_FOLDERS:
        refuse_file_as_folder(getattr(args, option[2:]), option)
    apply_decode_limits(args)
    predictor = predictor_from_args(args)
    if args.npz:
        return _score_npz(predictor, args)
    for option in OUTPUT_FOLDERS:
        _make_output_folder(getattr(args, option[2:]), option)
    files, missing, any_folder = collect_files(args.paths)
    if args.sr:
        _say_no_sr_for_slides(files)
    done, stopped = score_files(predictor, files, args, progress=any_folder)
    outcomes = [outcome for file_outcomes in done for outcome in file_outcomes]
    scores, unwritten = [o for o in outcomes if isinstance(o, Score)], [o for o in outcomes if isinstance(o, Unwritten)]
    rejected = missing + [o for o in outcomes if isinstance(o, Rejection)]
    if stopped:
        inputs = len(done) + len(missing)  # those the run got to
        return _report_stopped(lambda: _report(args, predictor, scores, rejected, unwritten, inputs), len(done), len(files))
    _report(args, predictor, scores, rejected, unwritten, len(files) + len(missing))
    return 1 if rejected or unwritten else 0


def _say_no_sr_for_slides(files: list[Path]) -> None:
    """--sr writes SRs for DICOM images alone; that a slide's result gets none is said before scoring, not left to be
    found missing."""
    from medtriage.io.pathology import is_slide_path

    slides = sum(1 for path in files if is_slide_path(path))
    if slides:
        print(
            f"note: no DICOM SR is written for whole-slide images ({slides} given): their results are in the output alone; "
            "--sr writes one for each DICOM image scored",
            file=sys.stderr,
        )


def _report(
    args: argparse.Namespace, predictor: Predictor, scores: list[Score], rejected: list[Rejection], unwritten: list[Unwritten], inputs: int
) -> None:
    """The results on stdout, and a line counting them on stderr."""
    _print_results(args, predictor, scores, rejected, unwritten=unwritten)
    print(
        f"{inputs} input(s): "
        f"{len({s.file for s in scores})} file(s) scored ({len(scores)} image(s)), {len(rejected)} rejected"
        f"{_unwritten_counts(unwritten)}; provider {predictor.provider}",
        file=sys.stderr,
    )


def _report_stopped(report: Callable[[], None], scored: int, total: int) -> int:
    """`report` of the files done before a stop, as a whole run's, then a line saying which part they are; exit status
    130, a process SIGINT ended. A second Ctrl-C waits until they are written: the first one asked for them."""
    from medtriage.signals import INTERRUPTED_STATUS, signals_held

    with signals_held():
        report()
        print(
            f"interrupted after {scored} of {total} file(s): the results above are those of the first {scored}; "
            f"score the other {total - scored} again",
            file=sys.stderr,
        )
    return INTERRUPTED_STATUS


def _unwritten_counts(unwritten: list[Unwritten]) -> str:
    """', 1 SR(s) not written, 2 overlay(s) not written', or nothing where every result asked for was written."""
    return "".join(f", {n} {output}(s) not written" for output, n in Counter(u.output for u in unwritten).items())


def _unused_with_npz(args: argparse.Namespace) -> list[str]:
    """What --npz would ignore: the files and folders given beside it, and the options for them (SRs, overlays, slides)."""
    if not args.npz:
        return []
    given = [f"{len(args.paths)} file/folder path(s)"] if args.paths else []
    return given + [option for option in (*OUTPUT_FOLDERS, "--mpp") if getattr(args, option[2:]) is not None]


def _make_output_folder(folder: str | None, option: str) -> None:
    """Create an output folder, and a file in it, before any image is scored: a folder that cannot be made (a file
    above it, a read-only file system) or that is there but cannot be written in would otherwise fail every file, after
    all of them were decoded and scored."""
    from medtriage.io.safe_output import AtomicFile

    if folder is None:
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unusable_folder("create", err, folder, option) from None
    try:
        AtomicFile(Path(folder) / "probe").discard()  # what every writer does first: a temporary file in the folder
    except OSError as err:
        raise _unusable_folder("write in", err, folder, option) from None


def _unusable_folder(what: str, err: OSError, folder: str, option: str) -> Exception:
    from medtriage.errors import ConfigError

    return ConfigError(
        f"cannot {what} the output folder ({err.strerror or type(err).__name__})", where=f"{option} {folder}", hint=WRITE_HINT
    )


def _score_npz(predictor: Predictor, args: argparse.Namespace) -> int:
    """`--npz FILE --split S`: every image of the split through the package's ONNX session."""
    from medtriage.errors import MedTriageError
    from medtriage.serve.npz import score_npz

    try:
        scores, labels = score_npz(predictor, args.npz, args.split)
    except MedTriageError as err:
        print(f"error: {printable(str(err))}", file=sys.stderr)
        return 2
    _print_results(args, predictor, scores, [], labels)
    print(f"{len(labels)} image(s) of {args.npz} [{args.split}] scored; provider {predictor.provider}", file=sys.stderr)
    return 0


def _print_results(
    args: argparse.Namespace,
    predictor: Predictor,
    scores: list[Score],
    rejected: list[Rejection],
    labels: dict | None = None,
    unwritten: Sequence[Unwritten] = (),
) -> None:
    """The results on stdout as the table, --json (with the npz's reference labels, if any) or --csv, each listing
    apart the results of scored files that could not be written (`unwritten`). A reader that stops early (`| head`)
    ends the output quietly, not with a traceback; stdout then points at /dev/null so that the flush at exit cannot
    fail again, and so does any other failure to write it (a full disk), which ends the command with an error: the
    results a script reads from the redirected output are incomplete."""
    try:
        if args.json:
            document = {**result_document(predictor, scores, rejected), "not_written": [u.as_dict() for u in unwritten]}
            print(json.dumps(document if labels is None else {**document, "labels": labels}, indent=2))
        elif args.csv:
            write_csv(sys.stdout, predictor, scores, rejected, unwritten)
        else:
            labels = file_labels([r.file for r in [*scores, *rejected]])
            print(format_table(predictor, scores, rejected) + _unwritten_section(unwritten, labels))
        sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
    except OSError as err:
        from medtriage.errors import MedTriageError

        _discard_stdout()
        raise MedTriageError(
            f"the results could not be written to standard output ({err.strerror or type(err).__name__}); what was written is incomplete",
            where="stdout",
            hint="free space where the output is redirected, or write it elsewhere, and score again",
        ) from None


def _unwritten_section(unwritten: Sequence[Unwritten], labels: dict[str, str]) -> str:
    """The table's closing lines for results that could not be written: each file (named as the table names it), what
    is missing and why, and what to do; nothing where every result was written."""
    if not unwritten:
        return ""
    lines = [f"{labels.get(u.file, u.file)}: {u.reason}" + (f" ({u.hint})" if u.hint else "") for u in unwritten]
    return "\n\nnot written (the scores above stand):\n" + "\n".join(printable(line) for line in lines)


def _discard_stdout() -> None:
    """Point stdout at /dev/null: what Python still holds for it is dropped instead of failing again at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# --- serve ---------------------------------------------------------------------------------------

# How long the batcher is waited for once uvicorn has stopped. By then every request has been answered, and the batcher
# is idle and ends at once, unless --stop-timeout passed or a second Ctrl-C made uvicorn stop waiting: a call still
# running then is one no request waits for, and the command was asked to end now.
STOP_BATCHER_S = 1.0
# Then how long the threads that ran requests' work get to end: idle ones end at once, one in a call that never returns
# would hold the process for good (the interpreter waits for such threads at exit).
STOP_THREADS_S = 1.0
EXIT_CUT_OFF = 1  # the stop cut off requests whose inference call never returned


def root_path(text: str) -> str:
    """--root-path as uvicorn takes it: `/` and a path, no `/` at the end (`/` alone is none). uvicorn puts it in front
    of each request's raw path, so it must be plain ASCII: no spaces, and no `?`, `#` or `%` escapes."""
    prefix = text.rstrip("/")
    if prefix and (prefix[0] != "/" or not (prefix.isascii() and prefix.isprintable()) or set(prefix) & set(" ?#%")):
        raise argparse.ArgumentTypeError(f"expected a path such as /medtriage (ASCII, without spaces, ?, # or %), got {text!r}")
    return prefix


def run_serve(args: argparse.Namespace) -> int:
    from medtriage.errors import ConfigError
    from medtriage.serve.admission import Admission, tune_allocator
    from medtriage.serve.http import connection_protocol, create_app
    from medtriage.serve.worklist import DEFAULT_CAPACITY

    try:
        token = _serving_token(args)
        tls = _tls_files(args)
        refuse_file_as_folder(args.state, "--state")
    except ConfigError as err:
        print(f"error: {printable(str(err))}", file=sys.stderr)
        return 2
    tune_allocator()
    apply_decode_limits(args)
    predictor = predictor_from_args(args)
    batcher = enable_batching(predictor, args.max_batch, args.batch_wait_ms)
    admission = Admission(concurrent_requests(args.max_concurrent, args.max_batch), args.queue)
    app = create_app(
        predictor,
        token=token,
        max_bytes=args.max_bytes,
        max_files=args.max_files,
        admission=admission,
        worklist_size=DEFAULT_CAPACITY if args.worklist_size is None else args.worklist_size,
        state=args.state,
        loopback_hosts_only=loopback_hosts_only(args.host, token),
    )
    if batcher is not None:
        batcher.expose(app.state.monitor.registry)  # medtriage_batch_* on /metrics
    scheme = "https" if tls else "http"
    published = f", published by a proxy under {args.root_path}/" if args.root_path else ""
    print(
        f"serving {predictor.package.describe()} on {scheme}://{args.host}:{args.port}{published} (provider {predictor.provider}, "
        f"{'token required' if token else 'no token'}, {admission.workers} at once + {args.queue} waiting; docs at /docs)",
        file=sys.stderr,
    )
    _serve_until_stopped(app, args, connection_protocol(args.header_timeout, args.max_connections), tls, batcher)
    return 0


def _serve_until_stopped(app, args: argparse.Namespace, http, tls: dict, batcher) -> None:
    """uvicorn until a stop (SIGTERM, Ctrl-C), which answers the requests in progress for --stop-timeout seconds at
    most; then the batcher is closed, and the process ends at once if an inference call never returned."""
    import signal

    import uvicorn

    from medtriage.serve.http import quiet_cut_off_requests
    from medtriage.signals import handling

    quiet_cut_off_requests()
    serving_since = set(threading.enumerate())
    try:
        with handling((signal.SIGTERM,), _stop_as_ctrl_c):
            uvicorn.run(
                app,
                host=args.host,
                port=args.port,
                log_level="info",
                http=http,
                root_path=args.root_path,
                timeout_graceful_shutdown=args.stop_timeout,
                **tls,
            )
    finally:  # the server has stopped: the batching worker ends after the calls it holds, if any
        if batcher is not None:
            batcher.close(timeout=STOP_BATCHER_S)
    _exit_if_calls_left(serving_since, args.stop_timeout)


def _stop_as_ctrl_c(signum, frame):
    """uvicorn raises the signal that stopped it again once it has shut down. SIGTERM's default action would end the
    process there, before `_exit_if_calls_left`; raised as Ctrl-C, uvicorn.run returns as it does after Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")


def _exit_if_calls_left(serving_since: set[threading.Thread], stop_timeout: float) -> None:
    """End the process now if threads that serving started still run (an inference call that never returned): the
    interpreter would wait for them at exit, and the stop would hang until systemd's SIGKILL. Nothing is left half
    written: the worklist's store commits each write whole (SQLite, synchronous) and writes its files atomically."""
    left = _threads_left(serving_since, STOP_THREADS_S)
    if not left:
        return
    print(
        f"error: the service stopped with {len(left)} inference call(s) still running (--stop-timeout {stop_timeout:g} s): "
        "their requests were cut off; exiting without waiting for them",
        file=sys.stderr,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_CUT_OFF)


def _threads_left(serving_since: set[threading.Thread], timeout: float) -> list[threading.Thread]:
    """Threads started since `serving_since` that the interpreter would wait for at exit and that run on after `timeout`."""
    deadline = time.monotonic() + timeout
    started = [t for t in threading.enumerate() if t not in serving_since and not t.daemon]
    for thread in started:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t for t in started if t.is_alive()]


def apply_decode_limits(args: argparse.Namespace) -> None:
    """The --max-* options as the process's decode limits (read_dicom applies them to every file); what pydicom
    says of a file's header is printed once per file, naming it."""
    set_default_limits(DecodeLimits(args.max_frame_pixels, args.max_frames, args.max_decoded_bytes))
    say_header_warnings()


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def loopback_hosts_only(host: str, token: str | None) -> bool:
    """Whether the service must answer only requests whose Host names this machine. Without a token, listening on
    loopback is its only guard, and a web page whose domain is re-pointed at 127.0.0.1 (DNS rebinding) passes that; a
    token guards the data itself, and a network address needs one (or --insecure-no-auth: another layer guards it)."""
    return token is None and is_loopback(host)


def _serving_token(args: argparse.Namespace) -> str | None:
    """The bearer token from --token-file, $MEDTRIAGE_TOKEN or --token; None only where that is safe or asked for."""
    from medtriage.errors import ConfigError

    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(f"cannot read the token file ({err.strerror})", where=args.token_file) from err
        if not token:
            raise ConfigError("the token file is empty", where=args.token_file, hint="put one long random line in it")
        if Path(args.token_file).stat().st_mode & 0o077:
            print(f"warning: {args.token_file} is readable by other users; chmod 600 it", file=sys.stderr)
    elif args.token:
        print(f"warning: --token is visible to every user of this machine (ps, /proc); use --token-file or ${TOKEN_ENV}", file=sys.stderr)
        token = args.token
    else:
        token = os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(args.host) and not args.insecure_no_auth:
        raise ConfigError(
            f"refusing to serve on {args.host} without a token: patient IDs and images would be open to anyone on the network",
            where="--host",
            hint=f"give --token-file FILE (or ${TOKEN_ENV}), or --insecure-no-auth if another layer guards it",
        )
    return token


def _tls_files(args: argparse.Namespace) -> dict:
    from medtriage.errors import ConfigError
    from medtriage.serve.tls import tls_context

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together", where="--tls-cert" if args.tls_cert else "--tls-key")
    if not args.tls_cert:
        if not is_loopback(args.host):
            print(
                f"warning: serving plain HTTP on {args.host}: tokens and images cross the network unencrypted; "
                "give --tls-cert/--tls-key or put a TLS proxy in front",
                file=sys.stderr,
            )
        return {}
    for option, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if not Path(path).is_file():
            raise ConfigError("file not found", where=f"{option} {path}")
    tls_context(args.tls_cert, args.tls_key)  # here, not in the server's start: a pair that does not load is exit 2
    return {"ssl_certfile": args.tls_cert, "ssl_keyfile": args.tls_key}
