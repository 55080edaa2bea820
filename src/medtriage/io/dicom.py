"""DICOM -> display-ready float pixels in [0, 1], shared by training and serving (numpy + pydicom only).

This module reads the file and decodes its stored values (uncompressed grayscale in place, JPEG 2000 at a
reduced level where the caller allows, everything else through pydicom's decoders, imagecodecs as a second
opinion); io.display maps stored values to display values, following the DICOM grayscale pipeline.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import DecodeRunner

from medtriage.errors import DicomError, NotAnImageError
from medtriage.io.clamped import bounded_source, read_part10
from medtriage.io.decode_limits import DecodeLimits, check_limits, default_limits, number_of_frames
from medtriage.io.display import to_display
from medtriage.io.encapsulation import MalformedItems, claimed_frames, frame_bytes, located_frames, misplaced_basic_entry
from medtriage.io.header_warnings import reading
from medtriage.io.j2k_reduced import MalformedCodestreamError, reduced_j2k_frames
from medtriage.io.native_pixels import StoredValues, native_stored

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_SHORT_PIXELS = re.compile(r"less than expected \((\d+) vs (\d+) bytes\)")
# A forced read of a non-DICOM file yields junk tags; a real data set has at least one of these.
_IDENTIFYING_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "Modality", "PixelData", "Rows")
_IMAGECODECS_DECODERS = {  # transfer syntax UID -> imagecodecs function, when pydicom's plugins fail
    "1.2.840.10008.1.2.4.50": "jpeg8_decode",
    "1.2.840.10008.1.2.4.51": "jpeg8_decode",
    "1.2.840.10008.1.2.4.57": "ljpeg_decode",
    "1.2.840.10008.1.2.4.70": "ljpeg_decode",
    "1.2.840.10008.1.2.4.80": "jpegls_decode",
    "1.2.840.10008.1.2.4.81": "jpegls_decode",
    "1.2.840.10008.1.2.4.90": "jpeg2k_decode",
    "1.2.840.10008.1.2.4.91": "jpeg2k_decode",
}
VIDEO_SYNTAXES = frozenset(
    {*pydicom.uid.MPEGTransferSyntaxes, "1.2.840.10008.1.2.7.1", "1.2.840.10008.1.2.7.2", "1.2.840.10008.1.2.7.3"}  # + SMPTE ST 2110
)
# JPIP Referenced (Deflate), and their HTJ2K forms: the file holds a link to a JPIP server, not the pixels
JPIP_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.204", "1.2.840.10008.1.2.4.205"})
CONVERT = "or convert the file to an uncompressed one, e.g. with GDCM (gdcmconv --raw IN OUT) or, for JPEG, dcmtk (dcmdjpeg IN OUT)"


@dataclass
class DecodedImage:
    pixels: np.ndarray  # float32 [F, C, H, W] in [0, 1], display-ready
    sop_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    modality: str
    sop_class_uid: str
    photometric: str
    rows: int
    columns: int
    frames: int
    bits_stored: int
    transfer_syntax: str
    accession_number: str = ""
    body_part: str = ""  # BodyPartExamined
    view_position: str = ""  # ViewPosition
    pixel_spacing: tuple[float, float] | None = None  # mm (row, column): PixelSpacing, else ImagerPixelSpacing
    frame_means: np.ndarray | None = None  # mean of each frame's pixels [F], where decoding computed it on the way
    resolution_level: int = 0  # pixels hold 1/2^level of rows x columns (a reduced JPEG 2000 decode: min_side)


def read_dicom(
    source: str | Path | bytes | BinaryIO,
    *,
    frame: int | None = None,
    limits: DecodeLimits | None = None,
    min_side: int | None = None,
    name: str | None = None,
) -> DecodedImage:
    """Decode a DICOM file (path, bytes or binary stream) into display-ready pixels.

    `frame` decodes only that frame of a multi-frame object (result has F = 1). `min_side` lets a JPEG 2000
    image be decoded at a coarser resolution level whose sides all stay >= min_side (see io.j2k_reduced: for
    scoring with a model that resizes anyway, never for display or training).
    Raises `DicomError` for files that are not DICOM or whose pixels cannot be decoded,
    `ImageTooLargeError` when the header claims more than `limits` (default: `default_limits()`),
    checked before decoding, and `NotAnImageError` for valid DICOM objects without pixel data. Errors and pydicom's
    warnings call the source `name` (an upload's file name), else its path, '<bytes>' or the stream's name.
    """
    where = name or _describe(source)
    with reading(where):  # pydicom's warnings, from the header or met while decoding, name the file
        return _read_dicom(source, where, frame, limits or default_limits(), min_side)


def _read_dicom(source, where: str, frame: int | None, limits: DecodeLimits, min_side: int | None) -> DecodedImage:
    ds = _read_dataset(source, where, limits)
    try:
        _require_pixels(ds, where)
        check_limits(ds, limits, where, frame)
        _require_claimed_frames(ds, where)
        stored = native_stored(ds, _pixel_syntax(ds), frame) or _reduced(ds, where, frame, min_side) or _decode_stored(ds, where, frame)
    except DicomError:
        raise
    except Exception as err:  # header values pydicom cannot convert (a bad UID, VR or number), met lazily
        raise DicomError(
            f"malformed image attributes ({type(err).__name__}: {err})",
            where=where,
            hint="the header is damaged; export the image again from the source system",
        ) from err
    try:
        level = stored.resolution_level if isinstance(stored, StoredValues) else 0
        return _decoded(ds, *to_display(stored, ds, where, frame), resolution_level=level)
    except DicomError:
        raise
    except Exception as err:  # malformed rescale/window/LUT values
        raise DicomError(
            f"cannot map stored values for display ({type(err).__name__}: {err})",
            where=where,
            hint="check the rescale, window and LUT attributes in the source system",
        ) from err


def _describe(source) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(getattr(source, "name", "<stream>"))


def _read_dataset(source, where: str, limits: DecodeLimits) -> pydicom.Dataset:
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise DicomError("file not found", where=where, hint="check the path")
    try:
        # reads bounded by the file's size, not by the lengths it claims; a deflated data set by `limits` as it inflates
        with bounded_source(source, where) as fp:
            try:
                return _with_transfer_syntax(read_part10(fp, where, limits))
            except InvalidDicomError:
                return _read_raw_dataset(fp, where, limits)
    except DicomError:
        raise
    except Exception as err:  # pydicom raises many kinds on damaged headers
        raise DicomError(
            f"unreadable DICOM header ({type(err).__name__}: {err})",
            where=where,
            hint="the file is damaged or truncated; export it again from the PACS",
        ) from err


def _read_raw_dataset(fp: BinaryIO, where: str, limits: DecodeLimits) -> pydicom.Dataset:
    """Files written without the 128-byte preamble and 'DICM' prefix (older modalities do this)."""
    try:
        fp.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_part10(fp, where, limits, force=True)
            if any(k in ds for k in _IDENTIFYING_KEYWORDS):
                return _with_transfer_syntax(ds)
    except DicomError:  # a file meta without its prefix, of a deflated data set that inflates past the limits
        raise
    except Exception:
        pass  # reported below: a forced read of a non-DICOM file fails in arbitrary ways
    raise DicomError(
        "not a DICOM file (no 'DICM' prefix and no recognisable data set)",
        where=where,
        hint="only DICOM files are accepted; convert other formats first",
    )


def _with_transfer_syntax(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Meta-less files: record the encoding pydicom read them with, so pixel decoders know it."""
    if _transfer_syntax(ds) is None and ds.original_encoding[0] is not None:
        implicit, little = ds.original_encoding
        ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian
            if implicit
            else pydicom.uid.ExplicitVRLittleEndian
            if little
            else pydicom.uid.ExplicitVRBigEndian
        )
    return ds


