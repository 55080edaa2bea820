"""Frame N is the frame pydicom's decoders call N, whichever decoder reads it: pydicom's plugins, imagecodecs (for a
codestream the plugins refuse) or the reduced JPEG 2000 decode. A file's Extended Offset Table may list its frames in
another order than their items, and a frame may span several fragments."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEGExtended12Bit

from medtriage.errors import DicomError
from medtriage.io.dicom import read_dicom

J2K = "emri_small_jpeg_2k_lossless.dcm"  # 10 frames of 64 x 64, 12 bits stored


def stored_last_first(frames: list[bytes]) -> tuple[bytes, bytes, bytes]:
    """(pixel data, Extended Offset Table, its lengths): the frames' items in reverse order, the table pointing at
    each frame where it lies (a writer may append frames in any order; the table says which is which)."""
    items, offsets, position = [], [0] * len(frames), 0
    for index in reversed(range(len(frames))):
        value = frames[index] + b"\0" * (len(frames[index]) % 2)
        offsets[index] = position
        items.append(struct.pack("<HHL", 0xFFFE, 0xE000, len(value)) + value)
        position += 8 + len(value)
    lengths = [len(frame) + len(frame) % 2 for frame in frames]
    pack = lambda values: struct.pack(f"<{len(values)}Q", *values)  # noqa: E731
    return struct.pack("<HHL", 0xFFFE, 0xE000, 0) + b"".join(items), pack(offsets), pack(lengths)


def saved(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def j2k_sample() -> tuple[pydicom.Dataset, list[bytes]]:
    ds = pydicom.dcmread(get_testdata_file(J2K))
    return ds, list(generate_frames(ds.PixelData, number_of_frames=10))


def j2k_stored_last_first() -> bytes:
    ds, frames = j2k_sample()
    ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = stored_last_first(frames)
    return saved(ds)


def j2k_in_three_fragments_per_frame() -> bytes:
    ds, frames = j2k_sample()
    ds.PixelData = encapsulate(frames, fragments_per_frame=3, has_bot=True)
    return saved(ds)


@pytest.mark.parametrize("layout", [j2k_stored_last_first, j2k_in_three_fragments_per_frame])
@pytest.mark.parametrize("frame", [0, 7])
def test_the_reduced_jpeg2000_decode_reads_the_frame_pydicom_reads(layout, frame):
    """Before, the reduced decode took frames in item order: frame 1 of the file stored last first was its frame 10."""
    plain = get_testdata_file(J2K)
    expected = read_dicom(plain, frame=frame, min_side=16)
    got = read_dicom(layout(), frame=frame, min_side=16)
    assert got.resolution_level == expected.resolution_level == 2
    np.testing.assert_array_equal(got.pixels, expected.pixels)
    np.testing.assert_array_equal(read_dicom(layout(), min_side=16).pixels, read_dicom(plain, min_side=16).pixels)


def jpeg_only_imagecodecs_reads(samples: np.ndarray) -> bytes:
    """A 12-bit JPEG Extended frame whose scan header ends at coefficient 0 instead of 63, as some writers do:
    libjpeg-turbo (imagecodecs) decodes it, pydicom's plugins refuse it."""
    import imagecodecs

    stream = bytearray(imagecodecs.jpeg8_encode(samples, level=100, bitspersample=12))
    scan = stream.find(b"\xff\xda")
    stream[scan + 8] = 0  # Se: 63 -> 0
    return bytes(stream)


def frames_only_imagecodecs_reads(count: int) -> tuple[pydicom.Dataset, list[np.ndarray]]:
    """emri_small's header over `count` frames of 64 x 64 12-bit JPEG Extended, frame i a flat image of 300 * (i + 1)."""
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    images = [np.full((64, 64), 300 * (i + 1), np.uint16) for i in range(count)]
    ds.NumberOfFrames, ds.BitsStored, ds.HighBit = count, 12, 11
    ds.file_meta.TransferSyntaxUID = JPEGExtended12Bit
    return ds, images


