"""Encode a de-identified data set as a DICOM Part 10 file, quickly.

After de-identification most elements are still the raw bytes pydicom read, and the changed ones
hold plain strings. pydicom's writer spends most of the time of a small file on per-element
machinery; `encode` copies raw elements as read, encodes empty, string and sequence elements
directly, and hands every other element to pydicom's own element writer. The output is
byte-identical to `Dataset.save_as(..., enforce_file_format=True)` (tests/io/test_part10.py checks
this on every test file). Data sets that pydicom would re-encode as a whole (implicit VR, big
endian, deflated, a changed character set, a private transfer syntax) take pydicom's own path.
numpy/pydicom only.
"""

from __future__ import annotations

import io
import struct
from functools import lru_cache

from pydicom import __version_info__ as pydicom_version
from pydicom.charset import convert_encodings, default_encoding, encode_string
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_sequence_item
from pydicom.multival import MultiValue
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, PersonName

EXPLICIT_LITTLE = (False, True)  # (implicit VR, little endian)
_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)  # 4-byte length field
_PADDING = {"UI": "\0", **dict.fromkeys(("AE", "AS", "CS", "UR", "DA", "DT", "TM"), " ")}  # pydicom's write_string
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT"})  # pydicom's write_text: encoded by character set
_BYTES_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV"})  # padded with a null byte; UN is not padded
_INTEGER_FORMATS = {"US": "<H", "SS": "<h", "UL": "<L", "SL": "<l", "UV": "<Q", "SV": "<q"}
_ITEM, _ITEM_END, _SEQUENCE_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0\0\0\0\0", b"\xfe\xff\xdd\xe0\0\0\0\0"
_UNDEFINED = 0xFFFFFFFF
_META_VERSION = DataElement(0x00020001, "OB", b"\0\1")  # File Meta Information Version, as pydicom adds it
_REQUIRED_META = {
    0x00020002: "Media Storage SOP Class UID",
    0x00020003: "Media Storage SOP Instance UID",
    0x00020010: "Transfer Syntax UID",
}


def encode(ds: Dataset) -> bytes:
    """The Part 10 file of `ds`: preamble, DICM prefix, file meta with its group length, data set."""
    if not _encoded_as_read(ds):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()
    if "PixelData" in ds:  # as dcmwrite does: encapsulated pixel data has undefined length
        ds["PixelData"].is_undefined_length = ds.file_meta.TransferSyntaxUID.is_compressed
    fp = _buffer()
    fp.write(getattr(ds, "preamble", None) or b"\0" * 128)
    fp.write(b"DICM")
    _write_file_meta(fp, ds)
    _write_elements(fp, ds, default_encoding)
    return fp.getvalue()


def _encoded_as_read(ds: Dataset) -> bool:
    """True when the file keeps the encoding its raw elements were read in: explicit VR little
    endian under a public, non-deflated transfer syntax, with the same character set."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return (
        syntax is not None
        and syntax.is_transfer_syntax
        and not syntax.is_private
        and syntax != DeflatedExplicitVRLittleEndian
        and (syntax.is_implicit_VR, syntax.is_little_endian) == EXPLICIT_LITTLE
        and _copies_raw(ds)
        and len(getattr(ds, "preamble", None) or b"\0" * 128) == 128
        and not any(tag >> 16 in (0, 2) for tag in ds.keys())
    )


def _copies_raw(ds: Dataset) -> bool:
    """pydicom's writer copies a data set's raw elements as read only under these conditions (the same
    test as its `write_dataset`, private attribute included)."""
    return ds.original_encoding == EXPLICIT_LITTLE and ds.original_character_set == ds._character_set


def _write_file_meta(fp: DicomBytesIO, ds: Dataset) -> None:
    """The group length element, then the rest of the file meta group."""
    body = _buffer()
    for elem in _file_meta(ds):
        _write_element(body, elem, _python_encodings(default_encoding))
    fp.write(b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<L", body.tell()))
    fp.write(body.getvalue())


def _file_meta(ds: Dataset) -> list[DataElement]:
    """The file meta elements dcmwrite(enforce_file_format=True) writes for `ds`, in tag order, without
    the group length. Added or corrected elements are new ones: `ds.file_meta` stays as it is."""
    meta = {int(tag): ds.file_meta[tag] for tag in ds.file_meta.keys() if tag != 0x00020000}
    for tag, keyword in ((0x00020002, "SOPClassUID"), (0x00020003, "SOPInstanceUID")):
        value = ds.get(keyword)
        if tag not in meta or (value and value != meta[tag].value):
            meta[tag] = DataElement(tag, "UI", value)
    if 0x00020001 not in meta or meta[0x00020001].is_empty:
        meta[0x00020001] = _META_VERSION
    if 0x00020012 not in meta or meta[0x00020012].is_empty:
        meta[0x00020012] = DataElement(0x00020012, "UI", PYDICOM_IMPLEMENTATION_UID)
    if 0x00020013 not in meta:
        meta[0x00020013] = DataElement(0x00020013, "SH", f"PYDICOM {'.'.join(pydicom_version)}")
    missing = [name for tag, name in _REQUIRED_META.items() if tag not in meta or meta[tag].is_empty]
    if missing:
        raise AttributeError(f"Required File Meta Information elements are either missing or have an empty value: {', '.join(missing)}")
    return [meta[tag] for tag in sorted(meta)]


def _buffer() -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = EXPLICIT_LITTLE
    return fp


def _write_elements(fp: DicomBytesIO, ds: Dataset, parent_encodings) -> None:
    """pydicom's `write_dataset` for an unchanged encoding."""
    encodings = _python_encodings(ds.get("SpecificCharacterSet", parent_encodings) or default_encoding)
    for tag in sorted(ds.keys(), key=int):  # the data set's own tag objects: the quickest lookups
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue  # retired group lengths are not written (PS3.5 7.2)
        _write_element(fp, ds.get_item(tag), encodings)