def _require_pixels(ds: pydicom.Dataset, where: str) -> None:
    if any(k in ds for k in PIXEL_KEYWORDS):
        return
    # a DICOMDIR names its SOP class only in the file meta
    sop_class = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    if sop_class is None and "Rows" not in ds:
        raise DicomError(
            "no data set after the file meta header (file truncated?)", where=where, hint="the file is incomplete; send or export it again"
        )
    name = getattr(sop_class, "name", str(sop_class or "unknown SOP class"))
    if "Rows" in ds or "Image" in name:
        raise DicomError(
            f"file ends before its pixel data ({name}); truncated file",
            where=where,
            hint="the transfer was cut short; send or export the image again",
        )
    raise NotAnImageError(
        f"DICOM object without pixel data: {name} ({sop_class})",
        where=where,
        hint="only image objects can be scored; skip reports, plans and presentation states",
    )


def _require_claimed_frames(ds: pydicom.Dataset, where: str) -> None:
    """Encapsulated pixel data holding fewer frames than Number of Frames is refused, whichever frame is asked for:
    decoders read what is there (a short offset table gives one frame less, without a word), and the image would be
    reported with the frames found as if they were all of it."""
    syntax = _transfer_syntax(ds)
    known = isinstance(syntax, pydicom.uid.UID) and syntax.is_transfer_syntax  # an unknown one: the decoders name it
    if not (known and syntax.is_encapsulated and "PixelData" in ds):
        return
    claimed = number_of_frames(ds)  # a whole number > 0: check_limits refused anything else
    found = _encapsulated_frames(ds, claimed)
    if found < claimed:
        raise DicomError(
            f"pixel data holds {found} of the {claimed} frames its header claims (Number of Frames)",
            where=where,
            hint="frames are missing (an interrupted export or transfer); send or export the image again",
        )
    misplaced = _misplaced_entry(ds, claimed)
    if misplaced is not None:  # a frame read alone would be other bytes than the size check and the other decoders read
        raise DicomError(
            f"the Basic Offset Table does not point at where frame {misplaced + 1} starts in the pixel data",
            where=where,
            hint="the pixel data's offset table is damaged; export the image again",
        )


