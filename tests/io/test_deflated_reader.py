"""A deflated data set read as it inflates (io.decode_limits.InflatingReader, io.clamped.read_part10): what it reads is
what the data set holds, whatever the steps; a large element is held once; a bound refuses what inflates past it,
even where pydicom catches the refusal; and the data set keeps its file meta and Deflated transfer syntax."""

from __future__ import annotations

import io
import random
import sys
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from medtriage.errors import DicomError, ImageTooLargeError
from medtriage.io.clamped import bounded_source, read_part10
from medtriage.io.decode_limits import HEADER_BYTES, DecodeLimits, InflatingReader
from medtriage.io.dicom import read_dicom
from tests.memory import peak_bytes

MiB = 1 << 20


def _deflated(data: bytes) -> bytes:
    deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflate.compress(data) + deflate.flush()


def test_an_inflating_reader_reads_what_the_data_set_holds_whatever_the_steps():
    rng = random.Random(7)
    data = bytes(rng.choice(b"abcdefgh") for _ in range(3 * MiB + 12345))
    reader, expected = InflatingReader(io.BytesIO(_deflated(data))), io.BytesIO(data)
    furthest = 0
    for _ in range(400):
        step = rng.choice(["small", "large", "back", "ahead"])
        if step == "back":  # within the KEEP bytes a step back may reach, from the furthest byte reached
            target = rng.randrange(max(furthest - InflatingReader.KEEP, 0), reader.tell() + 1)
            assert reader.seek(target) == expected.seek(target)
        elif step == "ahead":
            assert reader.seek(rng.randrange(1, 200_000), 1) == expected.seek(reader.tell())
        else:
            n = rng.randrange(1, 9) if step == "small" else rng.randrange(1, 2 * MiB)
            assert reader.read(n) == expected.read(n)
        assert reader.tell() == expected.tell()
        furthest = max(furthest, reader.tell())
    reader = InflatingReader(io.BytesIO(_deflated(data)))
    reader.seek(len(data) - 10)
    assert reader.read(100) == data[-10:] and reader.read(100) == b""


def test_an_inflating_reader_reaches_back_no_further_than_it_keeps_and_never_reads_the_rest_whole():
    reader = InflatingReader(io.BytesIO(_deflated(bytes(4 * MiB))))
    reader.read(2 * MiB)
    assert reader.seek(2 * MiB - InflatingReader.KEEP) == 2 * MiB - InflatingReader.KEEP
    with pytest.raises(OSError, match="cannot step back"):
        reader.seek(0)
    with pytest.raises(OSError, match="read by sizes"):
        reader.read()


def test_a_large_read_is_held_once():
    """It was inflated into the reader's window, copied out of it and copied again: three times its size at once. Now
    it is inflated into what the read returns, beside a few steps of inflating."""
    size = 64 * MiB
    reader = InflatingReader(io.BytesIO(_deflated(bytes(size))))
    assert peak_bytes(lambda: reader.read(size)) < size + 8 * MiB


def test_an_inflating_reader_refuses_what_inflates_past_its_bound():
    allowed = 3 * MiB + 1
    reader = InflatingReader(io.BytesIO(_deflated(bytes(8 * MiB))), allowed, "bomb.dcm")
    peak = peak_bytes(lambda: pytest.raises(ImageTooLargeError, reader.read, 8 * MiB))
    assert reader.refused is not None and f"inflates to more than {allowed} bytes" in str(reader.refused)
    assert "bomb.dcm" in str(reader.refused) and "--max-decoded-bytes" in str(reader.refused)
    assert peak < allowed + 8 * MiB


def _part10(ds: Dataset, *, preamble: bool = True) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    return data if preamble else data[132:]


