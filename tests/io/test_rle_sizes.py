"""An RLE segment decodes to Rows × Columns samples, and what follows them no decoder reads: without Rows or Columns the
samples cannot be told from what follows them. Before, the RLE check was then skipped (the Encapsulated Uncompressed
one quarantines the same case), so a name past a segment's samples could reach the pool: such a file is quarantined as
damaged_compressed_frame, saying which size is missing."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid

from medtriage.io.quarantine import screen
from medtriage.io.stream_metadata import damaged_frame
from tests.io.test_deid_stream_metadata import NAME, _planted
from tests.io.test_rle_unread_bytes import _past_the_last_segment
from tests.io.test_unwalked_syntaxes import _ingested


def _without(data: bytes, **sizes) -> bytes:
    """`data` with each of `sizes` set (None: removed), under its own SOP Instance UID."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in sizes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


SIZES = [  # (what changes, what the reason names)
    ({"Rows": None}, "Rows"),
    ({"Columns": None}, "Columns"),
    ({"Rows": 0}, "Rows"),
    ({"Rows": None, "Columns": None}, "Rows, Columns"),
]


@pytest.mark.parametrize(("sizes", "said"), SIZES, ids=["no-rows", "no-columns", "zero-rows", "neither"])
def test_an_rle_frame_whose_size_cannot_be_known_is_quarantined(sizes, said):
    ds = pydicom.dcmread(io.BytesIO(_without(_planted("MR_small_RLE.dcm", lambda frame: frame), **sizes)))
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    unsafe = screen(ds)
    assert unsafe is not None and unsafe.reason == "damaged_compressed_frame", unsafe
    assert f"size cannot be known: {said} missing or not a positive number" in unsafe.detail, unsafe.detail
    assert "size cannot be known" in damaged_frame(ds, RLELossless)


@pytest.mark.parametrize("verify", [False, True], ids=["structural", "verify"])
def test_ingest_quarantines_an_rle_file_without_rows_and_a_name_past_its_samples(tmp_path, verify):
    files = {
        "as-written.dcm": _planted("SC_rgb_rle_2frame.dcm", lambda frame: frame, frame=1),
        "no-rows.dcm": _without(_planted("SC_rgb_rle_2frame.dcm", _past_the_last_segment, frame=1), Rows=None),
        "no-columns.dcm": _without(_planted("SC_rgb_rle_2frame.dcm", _past_the_last_segment, frame=1), Columns=None),
    }
    summary, rows, pooled = _ingested(tmp_path, files, verify)
    reasons = {name: row["reason"] for name, row in rows.items()}
    assert reasons == {"no-rows.dcm": "damaged_compressed_frame", "no-columns.dcm": "damaged_compressed_frame"}, summary.line()
    assert "Rows missing" in rows["no-rows.dcm"]["detail"] and "Columns missing" in rows["no-columns.dcm"]["detail"]
    assert len(pooled) == 1 and NAME not in pooled[0].read_bytes()