def _misplaced_entry(ds: pydicom.Dataset, claimed: int) -> int | None:
    try:
        return misplaced_basic_entry(ds, claimed)
    except MalformedItems:  # the decoder reports them with its own reason
        return None


def _encapsulated_frames(ds: pydicom.Dataset, claimed: int) -> int:
    """Frames in the encapsulated pixel data as pydicom's decoders find them (io.encapsulation), up to `claimed`."""
    try:
        return sum(1 for _ in claimed_frames(ds, claimed))
    except MalformedItems:  # the decoder reports them with its own reason
        return claimed


def _decode_stored(ds: pydicom.Dataset, where: str, frame: int | None) -> np.ndarray:
    """Stored values as [F, H, W] (grayscale) or [F, H, W, 3] (colour, RGB)."""
    try:
        # no frames past Number of Frames: the decode limits were checked against it, and the image is reported by it
        arr = pydicom.pixels.pixel_array(ds, index=frame, allow_excess_frames=False)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # ValueError/RuntimeError/...; a Rust decoder's panic is a BaseException
        arr = _second_opinion(ds, where, frame)
        if arr is None:
            raise _undecodable(err, ds, where) from err
    return _frames_as_header_says(arr, ds, where)


def _undecodable(err: BaseException, ds: pydicom.Dataset, where: str) -> DicomError:
    """Why the pixels could not be decoded: a transfer syntax this installation has no decoder for is said as such
    (sending the file again changes nothing), apart from pixel data a decoder read and found wrong."""
    syntax = _transfer_syntax(ds)
    uid = None if syntax is None else pydicom.uid.UID(str(syntax))
    missing = None if uid is None else _missing_decoders(uid)
    if missing is None:
        return DicomError(_decode_failure(err, ds), where=where, hint=_decode_hint(err))
    return DicomError(
        f"transfer syntax {uid} ({_syntax_name(uid)}) is not supported by this installation",
        where=where,
        hint=_unsupported_hint(uid, missing),
    )


def _missing_decoders(uid: pydicom.uid.UID) -> list[str] | None:
    """What pydicom says its uninstalled plugins for `uid` need ([] where it has none for it at all); None where a
    decoder is installed (pydicom's, or imagecodecs' second opinion), so that a failure is the pixel data's."""
    from pydicom.pixels import get_decoder

    if uid in _IMAGECODECS_DECODERS and importlib.util.find_spec("imagecodecs") is not None:
        return None
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return []
    return None if decoder.is_available else decoder.missing_dependencies


