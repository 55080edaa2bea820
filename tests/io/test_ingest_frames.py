"""Ingest's structural check of compressed frames counts them as read_dicom (the pool builder's reader) does: a file
ingest pools is one the pool builder reads whole, and one read_dicom refuses for missing frames is quarantined at the
site as truncated."""

from __future__ import annotations

import io
import warnings

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames

from medtriage.errors import DicomError
from medtriage.io import ingest_file
from medtriage.io.deid import DeidOptions
from medtriage.io.dicom import read_dicom
from medtriage.io.ingest_file import init_worker, process_file
from medtriage.io.site_key import SiteKey
from tests.io.test_decode_limits import _with

SAMPLES = ["emri_small_jpeg_2k_lossless.dcm", "emri_small_RLE.dcm"]


def _saved(name: str, tables) -> bytes:
    """pydicom's 10-frame sample `name`, Number of Frames kept, its frames encapsulated by `tables(frames)`: pixel
    data, and the Extended Offset Table and its lengths, or None."""
    ds = pydicom.dcmread(get_testdata_file(name))
    pixel_data, *extended = tables(list(generate_frames(ds.PixelData, number_of_frames=10)))
    ds.PixelData, ds.PatientID = pixel_data, "patient-1"  # a patient to key on: ingest quarantines a file without one
    if extended:
        ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = extended
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _extended_short_by_one(frames):
    pixel_data, table, lengths = encapsulate_extended(frames)
    return pixel_data, table[:-8], lengths[:-8]


def _extended_lengths_short_by_one(frames):  # pydicom's decoders ignore a table whose two halves differ in size
    pixel_data, table, lengths = encapsulate_extended(frames)
    return pixel_data, table, lengths[:-8]


LAYOUTS = {  # name: (encapsulation, frames read_dicom finds)
    "extended table one entry short": (_extended_short_by_one, 9),
    "extended table lengths one entry short": (_extended_lengths_short_by_one, 10),
    "frame missing, extended table": (lambda frames: encapsulate_extended(frames[:9]), 9),
    "frame missing, basic table": (lambda frames: (encapsulate(frames[:9], has_bot=True),), 9),
    "frame missing, no table": (lambda frames: (encapsulate(frames[:9], has_bot=False),), 9),
    "every frame, basic table": (lambda frames: (encapsulate(frames, has_bot=True),), 10),
}


@pytest.fixture
def ingest_one(tmp_path):
    init_worker(SiteKey(b"test-site-secret-0123456789abcdef"), DeidOptions(), frozenset(), False)

    def ingest(data: bytes):
        path = tmp_path / "image.dcm"
        path.write_bytes(data)
        return process_file(str(path))

    return ingest


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ingest_pools_exactly_the_multi_frame_files_read_dicom_reads_whole(name, layout, ingest_one):
    """Before, ingest ignored the Extended Offset Table: it pooled a file whose table lists 9 of 10 frames (read_dicom
    refuses it) and refused one missing a frame as undecodable, not as truncated; and read_dicom refused a file whose
    table pydicom's decoders ignore, as if it held 9 frames: they decode all 10."""
    tables, frames = LAYOUTS[layout]
    data = _saved(name, tables)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own notes on the damaged encapsulation
        outcome = ingest_one(data)
        try:
            read = read_dicom(data).frames
        except DicomError as err:
            read = str(err)
    if frames == 10:
        assert read == 10 and outcome.status == "pending", outcome
    else:
        assert "pixel data holds 9 of the 10 frames" in read
        assert (outcome.status, outcome.reason, outcome.detail) == ("quarantined", "truncated", "9 of 10 compressed frames present")


