"""The slide reader reads a DICOM file's header alone (io.clamped.read_part10's header-only mode): pydicom's dcmread,
`stop_before_pixels` and `specific_tags` notwithstanding, inflated a deflated data set whole first (and counted it
before that), so telling whether a file is a whole-slide image cost its whole inflated size, and wsidicom inflated it
whole again only to drop it as unsupported. A deflated file is now probed at about the cost of its uncompressed twin,
however far it inflates past the tags wanted; one inflating past the decode limits before reaching them is refused."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from medtriage.errors import DicomError, ImageTooLargeError, InputError
from medtriage.io.clamped import bounded_source, read_part10
from medtriage.io.decode_limits import HEADER_BYTES, DecodeLimits, default_limits, set_default_limits
from medtriage.io.slide_reader import WSI_SOP_CLASS, is_dicom_wsi_file, open_slide
from tests.memory import outcome_and_peak_bytes, peak_bytes

MiB = 1 << 20
WANTED = ["ImageType", "SeriesInstanceUID"]  # what the slide reader reads of a header, after the SOP Class UID
SERIES = "1.2.826.0.1.3680043.8.498.77"
_ZEROS = 16 * MiB  # inflated bytes per repeated deflate block


def _explicit_little(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    return fp.getvalue()


def _zeros_block(size: int) -> bytes:
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflate.compress(bytes(size)) + deflate.flush(zlib.Z_FULL_FLUSH)


def slide_file(
    path: Path, bulk: int, *, where: str = "pixels", deflated: bool = True, undefined_length: bool = False, flavour: str = "LABEL"
) -> Path:
    """A LABEL (`flavour`) image of a whole-slide series whose data set holds `bulk` zero bytes: as its RGB pixel data (`where`
    "pixels"), or as a private OB element after the tags the slide reader wants ("after", group 0x0029) or among them
    ("among", group 0x0009, before the Series Instance UID). Deflated, it is built from one deflate block of zeros
    repeated (never held inflated here); uncompressed, its zeros are a hole in the file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = WSI_SOP_CLASS, "1.2.826.0.1.3680043.8.498.78"
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = WSI_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", flavour, "NONE"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.826.0.1.3680043.8.498.76", SERIES, "SM"
    side = 1 if where != "pixels" else int((bulk // 3) ** 0.5)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    tag = {"pixels": 0x7FE00010, "after": 0x00291010, "among": 0x00091010}[where]
    if where != "pixels":
        ds.add_new(tag & 0xFFFF0000 | 0x0010, "LO", "BULK")  # the private block's creator
        ds.add_new(0x7FE00010, "OB", bytes(4))  # 1 x 1 RGB, padded to an even length
    else:
        bulk = side * side * 3
    head, tail = (
        _explicit_little(Dataset({t: e for t, e in ds.items() if t < tag})),
        _explicit_little(Dataset({t: e for t, e in ds.items() if t > tag})),
    )
    delimiter = b"\xfe\xff\xdd\xe0\0\0\0\0" if undefined_length else b""
    element = struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, b"OB", 0, 0xFFFFFFFF if undefined_length else bulk)
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    if not deflated:
        with open(path, "wb") as file:
            file.write(out.getvalue() + head + element)
            file.seek(bulk, io.SEEK_CUR)
            file.write(delimiter + tail)
            file.truncate()  # where nothing follows the bulk, the hole still ends the file
        return path
    outer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out.write(outer.compress(head + element) + outer.flush(zlib.Z_FULL_FLUSH))
    whole, rest = divmod(bulk, _ZEROS)
    out.write(_zeros_block(_ZEROS) * whole + _zeros_block(rest))
    out.write(outer.compress(delimiter + tail) + outer.flush())
    path.write_bytes(out.getvalue())
    return path


def _header(path: Path, tags: list[str], limits: DecodeLimits | None = None) -> pydicom.FileDataset:
    with bounded_source(path, str(path)) as fp:
        return read_part10(fp, str(path), limits, stop_before_pixels=True, specific_tags=tags)


def test_the_files_built_here_are_the_slide_files_they_claim_to_be(tmp_path):
    for where in ("pixels", "after", "among"):
        deflated = slide_file(tmp_path / f"{where}.dcm", 3 * 64 * 64, where=where)
        plain = slide_file(tmp_path / f"{where}-plain.dcm", 3 * 64 * 64, where=where, deflated=False)
        assert pydicom.dcmread(deflated) == pydicom.dcmread(plain)
        assert pydicom.dcmread(deflated).ImageType[2] == "LABEL" and pydicom.dcmread(plain).SeriesInstanceUID == SERIES
    assert len(slide_file(tmp_path / "big.dcm", 8 << 30, where="after", undefined_length=True).read_bytes()) < 16 * MiB


INFLATED = 96 * MiB  # a deflated file of ~100 KB


@pytest.mark.parametrize("where", ["pixels", "after"], ids=["big pixel data", "big private element after the tags"])
def test_a_deflated_slide_file_is_probed_at_the_cost_of_its_uncompressed_twin(tmp_path, where):
    """is_dicom_wsi_file read the SOP Class UID of a deflated file by inflating its whole data set: over 96 MiB held."""
    deflated = slide_file(tmp_path / "deflated.dcm", INFLATED, where=where)
    plain = slide_file(tmp_path / "plain.dcm", INFLATED, where=where, deflated=False)
    assert deflated.stat().st_size < MiB
    plain_peak = peak_bytes(lambda: is_dicom_wsi_file(plain))
    assert is_dicom_wsi_file(plain) and is_dicom_wsi_file(deflated)
    deflated_peak = peak_bytes(lambda: is_dicom_wsi_file(deflated))
    assert deflated_peak < plain_peak + 4 * MiB, f"{deflated_peak >> 20} MiB, its twin {plain_peak >> 20} MiB"


def test_a_series_of_deflated_files_names_what_it_holds_at_the_cost_of_its_uncompressed_twin(tmp_path):
    """The series' headers were read (ImageType, SeriesInstanceUID) by inflating each data set whole, after wsidicom
    had inflated each whole to learn that it reads no deflated file."""
    pytest.importorskip("wsidicom", reason="pip install 'medtriage[wsi]'")  # imported before it is measured
    messages, peaks = {}, {}
    for kind in ("plain", "deflated"):
        folder = tmp_path / kind
        folder.mkdir()
        slide_file(folder / "label.dcm", INFLATED, deflated=kind == "deflated")
        outcome, peaks[kind] = outcome_and_peak_bytes(lambda folder=folder: open_slide(folder))
        assert isinstance(outcome, InputError), outcome
        messages[kind] = str(outcome).replace(str(folder), "FOLDER")
    assert "has no pyramid levels: no VOLUME image among its 1 file (it holds 1 LABEL)" in messages["plain"]
    assert SERIES in messages["plain"] and messages["deflated"] == messages["plain"]
    assert peaks["deflated"] < peaks["plain"] + 4 * MiB, {kind: peak >> 20 for kind, peak in peaks.items()}


def test_a_real_slide_beside_a_large_deflated_file_opens_and_reads_as_without_it(dicom_wsi, tmp_path):
    """A deflated label in the slide's folder: read as before (wsidicom leaves it out), without inflating it."""
    with open_slide(dicom_wsi) as slide:
        levels, region = slide.level_dimensions, slide.read_region(0, 0, 0, (256, 256))
    alone = peak_bytes(lambda: open_slide(dicom_wsi).close())
    folder = Path(shutil.copytree(dicom_wsi, tmp_path / "slide"))
    slide_file(folder / "zz-deflated-label.dcm", INFLATED)
    beside = peak_bytes(lambda: open_slide(folder).close())
    with open_slide(folder) as slide:
        assert slide.level_dimensions == levels
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, (256, 256)), region)
    assert beside < alone + 4 * MiB, f"{beside >> 20} MiB, {alone >> 20} MiB without the deflated file"