def _write_element(fp: DicomBytesIO, elem, encodings: list[str]) -> None:
    if elem.is_raw:
        value = elem.value
        header = None if elem.length == _UNDEFINED else _header(int(elem.tag), elem.VR, len(value))
    elif elem.VR == "SQ":
        _write_sequence(fp, elem, encodings)
        return
    else:
        value = _encoded_value(elem, encodings)
        header = None if value is None or elem.is_undefined_length else _header(int(elem.tag), elem.VR, len(value))
    if header is None:
        write_data_element(fp, elem, encodings)
    else:
        fp.write(header)
        fp.write(value)


def _header(tag: int, vr: str | None, length: int) -> bytes | None:
    """Tag, VR and length of an explicit-VR element of defined length; None where pydicom decides."""
    prefix = _tag_and_vr(tag, vr)
    if prefix is None:
        return None
    if vr in _LONG_VRS:
        return prefix + struct.pack("<HL", 0, length)
    return prefix + struct.pack("<H", length) if length <= 0xFFFF else None  # pydicom rewrites it as UN


@lru_cache(maxsize=4096)
def _tag_and_vr(tag: int, vr: str | None) -> bytes | None:
    if not vr or len(vr) != 2:
        return None  # implicit or ambiguous VR
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode(default_encoding)  # one byte a character, as pydicom reads and writes it


def _python_encodings(charset) -> list[str]:
    """pydicom's `convert_encodings`, remembered per Specific Character Set value."""
    return list(_converted_encodings(charset if isinstance(charset, str) else tuple(charset)))


@lru_cache(maxsize=64)
def _converted_encodings(charset: str | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(convert_encodings(charset if isinstance(charset, str) else list(charset)))


def _encoded_value(elem: DataElement, encodings: list[str]) -> bytes | None:
    """The value bytes of an element as pydicom writes them, for the value types de-identification
    leaves (empty, strings, names, bytes, single integers); None for pydicom to decide."""
    values, vr = elem.value, elem.VR
    if values is None or (isinstance(values, (str, bytes, list, MultiValue)) and not values):
        return b""
    if isinstance(values, bytes):
        return values if vr == "UN" else _padded(values, b"\0") if vr in _BYTES_VRS else None
    if type(values) is int and vr in _INTEGER_FORMATS:
        return struct.pack(_INTEGER_FORMATS[vr], values)
    if vr == "PN":
        names = _listed(values, PersonName)
        return None if names is None else _padded(b"\\".join(n.encode(encodings) for n in names), b" ")
    values = _listed(values, str)
    if values is None:
        return None
    if vr in _PADDING:
        text = "\\".join(values)
        return (text + _PADDING[vr] * (len(text) % 2)).encode(default_encoding) if text.isascii() else None
    if vr in _TEXT_VRS:
        return _padded(b"\\".join(encode_string(v, encodings) for v in values), b" ")
    return None


def _listed(values, kind: type) -> list | None:
    """`values` as a list when it is one value or a list of values of `kind`, else None."""
    if isinstance(values, kind):
        return [values]
    if isinstance(values, (list, MultiValue)) and all(isinstance(v, kind) for v in values):
        return list(values)
    return None


def _padded(data: bytes, padding: bytes) -> bytes:
    return data + padding * (len(data) % 2)


def _write_sequence(fp: DicomBytesIO, elem: DataElement, encodings: list[str]) -> None:
    body = _buffer()
    for item in elem.value:
        if _copies_raw(item) or not any(_needs_pydicom(item.get_item(tag)) for tag in item.keys()):
            _write_item(body, item, encodings)
        else:  # pydicom decodes and re-encodes this item as a whole
            write_sequence_item(body, item, encodings)
    undefined = elem.is_undefined_length
    fp.write(struct.pack("<HH", elem.tag >> 16, elem.tag & 0xFFFF) + b"SQ\0\0")
    fp.write(struct.pack("<L", _UNDEFINED if undefined else body.tell()))
    fp.write(body.getvalue())
    if undefined:
        fp.write(_SEQUENCE_END)


def _needs_pydicom(elem) -> bool:
    """Raw or ambiguous-VR elements of an item created in memory: pydicom converts and resolves them."""
    return elem.is_raw or len(elem.VR or "") != 2


def _write_item(fp: DicomBytesIO, item: Dataset, encodings: list[str]) -> None:
    body = _buffer()
    _write_elements(body, item, encodings)
    undefined = getattr(item, "is_undefined_length_sequence_item", False)
    fp.write(_ITEM + struct.pack("<L", _UNDEFINED if undefined else body.tell()))
    fp.write(body.getvalue())
    if undefined:
        fp.write(_ITEM_END)