def test_a_frame_without_its_end_of_image_marker_is_quarantined_as_truncated(ingest_one):
    ds = pydicom.dcmread(get_testdata_file(SAMPLES[0]))
    frames = list(generate_frames(ds.PixelData, number_of_frames=10))
    frames[3] = frames[3][:-40]  # cut short, padded back to an even length
    outcome = ingest_one(_saved(SAMPLES[0], lambda _: (encapsulate(frames, has_bot=True),)))
    assert (outcome.status, outcome.reason, outcome.detail) == (
        "quarantined",
        "truncated",
        "a compressed frame lacks its end-of-image marker",
    )


@pytest.mark.parametrize("verify", [False, True], ids=["structural", "verify pixels"])
@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm", "emri_small_RLE.dcm"])
@pytest.mark.parametrize(("count", "said"), [(b"0", "counts no frame"), (b"-1", "counts no frame"), (b"2.5", "not a whole number")])
def test_a_number_of_frames_that_counts_no_frame_is_quarantined_as_the_pool_builder_refuses_it(tmp_path, name, count, said, verify):
    """Before, ingest read 0 as 1 frame and 2.5 as 2, and checked nothing for -1 on native pixels: it pooled files the
    pool builder then refused."""
    init_worker(SiteKey(b"test-site-secret-0123456789abcdef"), DeidOptions(), frozenset(), verify)
    path = tmp_path / "image.dcm"
    data = _with(name, NumberOfFrames="7777777", PatientID="patient-1")  # a patient: else refused for having none
    path.write_bytes(data.replace(b"7777777 ", count.ljust(8)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own notes on 2.5
        outcome = process_file(str(path))
    assert (outcome.status, outcome.reason) == ("quarantined", "unreadable") and said in outcome.detail, outcome


def _first_entry_at_the_second_frame(frames):
    pixel_data = encapsulate(frames, has_bot=True)
    return (pixel_data[:8] + pixel_data[12:16] + pixel_data[12:],)


@pytest.mark.parametrize("verify", [False, True], ids=["structural", "verify pixels"])
def test_a_basic_table_not_pointing_at_its_frames_is_quarantined_as_the_pool_builder_refuses_it(tmp_path, verify):
    """Before, ingest pooled it (every frame is there, and a whole-image decode reads them in item order); the pool
    builder then refused it, and a frame read alone would have been other bytes."""
    init_worker(SiteKey(b"test-site-secret-0123456789abcdef"), DeidOptions(), frozenset(), verify)
    data = _saved(SAMPLES[0], _first_entry_at_the_second_frame)
    with pytest.raises(DicomError, match="does not point at where frame 1 starts"):
        read_dicom(data)
    path = tmp_path / "image.dcm"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own notes on the damaged table
        outcome = process_file(str(path))
    assert (outcome.status, outcome.reason) == ("quarantined", "undecodable_pixels"), outcome
    assert "does not point at where frame 1 starts" in outcome.detail


@pytest.mark.parametrize("name", SAMPLES)
def test_verify_pixels_decodes_no_frame_of_a_file_holding_frames_past_the_count(tmp_path, name, monkeypatch):
    """The decode limits are checked against Number of Frames (3 here, of 10 held); before, the verifying decode went on
    to every frame the data holds, past what was checked. Frames past the count are now quarantined before any decode
    (tests/io/test_frames_past_count.py: no viewer shows them); read_dicom's own decode of the claimed frames alone is
    tests/io/test_dicom_frame_location.py's."""
    decoded = []
    real = ingest_file.pixel_array
    monkeypatch.setattr(ingest_file, "pixel_array", lambda *a, **kw: decoded.append(real(*a, **kw).shape) or decoded[-1])
    init_worker(SiteKey(b"test-site-secret-0123456789abcdef"), DeidOptions(), frozenset(), True)
    path = tmp_path / "image.dcm"
    path.write_bytes(_with(name, NumberOfFrames="3", PatientID="patient-1"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's note on the frames past the count
        outcome = process_file(str(path))
    assert (outcome.status, outcome.reason) == ("quarantined", "damaged_compressed_frame"), outcome
    assert "frame 4 of the 10 frames" in outcome.detail and "Number of Frames (3)" in outcome.detail
    assert decoded == []