def test_a_header_read_stops_before_a_bomb_past_the_tags_wanted(tmp_path):
    """8 GiB inflated, far past the decode limits, after the tags wanted (to a delimiter, as no length can say 8 GiB):
    never inflated, so neither held nor refused."""
    bomb = slide_file(tmp_path / "bomb.dcm", 8 << 30, where="after", undefined_length=True)

    def read() -> pydicom.FileDataset:
        return _header(bomb, ["SOPClassUID", *WANTED])

    header, peak = outcome_and_peak_bytes(read)
    assert not isinstance(header, Exception), header
    assert header.SOPClassUID == WSI_SOP_CLASS and header.ImageType[2] == "LABEL" and header.SeriesInstanceUID == SERIES
    assert 0x00291010 not in header and "PixelData" not in header
    assert header.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert peak < 4 * MiB, f"{peak >> 20} MiB"


@pytest.mark.parametrize("undefined_length", [False, True], ids=["bulk", "bulk_to_a_delimiter"])
def test_a_bomb_before_the_tags_wanted_is_refused_within_the_decode_limits(tmp_path, undefined_length):
    limits = DecodeLimits(max_decoded_bytes=MiB)
    allowed = MiB + HEADER_BYTES
    bomb = slide_file(tmp_path / "bomb.dcm", 256 * MiB, where="among", undefined_length=undefined_length)
    refused, peak = outcome_and_peak_bytes(lambda: _header(bomb, WANTED, limits))
    assert isinstance(refused, ImageTooLargeError) and isinstance(refused, DicomError), refused
    assert f"the deflated data set inflates to more than {allowed} bytes" in str(refused) and str(bomb) in str(refused)
    assert peak < allowed + 8 * MiB, f"{peak >> 20} MiB"
    previous = default_limits()
    set_default_limits(limits)
    try:  # the slide reader, under the same limits, holds no more either
        outcome, peak = outcome_and_peak_bytes(lambda: open_slide(tmp_path))
    finally:
        set_default_limits(previous)
    assert isinstance(outcome, InputError) and peak < allowed + 8 * MiB, (outcome, peak >> 20)