def _syntax_name(uid: pydicom.uid.UID) -> str:
    if uid.name != str(uid):
        return uid.name
    return "a private transfer syntax" if uid.is_private else f"a transfer syntax unknown to pydicom {pydicom.__version__}"


def _unsupported_hint(uid: pydicom.uid.UID, missing: list[str]) -> str:
    if missing:
        return f"install one of its decoders ({'; '.join(missing)}), {CONVERT}"
    if uid in VIDEO_SYNTAXES:
        return "this is a video encoding: export the images as still frames (uncompressed, JPEG or JPEG 2000) from the source system"
    if uid in JPIP_SYNTAXES:
        return "the file holds a link to a JPIP server, not the pixels: have the source system send the pixel data itself"
    if uid.is_private:
        return "only the system that wrote it can decode it: have it send a standard transfer syntax (e.g. Explicit VR Little Endian)"
    return f"have the source system send another transfer syntax (uncompressed, JPEG or JPEG 2000), {CONVERT}"


def _second_opinion(ds: pydicom.Dataset, where: str, frame: int | None) -> np.ndarray | None:
    """imagecodecs' reading of a codestream pydicom's plugins cannot decode (or none is installed for); None where it
    has no decoder for the transfer syntax or fails too. A pixel description pydicom finds invalid is refused first:
    no codec makes it valid, and the display mapping would read the pixels by it."""
    decoder = _IMAGECODECS_DECODERS.get(str(_transfer_syntax(ds)))
    if decoder is None:
        return None
    _require_valid_pixel_description(ds, where)
    return _decode_with_imagecodecs(ds, frame, decoder)


def _require_valid_pixel_description(ds: pydicom.Dataset, where: str) -> None:
    """pydicom's own checks of the Image Pixel attributes, run apart from its decoding: its decoders run them before
    any plugin (so they may not have run at all when no plugin is installed)."""
    runner = DecodeRunner(pydicom.uid.UID(str(_transfer_syntax(ds))))
    try:
        runner.set_source(ds)
        runner.validate()
    except (AttributeError, TypeError, ValueError) as err:  # a missing attribute, or a value out of range
        raise DicomError(
            f"invalid pixel description: {' '.join(str(err).split())}",
            where=where,
            hint="the Image Pixel attributes (0028,xxxx) are missing or contradict each other; fix the export in the source system",
        ) from err


def _frames_as_header_says(arr: np.ndarray, ds: pydicom.Dataset, where: str) -> np.ndarray:
    """`arr` as [F, H, W] or [F, H, W, 3], refused unless each frame is the header's size: the header's size is what
    the limits checked and what the image is reported as, and a codestream may state another (imagecodecs follows it)."""
    samples = int(ds.get("SamplesPerPixel") or 1)
    per_frame = (int(ds.Rows), int(ds.Columns), *((samples,) if samples > 1 else ()))
    decoded = arr.shape[-len(per_frame) :]
    if decoded != per_frame:
        raise DicomError(
            f"pixel data decodes to frames of {' x '.join(map(str, decoded))}, the header says {' x '.join(map(str, per_frame))}",
            where=where,
            hint="the pixel data does not match its header; export the image again",
        )
    return arr.reshape((-1, *per_frame))


def _reduced(ds: pydicom.Dataset, where: str, frame: int | None, min_side: int | None) -> StoredValues | None:
    try:
        reduced = reduced_j2k_frames(ds, _transfer_syntax(ds), frame, min_side)
    except MalformedCodestreamError as err:  # worded like the size check's refusal of a codestream (decode_limits)
        raise DicomError(
            f"cannot decode pixel data: {err}",
            where=where,
            hint="the JPEG 2000 codestream is damaged; export the image again",
        ) from err
    if reduced is None:
        return None
    values, level = reduced
    return StoredValues(values, 8 * values.dtype.itemsize, resolution_level=level)


def _decode_with_imagecodecs(ds: pydicom.Dataset, frame: int | None, decoder: str) -> np.ndarray | None:
    """Second opinion for compressed frames pydicom's plugins refuse (e.g. 12-bit JPEG Extended)."""
    try:
        import imagecodecs

        decode = getattr(imagecodecs, decoder)
        frames = located_frames(ds, number_of_frames(ds))  # frame N is the frame pydicom calls N
        wanted = frames if frame is None else itertools.islice(frames, frame, frame + 1)
        arr = np.stack([decode(frame_bytes(ds.PixelData, located)) for located in wanted])
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # no imagecodecs, or it fails (or panics) too
        return None
    if arr.ndim == 4 and str(ds.get("PhotometricInterpretation", "")).startswith("YBR"):
        return None  # colour conversion differs by codec: leave such files to pydicom's plugins
    return _stored_bits_only(arr, ds)


