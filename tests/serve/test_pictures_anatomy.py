"""The pictures of where the model looked, checked against the anatomy: a bright blob at a known place in a
non-square, multi-frame MONOCHROME1 image lands under the heat of the overlay PNG and of the heatmap Secondary
Capture, on the frame that was scored; the Secondary Capture names its source and what it is; a probability that
moves only by rounding draws no heat."""

from __future__ import annotations

import dataclasses
import io
import types
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medtriage.io.dicom import read_dicom
from medtriage.serve.dicom_results import encoded
from medtriage.serve.node.heatmap import secondary_capture
from medtriage.serve.saliency import occlusion_saliency, write_overlay

ROWS, COLUMNS = 300, 700
# (rows, columns) of the blob in each frame; each frame's blob is larger than the one before, so the last is the likeliest
BLOBS = [(slice(40, 100), slice(40, 100)), (slice(200, 270), slice(580, 680)), (slice(120, 210), slice(280, 380))]


def mean_probe(pixels: np.ndarray) -> np.ndarray:
    """p(positive) = the mean brightness: hiding a bright blob on a dark field lowers it the most."""
    p = pixels.mean(axis=(1, 2, 3))
    return np.stack([1 - p, p], axis=1).astype(np.float32)


def probed(predictor):
    """The served package's channels and input size, with `mean_probe` in place of its graph."""
    return types.SimpleNamespace(package=predictor.package, positive=predictor.positive, probabilities=mean_probe)


def multiframe_monochrome1(path: Path) -> Path:
    """Three 300 x 700 frames, 12 bits, MONOCHROME1: the blobs are stored dark and shown bright."""
    frames = np.full((len(BLOBS), ROWS, COLUMNS), 200, np.uint16)
    for frame, (rows, cols) in zip(frames, BLOBS):
        frame[rows, cols] = 4000
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Word SC
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Test^Blob", "BLOB1", "OT"
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "MONOCHROME1", 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.NumberOfFrames, ds.Rows, ds.Columns = len(BLOBS), ROWS, COLUMNS
    ds.PixelData = (4095 - frames).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def heat_centre(rgb: np.ndarray) -> tuple[float, float]:
    """Centre of the red of a picture, as fractions of its height and width."""
    red = rgb[..., 0].astype(int) - rgb[..., 2].astype(int) > 60
    ys, xs = np.nonzero(red)
    return ys.mean() / rgb.shape[0], xs.mean() / rgb.shape[1]


def assert_heat_on_blob(rgb: np.ndarray, frame: int) -> None:
    rows, cols = BLOBS[frame]
    assert rgb.shape[:2] == (round(ROWS * 512 / COLUMNS), 512)  # scaled, aspect ratio kept, not transposed
    y, x = heat_centre(rgb)
    assert rows.start / ROWS - 0.05 < y < rows.stop / ROWS + 0.05 and cols.start / COLUMNS - 0.05 < x < cols.stop / COLUMNS + 0.05
    far = rgb[-1, 0] if frame != 0 else rgb[-1, -1]  # a corner away from the blob: the dark field, grey, not inverted
    assert (far < 40).all() and far[0] == far[1] == far[2]


def test_the_overlay_png_puts_the_heat_on_the_blob_of_the_scored_frame(predictor, tmp_path):
    path = multiframe_monochrome1(tmp_path / "blobs.dcm")
    scores = predictor.score_file(path)
    scores = [dataclasses.replace(s, probability=0.9 if s.frame == 2 else 0.1) for s in scores]  # frame 2 the most suspicious
    written = write_overlay(probed(predictor), path, scores, tmp_path / "png")
    assert_heat_on_blob(np.asarray(Image.open(written).convert("RGB")), frame=1)
    assert [p.name for p in (tmp_path / "png").iterdir()] == [written.name]  # no temporary file left beside it


def test_the_heatmap_secondary_capture_puts_the_heat_on_the_blob_of_its_frame(predictor, tmp_path):
    path = multiframe_monochrome1(tmp_path / "blobs.dcm")
    score = next(s for s in predictor.score_file(path) if s.frame == 3)
    heatmap = pydicom.dcmread(io.BytesIO(encoded(secondary_capture(probed(predictor), path, score), "the heatmap", path.name)))
    assert heatmap.PhotometricInterpretation == "RGB" and heatmap.BitsAllocated == 8 and heatmap.SamplesPerPixel == 3
    assert "PixelSpacing" not in heatmap  # a scaled picture claims no measurement
    assert_heat_on_blob(heatmap.pixel_array, frame=2)


def test_the_heatmap_secondary_capture_names_its_source_frame_and_says_it_is_not_for_diagnosis(predictor, tmp_path):
    path = multiframe_monochrome1(tmp_path / "blobs.dcm")
    source = pydicom.dcmread(path, stop_before_pixels=True)
    score = next(s for s in predictor.score_file(path) if s.frame == 2)
    heatmap = pydicom.dcmread(io.BytesIO(encoded(secondary_capture(predictor, path, score), "the heatmap", path.name)))
    (reference,) = heatmap.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID and reference.ReferencedSOPClassUID == source.SOPClassUID
    assert reference.ReferencedFrameNumber == 2
    assert "not for diagnosis" in heatmap.DerivationDescription
    assert predictor.package.describe(with_sha=False) in heatmap.DerivationDescription
    assert heatmap.StudyInstanceUID == source.StudyInstanceUID and heatmap.SeriesInstanceUID != source.SeriesInstanceUID
    assert heatmap.SOPInstanceUID not in (source.SOPInstanceUID, heatmap.SeriesInstanceUID)


