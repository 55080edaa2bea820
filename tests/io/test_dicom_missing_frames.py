"""Encapsulated multi-frame pixel data holding fewer frames than Number of Frames: refused with the count claimed and
the count found, whichever frame is asked for and whichever way the frames are located (Basic Offset Table,
Extended Offset Table, one fragment per frame)."""

from __future__ import annotations

import io
import re
import warnings

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames

from medtriage.errors import InputError
from medtriage.io.dicom import read_dicom

MISSING = "pixel data holds 9 of the 10 frames its header claims (Number of Frames)"


def _frames(name: str) -> tuple[pydicom.Dataset, list[bytes]]:
    ds = pydicom.dcmread(get_testdata_file(name))
    return ds, list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


def _saved(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _without_frame(name: str, dropped: int, table: str) -> bytes:
    """pydicom's 10-frame sample `name` with frame `dropped` taken out of its pixel data, Number of Frames kept, the
    remaining frames located by `table`: "basic", "extended" or "none" (one fragment per frame)."""
    ds, frames = _frames(name)
    kept = frames[:dropped] + frames[dropped + 1 :]
    if table == "extended":
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(kept)
    else:
        ds.PixelData = encapsulate(kept, has_bot=table == "basic")
    return _saved(ds)


@pytest.mark.parametrize("name", ["emri_small_jpeg_2k_lossless.dcm", "emri_small_RLE.dcm"])
@pytest.mark.parametrize("table", ["basic", "extended", "none"])
@pytest.mark.parametrize("dropped", [4, 9])
def test_a_missing_frame_is_refused_with_the_frames_claimed_and_found(name, table, dropped):
    """Before, a file whose offset table lists the frames present decoded to 9 frames reported as the whole image."""
    data = _without_frame(name, dropped, table)
    for options in ({}, {"frame": 0}, {"min_side": 16}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's own notes on the damaged encapsulation
            with pytest.raises(InputError, match="^" + re.escape(f"<bytes>: {MISSING} (frames are missing")) as refused:
                read_dicom(data, **options)
        assert refused.value.hint


def test_a_multi_frame_file_with_every_frame_still_reads_whole():
    ds, frames = _frames("emri_small_jpeg_2k_lossless.dcm")
    ds.PixelData = encapsulate(frames, has_bot=True)
    image = read_dicom(_saved(ds))
    assert image.frames == 10 and image.pixels.shape == (10, 1, 64, 64)
