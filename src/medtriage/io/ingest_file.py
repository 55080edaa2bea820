"""One site file through ingest, in a worker process: read it within its size limit, screen it, check its pixels
and de-identify it. Where the result goes is the ledger's decision (`medtriage.io.ingest_ledger`), in the main process.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array
from pydicom.pixels.utils import get_expected_length

from medtriage.errors import ImageTooLargeError
from medtriage.io.clamped import bounded_source, read_part10
from medtriage.io.decode_limits import DecodeLimits, check_limits, default_limits, inflated_limit, number_of_frames
from medtriage.io.deid import DeidOptions, deidentify, not_deidentifiable, transfer_syntax
from medtriage.io.encapsulation import claimed_frames, ends_with, frames_split_once, misplaced_basic_entry
from medtriage.io.header_warnings import reading, say_header_warnings, saying_header_warnings
from medtriage.io.part10 import encode
from medtriage.io.quarantine import Unsafe, screen
from medtriage.io.site_key import SiteKey
from medtriage.io.stream_metadata import STREAM_SYNTAXES

# Each input is read whole into a worker's memory, so its size is bounded before it is read. The bound is the decode
# limit on an image's float32 pixels: stored samples are rarely wider than that, so the pool builder could not use a
# larger file anyway.
DEFAULT_MAX_FILE_BYTES = DecodeLimits().max_decoded_bytes
_READ_STEP = 16 << 20  # how much more a file that grew since its size was read is read at a time
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: the signal a process gets when its parent ends
NOT_STARTED = "not_started"  # an outcome's status: a stop of the run came before the file was begun
OVERLAY_GROUPS = range(0x6000, 0x6020, 2)  # the 16 overlay planes (PS3.3 C.9.2)


@dataclass
class Outcome:
    """What one worker made of one source file. `pending` files still need the duplicate check."""

    source: str
    content_key: str = ""
    status: str = "pending"  # pending | quarantined | already | unread | not_started
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
    stream_metadata: Counter = field(default_factory=Counter)  # segments de-identification removed from its frames
    stamp: tuple = ()  # the source's state when read (`file_stamp`): its quarantine copy must be of these bytes
    encoded: bytes = b""  # the de-identified file; the main process decides where it goes


_WORKER: dict = {}


def init_worker(
    key: SiteKey,
    options: DeidOptions,
    known: frozenset,
    verify: bool,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    say_warnings: bool = False,
    stop=None,
) -> None:
    """`stop`: a flag shared with the main process (`multiprocessing.RawValue`), set once the run stops; a file not
    begun by then is left for the next run."""
    _WORKER.update(key=key, options=options, known=known, verify=verify, max_file_bytes=max_file_bytes, stop=stop)
    if say_warnings and not saying_header_warnings():  # a worker started afresh (spawn), not forked from the command
        say_header_warnings()


def init_pool_worker(parent: int, *args) -> None:
    """`init_worker` in a worker process of the command `parent`. Ctrl-C and a hang-up reach every process of the
    terminal's group, and SIGTERM does when sent to the group (systemd's default): the main process alone decides what
    stops, and a worker finishes the file in hand. A worker outliving its main process (killed) ends: the pool's
    workers would otherwise wait for work forever once it is gone."""
    for signum in (signal.SIGINT, getattr(signal, "SIGHUP", None)):
        if signum is not None:
            signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _ended_if_orphaned(parent))  # not the main process's handler, inherited by a fork
    _terminated_with_parent()
    if os.getppid() != parent:  # gone before the line above could ask to be told
        os.kill(os.getpid(), signal.SIGTERM)
    init_worker(*args)


def _ended_if_orphaned(parent: int):
    """A SIGTERM handler for a worker started by `parent`: ignored while `parent` lives, the default once it is gone (the
    worker's parent is then another process)."""

    def handler(signum, frame):
        if os.getppid() != parent:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    return handler


def _terminated_with_parent() -> None:
    """On Linux, ask for SIGTERM when the parent process ends (prctl PR_SET_PDEATHSIG), which `_ended_if_orphaned`
    turns into this worker's end. Elsewhere a SIGTERM to the orphaned workers still ends them."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # no prctl in this C library: as elsewhere
        pass


def process_file(source: str) -> Outcome:
    """Read, screen, check and de-identify one file; the main process decides where the result goes."""
    stop = _WORKER.get("stop")
    if stop is not None and stop.value:
        return Outcome(source, status=NOT_STARTED)
    with reading(source):  # pydicom's warnings name the file, those met after the read (de-identifying) included
        return _process_file(source, _WORKER)


def _process_file(source: str, w: dict) -> Outcome:
    try:
        read = _read_bounded(source, w["max_file_bytes"])
    except OSError as err:  # permissions, a file removed since the listing: this file only, never the run
        return Outcome(source, status="unread", reason="cannot_read", detail=f"{type(err).__name__}: {err.strerror or err}")
    if isinstance(read, Unsafe):
        return Outcome(source, status="unread", reason=read.reason, detail=read.detail)
    data, stamp = read
    out = Outcome(source, content_key=w["key"].content_key(data), stamp=stamp)
    if out.content_key in w["known"]:
        out.status = "already"
        return out
    try:
        ds = _read_dataset(data, source, w["max_file_bytes"])
    except ImageTooLargeError as err:
        return quarantined(out, Unsafe("too_large", str(err)))
    except InvalidDicomError:
        return quarantined(out, Unsafe("not_dicom", "no DICOM preamble/prefix and no recognisable data set"))
    except Exception as err:  # pydicom raises many types on corrupt headers
        return quarantined(out, Unsafe("unreadable", f"{type(err).__name__}: {err}"))
    try:
        return _deidentified(out, ds, w)
    except Exception as err:  # values pydicom parses lazily can still be malformed: this file only, never the run
        return quarantined(out, Unsafe("unreadable", f"{type(err).__name__}: {err}"))


def _read_dataset(data: bytes, source: str, limit: int) -> pydicom.Dataset:
    """The file's data set. A deflated one is read as it inflates (pydicom would inflate it whole, then copy its
    elements out: twice its size) and is held inflated, so the size limit bounds it inflated too (a 1 MB file can
    inflate to 1 GB), as do the decode limits (its image could not be decoded from the pool): refused with
    ImageTooLargeError as it inflates past them."""
    decodable = inflated_limit(default_limits())
    if limit <= decodable:
        hint = "the ingest limit (--max-file-bytes) applies to the data set once inflated: raise it if the file is genuine"
    else:
        hint = "more than any image the pool builder decodes (within its decode limits) holds; check the file at the source"
    with bounded_source(data, source) as buffer:
        return read_part10(buffer, source, inflated_allowed=min(limit, decodable), inflated_hint=hint)


def _read_bounded(source: str, limit: int) -> tuple[bytes, tuple] | Unsafe:
    """The file's bytes and its stamp once read, or why it is too large to read: its size is checked first, and the
    read stops past the limit, so a file that grows after the check still costs at most the limit. (A read allocates
    what it asks for: it asks for the size found, and for the growth in steps.)"""
    hint = "raise --max-file-bytes if it is genuine"
    f, status = open_file(source)
    if f is None:
        return Unsafe("cannot_read", _not_a_file(status.st_mode))
    with f:
        size = status.st_size
        if size > limit:
            return Unsafe("too_large", f"file of {size} bytes exceeds the ingest limit of {limit} bytes: {hint}")
        data = f.read(size + 1)  # one byte more shows whether it grew
        if len(data) > size:  # read on up to one byte past the limit
            while len(data) <= limit and (more := f.read(min(_READ_STEP, limit + 1 - len(data)))):
                data += more
        stamp = file_stamp(os.fstat(f.fileno()))
    if len(data) > limit:
        return Unsafe("too_large", f"file grew past the ingest limit of {limit} bytes while it was read: {hint}")
    return data, stamp


def open_file(source: str) -> tuple[BinaryIO | None, os.stat_result]:
    """`source` open for reading, and its status; None for what is no regular file, as opening a pipe would wait for a
    writer that may never come."""
    status = os.stat(source)
    if not stat.S_ISREG(status.st_mode):
        return None, status
    f = Path(source).open("rb")
    return f, os.fstat(f.fileno())


def file_stamp(status: os.stat_result) -> tuple:
    """What tells a file's state from a later one without reading it again: which file it is, its size, when changed."""
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def _not_a_file(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder ingest could not list: give the user running ingest permission to read it, then ingest again"
    return "not a regular file (a pipe, socket or device): copy the file itself into the site folder, then ingest again"


def _deidentified(out: Outcome, ds, w: dict) -> Outcome:
    # The screen (frames past Number of Frames, frames that cannot be walked), the pixel checks (frames missing) and
    # the cleaning of the frames' stream metadata look at one split of the frames; it goes once they are cleaned.
    with frames_split_once():
        problem = _unwritable(ds) or screen(ds) or _overlay_in_pixels(ds) or _pixel_problem(ds, w["verify"])
        if problem:
            return quarantined(out, problem)
        out.pixel_sha256 = hashlib.sha256(ds.PixelData).hexdigest()[:32]  # stored bytes: exact copies, same encoding
        result = deidentify(ds, w["key"], w["options"])
    out.accession = str(ds.get("AccessionNumber", "") or "")
    out.modality = "".join(c for c in str(ds.get("Modality", "") or "OT") if c.isalnum())[:16] or "OT"
    out.sop_uid, out.study_uid, out.series_uid, out.patient = result.sop_uid, result.study_uid, result.series_uid, result.pseudonym
    out.identified_by_name, out.stream_metadata = result.identified_by_name, result.stream_metadata
    out.encoded = encode(ds)
    return out


def quarantined(out: Outcome, problem: Unsafe) -> Outcome:
    out.status, out.reason, out.detail = "quarantined", problem.reason, problem.detail
    return out


def _unwritable(ds) -> Unsafe | None:
    """What de-identification cannot write a file of. A file meta without a transfer syntax gets the one the data set
    was read in, which the pixel checks and the de-identified file's meta take."""
    problem = not_deidentifiable(ds)
    if problem:
        return Unsafe("unreadable", problem)
    ds.file_meta.TransferSyntaxUID = transfer_syntax(ds)
    return None


def _overlay_in_pixels(ds) -> Unsafe | None:
    """An overlay plane without Overlay Data (60xx,3000) is drawn in the unused high bits of the pixel data (retired,
    still met in old archives). De-identification removes the overlay's attributes but never touches pixels, so the
    drawing, which may spell a name, would reach the pool unannounced."""
    for group in OVERLAY_GROUPS:
        described = any((group << 16 | element) in ds for element in (0x0100, 0x0102))  # Bits Allocated, Bit Position
        if described and (group << 16 | 0x3000) not in ds:
            return Unsafe(
                "overlay_in_pixel_data",
                f"overlay {group:04X} is drawn in the pixel data's unused bits, which de-identification cannot clear; "
                "re-export the image without its overlay, or with the overlay in Overlay Data",
            )
    return None


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


_END_OF_IMAGE = b"\xff\xd9"  # JPEG, JPEG-LS and JPEG 2000 codestreams all end in FFD9; video and JPEG XL do not


def _broken_frames(ds, claimed: int) -> Unsafe | None:
    """Frames missing, counted as the pool builder's decoders count them (io.encapsulation), or a frame's last fragment
    without its end-of-image marker: looked at where the frames lie, never copied."""
    marker = _END_OF_IMAGE if ds.file_meta.TransferSyntaxUID in STREAM_SYNTAXES else None
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