def _stored_bits_only(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The samples as pydicom's decoders leave them: bits above Bits Stored cleared (unsigned) or filled with the sign
    (signed). A codec hands back all the bits of the codestream's precision: left as they come, -1000 HU stored in 12
    bits would read 3096, and an overlay in an unused high bit would turn the pixels under it white."""
    if arr.dtype.kind not in "iu":
        return arr
    kind = "i" if int(ds.get("PixelRepresentation") or 0) == 1 else "u"
    width, bits = 8 * arr.dtype.itemsize, int(ds.get("BitsStored") or 0)
    as_stored = arr.view(np.dtype(f"{kind}{arr.dtype.itemsize}"))
    return StoredValues(as_stored, bits if 0 < bits <= width else width).corrected()


def _decode_failure(err: BaseException, ds: pydicom.Dataset) -> str:
    short = _SHORT_PIXELS.search(str(err))
    if short:
        got, expected = (int(v) for v in short.groups())
        return f"truncated pixel data (expected {expected} bytes, got {got})"
    syntax = _transfer_syntax(ds)
    detail = " ".join(str(err).split())  # plugin errors span several lines
    return f"cannot decode pixel data ({getattr(syntax, 'name', syntax) or 'unknown transfer syntax'}): {detail}"


def _decode_hint(err: BaseException) -> str:
    text = str(err).lower()
    if "missing dependencies" in text:  # imagecodecs has a decoder for the syntax too, and it failed
        return "install the decoders: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle"
    if "missing required element" in text:
        return "the image pixel module is incomplete; fix the export in the source system"
    return "the pixel data is damaged or incomplete; send or export the image again"


def _transfer_syntax(ds: pydicom.Dataset):
    return getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)


def _pixel_syntax(ds: pydicom.Dataset):
    """The transfer syntax the pixel data is encoded in as read: inflated, a deflated data set's is Explicit VR Little
    Endian's, read in place (pydicom's decoder would copy the pixels first)."""
    syntax = _transfer_syntax(ds)
    return pydicom.uid.ExplicitVRLittleEndian if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian else syntax


def _decoded(ds: pydicom.Dataset, pixels: np.ndarray, frame_means: np.ndarray | None = None, resolution_level: int = 0) -> DecodedImage:
    text = lambda keyword: _as_text(ds.get(keyword))  # noqa: E731
    return DecodedImage(
        pixels=pixels,
        sop_uid=text("SOPInstanceUID"),
        study_uid=text("StudyInstanceUID"),
        series_uid=text("SeriesInstanceUID"),
        patient_id=text("PatientID"),
        modality=text("Modality"),
        sop_class_uid=text("SOPClassUID"),
        photometric=text("PhotometricInterpretation"),
        rows=int(ds.get("Rows") or pixels.shape[-2]),
        columns=int(ds.get("Columns") or pixels.shape[-1]),
        frames=int(pixels.shape[0]),
        bits_stored=int(ds.get("BitsStored") or 0),
        transfer_syntax=str(_transfer_syntax(ds) or ""),
        accession_number=text("AccessionNumber"),
        body_part=text("BodyPartExamined").strip().upper(),
        view_position=text("ViewPosition").strip().upper(),
        pixel_spacing=_pixel_spacing(ds),
        frame_means=frame_means,
        resolution_level=resolution_level,
    )


def _as_text(value) -> str:
    """A header value as DICOM writes it: several values joined by backslashes, not as a Python list."""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value or "")


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """Row and column spacing in mm; None when absent or malformed (a header fact, not a reason to reject)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            row, column = (float(v) for v in ds.get(keyword) or ())
        except (TypeError, ValueError):
            continue
        if 0 < row < np.inf and 0 < column < np.inf:  # "inf" parses as a number but is no spacing
            return row, column
    return None