def _items_after_bulk(items: int) -> bytes:
    """A deflated file whose data set holds HEADER_BYTES of bulk data, then a sequence of `items` items (each an item
    tag, read by pydicom inside its catch-all, an element and a delimiter): a refusal past the bulk can fall in any."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4", "P1"
    ds.add_new(0x00090010, "LO", "BULK")
    ds.add_new(0x00091010, "OB", bytes(HEADER_BYTES))
    ds.add_new(0x00400275, "SQ", [Dataset() for _ in range(items)])  # Request Attributes Sequence
    ds[0x00400275].is_undefined_length = True  # else pydicom reads it whole, then parses it from those bytes
    for item in ds[0x00400275].value:  # 28 bytes, of which KEEP is no multiple: its steps fall at other places in one
        item.is_undefined_length_sequence_item = True
        item.RequestedProcedureID = "RP1"
    return _part10(ds)


def _inflated_before_an_item_tag(data: bytes) -> list[int]:
    """How far the data set had inflated each time that reading an item's tag inflated more of it."""
    ends = []

    class Recording(InflatingReader):
        def _inflate(self, wanted: int) -> bytes:
            before, caller = self._end, sys._getframe(2).f_code.co_name
            chunk = super()._inflate(wanted)
            if chunk and caller == "read_sequence_item":
                ends.append(before)
            return chunk

    fp = io.BytesIO(data)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    read_dataset(Recording(fp), False, True)
    return ends


def test_a_refusal_inside_a_sequence_is_not_taken_for_a_damaged_file():
    """pydicom turns any error reading a sequence item's tag into an OSError: the refusal is raised in its place."""
    data = _items_after_bulk(20_000)
    ends = _inflated_before_an_item_tag(data)
    assert ends, "no item's tag was read past what had inflated: change the number of items"
    allowed = ends[0]  # reading that item's tag inflates past it
    with bounded_source(data, "seq.dcm") as fp, pytest.raises(ImageTooLargeError, match=f"more than {allowed} bytes") as refused:
        read_part10(fp, "seq.dcm", DecodeLimits(max_decoded_bytes=allowed - HEADER_BYTES))
    assert isinstance(refused.value.__context__, OSError)  # pydicom's, raised in its catch-all


def test_read_part10_reads_a_deflated_file_as_pydicom_does_keeping_its_syntax():
    path = get_testdata_file("image_dfl.dcm")
    with bounded_source(path, path) as fp:
        read = read_part10(fp, path)
    expected = pydicom.dcmread(path)
    assert read == expected and read.file_meta == expected.file_meta and read.preamble == expected.preamble
    assert read.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert read.original_encoding == expected.original_encoding and read.filename == path


def test_a_deflated_file_without_its_preamble_is_still_refused_past_the_limits():
    """Read again as a file without the 'DICM' prefix, its data set is still bounded, and the refusal says so."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID, ds.Modality = "1.2.840.10008.5.1.4.1.1.7", generate_uid(), "P1", "OT"
    ds.Rows, ds.Columns = 4096, 8192
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(4096 * 8192)
    data = _part10(ds, preamble=False)
    assert not data.startswith(b"\0" * 128 + b"DICM")
    limit = MiB + HEADER_BYTES  # under the 32 MiB of pixels
    with pytest.raises(ImageTooLargeError, match=f"inflates to more than {limit} bytes"):
        read_dicom(data, limits=DecodeLimits(max_decoded_bytes=MiB))


def test_a_deflated_file_holding_a_file_meta_alone_is_cut_short():
    """No deflate stream after the file meta, not even an empty one's end: refused, as pydicom's whole inflate did."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3"
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    with bounded_source(out.getvalue(), "empty.dcm") as fp, pytest.raises(DicomError, match="cut short"):
        read_part10(fp, "empty.dcm")


def test_a_deflated_data_set_cut_short_is_refused_wherever_it_stops():
    """Read as it inflates, a stream that stopped early ended the data set where it stopped, and read as whole."""
    whole = Path(get_testdata_file("image_dfl.dcm")).read_bytes()
    for cut in (9, 100, len(whole) // 3):  # its deflate stream is followed by 8 bytes: 9 cuts the stream's last byte
        with bounded_source(whole[:-cut], "cut.dcm") as fp, pytest.raises(DicomError, match="cut short"):
            read_part10(fp, "cut.dcm")