def test_a_header_read_holds_what_pydicom_reads_of_it(dicom_wsi, tmp_path):
    """An uncompressed file as pydicom.dcmread(stop_before_pixels=True, specific_tags=...) reads it; a deflated one as
    its uncompressed twin."""
    for path in sorted(dicom_wsi.iterdir()):
        for tags in (["SOPClassUID"], WANTED, ["PatientName", 0x00280010, (0x0020, 0x000D)]):
            assert _header(path, tags) == pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
    for where in ("pixels", "after", "among"):
        deflated = slide_file(tmp_path / f"{where}.dcm", 3 * 512 * 512, where=where)
        plain = slide_file(tmp_path / f"{where}-plain.dcm", 3 * 512 * 512, where=where, deflated=False)
        for tags in (["SOPClassUID"], WANTED, ["Rows", "Columns"], ["SpecificCharacterSet"]):
            read = _header(deflated, tags)
            assert read == pydicom.dcmread(plain, stop_before_pixels=True, specific_tags=tags), (where, tags)
            assert read.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian


def test_a_slide_unreadable_without_its_deflated_files_names_them(tmp_path):
    """Its deflated files were left out unsaid, and the slide was refused as an unreadable series of wsidicom's."""
    folder = tmp_path / "slide"
    folder.mkdir()
    slide_file(folder / "level0.dcm", 3 * 64 * 64, flavour="VOLUME")
    with pytest.raises(InputError) as raised:
        open_slide(folder)
    message = str(raised.value)
    assert "1 file(s) in Deflated Explicit VR Little Endian (level0.dcm)" in message and "dcmconv +te" in message, message
