"""A sender that retries sends the same image again: the drift monitor counts each image of a source once (by its SOP
Instance UID, else by its bytes), whichever route it came by, so retries do not skew a source's window."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medtriage.io.npz import read_npz
from medtriage.serve.drift import DriftMonitor
from medtriage.serve.http import create_app
from tests.export.tiny_package import NPZ
from tests.serve.test_http_edges import CT

DICOM = {"Content-Type": "application/dicom"}
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def radiograph(index: int, uids: tuple[str | None, str, str] | None = None, comment: str = "") -> bytes:
    """A held-out test image of the tiny package's data as an 8-bit CR file (one the package scores), with new UIDs or
    `uids` (SOP instance, study, series; a SOP Instance UID of None leaves it out) and `comment` as its Image Comments."""
    images, _ = read_npz(NPZ)["test"]
    sop_uid, study_uid, series_uid = uids or (generate_uid(), generate_uid(), generate_uid())
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CR_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    if sop_uid is not None:
        ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.PatientID, ds.ImageComments = "CR", "RESEND-1", comment
    pixels = np.squeeze(images[index]).astype(np.uint8)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture
def client(safe_predictor) -> TestClient:
    return TestClient(create_app(safe_predictor))


def counted(client: TestClient) -> dict[str, tuple[int, int]]:
    """source -> (images counted, images in its window), as /v1/drift shows them."""
    return {s["source"]: (s["images"], s["window"]) for s in client.get("/v1/drift").json()["sources"]}


def post(client: TestClient, data: bytes, source: str, route: str = "/v1/score") -> int:
    return client.post(route, content=data, headers={**DICOM, "X-Source": source}).status_code


def test_a_scored_image_sent_again_is_counted_once(client):
    image = radiograph(0)
    assert [post(client, image, "CR_ROOM_1") for _ in range(3)] == [200, 200, 200]
    assert post(client, image, "CR_ROOM_1", "/v1/sr") == 200  # its SR asked for: the same image once more
    assert counted(client) == {"CR_ROOM_1": (1, 1)}
    assert post(client, radiograph(1), "CR_ROOM_1") == 200  # another image still counts
    assert counted(client) == {"CR_ROOM_1": (2, 2)}


def test_a_withheld_image_sent_again_is_counted_once(client):
    """An unusual image is refused but feeds the drift monitor: its retries do not."""
    data = open(CT, "rb").read()
    assert [post(client, data, "CT_ROOM") for _ in range(2)] == [422, 422]
    assert counted(client) == {"CT_ROOM": (1, 1)}


def test_the_same_uid_with_other_bytes_is_a_resend_and_other_senders_count_their_own(client):
    """The SOP Instance UID names the image (a retry may be re-encoded); the same image from another source counts
    there, since each source's window stands for what that source sends."""
    uids = (generate_uid(), generate_uid(), generate_uid())
    first, again = radiograph(2, uids), radiograph(2, uids, comment="sent again")
    assert first != again
    assert [post(client, first, "CR_ROOM_1"), post(client, again, "CR_ROOM_1"), post(client, first, "CR_ROOM_2")] == [200] * 3
    assert counted(client) == {"CR_ROOM_1": (1, 1), "CR_ROOM_2": (1, 1)}


def test_an_image_without_uid_is_known_by_its_bytes(client):
    image = radiograph(3, (None, generate_uid(), generate_uid()))
    assert [post(client, image, "CR_ROOM_1") for _ in range(2)] == [200, 200]
    assert "SOPInstanceUID" not in pydicom.dcmread(io.BytesIO(image))
    assert counted(client) == {"CR_ROOM_1": (1, 1)}
    assert post(client, radiograph(4, (None, generate_uid(), generate_uid())), "CR_ROOM_1") == 200
    assert counted(client) == {"CR_ROOM_1": (2, 2)}


def test_the_memory_of_inputs_is_bounded(safe_predictor):
    monitor = DriftMonitor(safe_predictor.package.meta["drift"], remembered=2)
    features = {"probability": 0.5}
    for key in ("a", "b", "a", "c", "b", "a"):  # c pushes out b (a was seen since), then b pushes out a: both count again
        monitor.observe("ROOM", features, key=key)
    assert monitor.status()["sources"][0]["images"] == 5
    assert monitor.observe("ROOM", features, key="b") is None  # a resend changes nothing
    assert monitor.observe("ROOM", features).images == 6  # an input without a key always counts