@pytest.mark.parametrize("frame", [0, 2])
def test_the_imagecodecs_decode_reads_the_frame_pydicom_reads(frame):
    """Before, the imagecodecs decode took frames in item order: frame 1 of the file stored last first was its frame 3."""
    pytest.importorskip("imagecodecs")
    ds, images = frames_only_imagecodecs_reads(3)
    ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = stored_last_first(
        [jpeg_only_imagecodecs_reads(image) for image in images]
    )
    data = saved(ds)
    with pytest.raises(RuntimeError, match="scan stop must be 63"):
        pydicom.dcmread(io.BytesIO(data)).pixel_array  # noqa: B018 - pydicom's own decoders cannot read it
    whole, one = read_dicom(data), read_dicom(data, frame=frame)
    means = [float(np.mean(pixels)) for pixels in whole.pixels]
    assert means == sorted(means) and means[0] < means[1] < means[2]  # frame order, darkest first
    np.testing.assert_array_equal(one.pixels[0], whole.pixels[frame])


def test_the_imagecodecs_decode_joins_a_frame_of_several_fragments():
    pytest.importorskip("imagecodecs")
    ds, images = frames_only_imagecodecs_reads(2)
    ds.PixelData = encapsulate([jpeg_only_imagecodecs_reads(image) for image in images], fragments_per_frame=3, has_bot=True)
    image = read_dicom(saved(ds), frame=1)
    assert image.frames == 1 and image.pixels.std() < 1e-6


HUGE = 40_000  # 40000 x 40000 samples: gigabytes, if a decoder were let loose on it


def with_basic_table(ds: pydicom.Dataset, fragments: list[bytes], entries: list[int], frames: int) -> bytes:
    """`ds` with `fragments` as its pixel data after a Basic Offset Table of `entries`, and `frames` frames."""
    items = b"".join(struct.pack("<HHL", 0xFFFE, 0xE000, len(fragment)) + fragment for fragment in fragments)
    table = struct.pack(f"<HHL{len(entries)}L", 0xFFFE, 0xE000, 4 * len(entries), *entries)
    ds.PixelData, ds.NumberOfFrames = table + items, frames
    ds["PixelData"].VR = "OB"
    return saved(ds)


def test_a_basic_table_pointing_a_frame_read_alone_at_other_bytes_is_refused_before_decoding(decoder_calls):
    """Fragments: honest, huge, honest, honest (JPEG 2000 of 1024 x 256; the huge one's SIZ claims HUGE x HUGE). In item
    order, frame 1 is the first two (its header honest: the size check passed it); read alone, pydicom took it from its
    entry, the huge one. Before, read_dicom(frame=0) handed that to the decoder."""
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    (honest,) = generate_frames(ds.PixelData, number_of_frames=1)
    huge = honest[:8] + struct.pack(">II", HUGE, HUGE) + honest[16:]
    starts = [0, 8 + len(honest), 16 + 2 * len(honest), 24 + 3 * len(honest)]
    data = with_basic_table(ds, [honest, huge, honest, honest], starts[1:], frames=3)
    assert struct.unpack(">II", pydicom.encaps.get_frame(pydicom.dcmread(io.BytesIO(data)).PixelData, 0)[8:16]) == (HUGE, HUGE)
    with pytest.raises(DicomError, match="Basic Offset Table does not point at where frame 1 starts") as refused:
        read_dicom(data, frame=0)
    assert refused.value.hint and decoder_calls == []


def test_a_basic_table_whose_first_entry_is_not_the_first_frame_is_refused():
    """Frame 1's entry at frame 2: in item order frame 1 is the first item, read alone it is no bytes at all."""
    ds, frames = j2k_sample()
    ds.PixelData = encapsulate(frames, has_bot=True)
    second = ds.PixelData[12:16]
    ds.PixelData = ds.PixelData[:8] + second + ds.PixelData[12:]
    with pytest.raises(DicomError, match="does not point at where frame 1 starts"):
        read_dicom(saved(ds), frame=3)


@pytest.mark.parametrize("name", [J2K, "emri_small_RLE.dcm"])
def test_frames_past_number_of_frames_are_not_decoded(name):
    """Before, pydicom's decoders added the frames they found past Number of Frames (3 here, of 10 held): the image
    came back with 10 frames, past what the decode limits were checked against."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.NumberOfFrames = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's note on the frames past the count
        image = read_dicom(saved(ds))
    assert image.frames == 3 and image.pixels.shape == (3, 1, 64, 64)
    np.testing.assert_array_equal(image.pixels, read_dicom(get_testdata_file(name)).pixels[:3])