def test_the_heatmap_secondary_capture_keeps_the_source_burned_in_and_lossy_flags(predictor, tmp_path):
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    source.BurnedInAnnotation = "YES"  # the patient's name is in the pixels: so it is in the heatmap's
    source.LossyImageCompression, source.LossyImageCompressionRatio, source.LossyImageCompressionMethod = "01", 10, "ISO_10918_1"
    path = tmp_path / "burned.dcm"
    source.save_as(path)
    heatmap = pydicom.dcmread(io.BytesIO(encoded(secondary_capture(predictor, path, predictor.score_file(path)[0]), "the heatmap", "x")))
    assert heatmap.BurnedInAnnotation == "YES"
    assert heatmap.LossyImageCompression == "01" and heatmap.LossyImageCompressionMethod == "ISO_10918_1"
    assert float(heatmap.LossyImageCompressionRatio) == 10


def test_a_source_that_does_not_say_gives_a_heatmap_that_claims_no_burned_in_state(predictor):
    path = Path(get_testdata_file("CT_small.dcm"))
    heatmap = pydicom.dcmread(io.BytesIO(encoded(secondary_capture(predictor, path, predictor.score_file(path)[0]), "the heatmap", "x")))
    assert "BurnedInAnnotation" not in heatmap and "LossyImageCompression" not in heatmap


def test_a_probability_that_moves_only_by_rounding_draws_no_heat():
    # A model that ignores the image, but whose float32 output for one row of the batch differs in the sixth decimal
    def rounding(batch: np.ndarray) -> np.ndarray:
        p = np.full(len(batch), 0.7, np.float32) - np.float32(3e-6) * (np.arange(len(batch)) == 17)
        return np.stack([1 - p, p], axis=1)

    image = np.random.default_rng(0).uniform(0.4, 0.6, (1, 64, 64)).astype(np.float32)
    result = occlusion_saliency(rounding, image, positive=1, batch=50)  # one run: row 17 is copy 16
    assert result.max_drop == pytest.approx(3e-6, rel=0.1)  # measured and reported as it is
    assert not result.map.any() and not np.isnan(result.map).any()


def test_a_constant_image_gives_an_empty_map_not_nan(predictor):
    from medtriage.serve.saliency import explain_frame

    for value in (0.0, 0.5, 1.0):
        result, png = explain_frame(predictor, np.full((1, 90, 40), value, np.float32))
        assert not np.isnan(result.map).any() and not result.map.any()
        picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert picture.shape == (90, 40, 3) and (picture == round(value * 255)).all()


def test_the_display_of_one_frame_is_that_frame_of_the_whole(tmp_path):
    path = multiframe_monochrome1(tmp_path / "blobs.dcm")
    whole = read_dicom(path).pixels
    for index, (rows, cols) in enumerate(BLOBS):
        one = read_dicom(path, frame=index).pixels[0]
        np.testing.assert_array_equal(one, whole[index])
        assert one[0, rows.start, cols.start] > 0.9 and one[0, 0, 0] < 0.1  # MONOCHROME1: dense is bright


@pytest.mark.parametrize("state", [False, True], ids=["upload copy", "spooled file"])
def test_the_worklist_overlay_is_the_blob_of_the_most_suspicious_frame(predictor, tmp_path, state):
    from medtriage.serve.worklist import Worklist

    path = multiframe_monochrome1(tmp_path / "blobs.dcm")
    data = path.read_bytes()
    scores = [
        dataclasses.replace(s, probability=0.9 if s.frame == 3 else 0.1, priority="URGENT" if s.frame == 3 else "routine")
        for s in predictor.score_file(path)
    ]
    worklist = Worklist(probed(predictor), store=tmp_path / "state" if state else None)
    worklist.add(data, read_dicom(data), scores, path.name)
    (entry,) = worklist.rows()
    assert entry["frame"] == 3
    assert_heat_on_blob(np.asarray(Image.open(io.BytesIO(worklist.overlay(entry["id"]))).convert("RGB")), frame=2)


def test_a_confident_finding_still_draws_heat_where_hiding_lowers_it():
    # p = 1 - 1e-6: hiding cell 17 halves the odds, a real drop that moves p only in the sixth decimal
    def confident(batch: np.ndarray) -> np.ndarray:
        odds = np.where(np.arange(len(batch)) == 17, 5e5, 1e6)
        p = (odds / (1 + odds)).astype(np.float32)
        return np.stack([1 - p, p], axis=1)

    image = np.random.default_rng(0).uniform(0.4, 0.6, (1, 70, 70)).astype(np.float32)
    result = occlusion_saliency(confident, image, positive=1, batch=50)  # one run: row 17 is copy 16
    row, col = divmod(16, 7)  # copy k hides cell k - 1: the first of the batch is the image itself
    assert result.map.max() == pytest.approx(1.0) and result.map[row * 10 + 5, col * 10 + 5] > 0.9
