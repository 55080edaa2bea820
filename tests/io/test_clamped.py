"""Untrusted DICOM cannot make a reader allocate what its value lengths claim: every reader of DICOM files from
outside (scoring, the node's header check, the SR's references, slide detection) reads through `dicom_source`."""

from __future__ import annotations

import io
import struct
import tracemalloc
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.errors import MedTriageError
from medtriage.io.clamped import ClampedReader, dicom_source

CLAIM = 0xF0000000  # 4 GB
PRIVATE_TAG = (0x0009, 0x1010)


def claiming_file(path, before_pixels: bool):
    """CT_small.dcm (explicit VR little endian) whose Pixel Data, or a private OB element ahead of it, claims 4 GB."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.add_new(PRIVATE_TAG, "OB", b"\x00" * 16)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    group, element = (0x7FE0, 0x0010) if not before_pixels else PRIVATE_TAG
    at = raw.rfind(struct.pack("<HH", group, element) + b"O")
    assert at > 0 and raw[at + 4 : at + 6] in (b"OB", b"OW")
    path.write_bytes(raw[: at + 8] + struct.pack("<I", CLAIM) + raw[at + 12 :])  # explicit VR OB/OW: 4-byte length at +8
    return path


def readers():
    from medtriage.io.dicom import read_dicom
    from medtriage.io.slide_reader import is_dicom_wsi_file
    from medtriage.serve.dicom_results import read_header
    from medtriage.serve.node.header import read_identity

    def read_open_file(path):
        with open(path, "rb") as file:
            return read_dicom(file)

    return {
        "read_dicom(path)": read_dicom,
        "read_dicom(file)": read_open_file,
        "node read_identity": read_identity,
        "SR read_header": read_header,
        "is_dicom_wsi_file": is_dicom_wsi_file,
    }


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the lengths it cannot honour
@pytest.mark.parametrize("before_pixels", [False, True], ids=["pixel data claims 4 GB", "a header element claims 4 GB"])
@pytest.mark.parametrize("reader", sorted(readers()))
def test_a_claimed_length_is_never_allocated(tmp_path, reader, before_pixels):
    path = claiming_file(tmp_path / "claim.dcm", before_pixels)
    tracemalloc.start()
    try:
        readers()[reader](path)
    except MedTriageError:
        pass  # a typed refusal is fine; a 4 GB allocation is not
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 50e6, f"{reader} allocated {peak / 1e9:.2f} GB for a {path.stat().st_size / 1e3:.0f} KB file"


def test_the_reader_gives_what_the_file_holds_and_nothing_more(tmp_path):
    (tmp_path / "f").write_bytes(b"0123456789")
    with open(tmp_path / "f", "rb") as file:
        clamped = ClampedReader(file, 10)
        assert clamped.read(4) == b"0123" and clamped.tell() == 4
        assert clamped.read(1 << 40) == b"456789" and clamped.read(5) == b""
        clamped.seek(8)
        assert clamped.read() == b"89" and clamped.name == str(tmp_path / "f")


def test_sources_of_every_kind_read_alike_and_paths_are_closed(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    with dicom_source(path, "f") as opened:
        assert opened.read() == b"abc"
    assert opened.closed  # opened here, closed here
    with open(path, "rb") as owned:
        with dicom_source(owned, "f") as clamped:
            assert clamped.read(100) == b"abc"
        assert not owned.closed  # the caller's file stays open
    for data in (b"abc", bytearray(b"abc"), io.BytesIO(b"abc")):
        with dicom_source(data, "f") as buffer:
            assert buffer.read() == b"abc"


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom and wsidicom warn about the damaged values they read
def test_frames_of_a_dicom_whole_slide_image_claiming_4_gb_are_not_allocated(dicom_wsi, tmp_path):
    import shutil

    from medtriage.io.pathology import iter_tile_batches, prepare_slide

    folder = Path(shutil.copytree(dicom_wsi, tmp_path / "slide"))
    finest = max(folder.iterdir(), key=lambda p: p.stat().st_size)
    raw = bytearray(finest.read_bytes())
    items = [i for i in range(len(raw) - 8) if raw[i : i + 4] == b"\xfe\xff\x00\xe0"]  # (FFFE,E000): the frames' items
    for at in items[2:]:  # past the offset table and the first frame
        raw[at + 4 : at + 8] = struct.pack("<I", CLAIM)
    finest.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        for _ in iter_tile_batches(prepare_slide(folder, 224, 0.5), 16):
            pass
    except MedTriageError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 1e9, f"reading the slide allocated {peak / 1e9:.2f} GB"


@pytest.mark.parametrize("image", ["Thumbnail", "Label", "Macro"])
def test_a_tiff_slide_image_claiming_4_gb_is_refused_as_truncated_before_it_is_read(tmp_path, image):
    import tifffile

    from medtriage.errors import InputError
    from medtriage.io.slide_reader import open_slide

    svs = Path(__file__).resolve().parents[2] / "data" / "samples" / "CMU-1-Small-Region.svs"
    raw = bytearray(svs.read_bytes())
    with tifffile.TiffFile(svs) as tif:
        page = next(series for series in tif.series if series.name == image).keyframe
        counts = page.tags.get("StripByteCounts") or page.tags.get("TileByteCounts")
        for k in range(counts.count):  # LONG values, in the tag itself when there is one
            at = counts.valueoffset + 4 * k
            raw[at : at + 4] = struct.pack("<I", CLAIM)
    claimed = tmp_path / "claimed.svs"
    claimed.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="truncated slide: the pixel data of image \\d of the file ends at byte"):
            with open_slide(claimed) as slide:
                slide.thumbnail(256)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 1e9
