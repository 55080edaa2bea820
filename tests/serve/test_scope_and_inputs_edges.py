"""Edge inputs at the predictor's door: pixels that are not numbers, images too small or too elongated for the square
input the graph squeezes them into, and rejections that keep what to do about them in every report form.

Each case is a real pydicom test file, edited the way a misbehaving export or a cropped film would be.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.errors import InputError
from medtriage.io.dicom import read_dicom
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor, Rejection
from medtriage.serve.report import format_table, result_document, write_csv
from medtriage.serve.scope import first_failure, header_facts

# The scope export declares for a pool without headers (PneumoniaMNIST): the modality alone.
DECLARED_SCOPE = {"modalities": ["CR", "DX"], "source": "declared by export.modality (CR)"}


def as_bytes(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def no_inference(*args, **kwargs):
    raise AssertionError("the model ran on an image it should have refused")


@pytest.fixture(scope="module")
def declared(safe_package_dir, tmp_path_factory) -> Predictor:
    """The OOD package with the scope export declares for an npz pool (only the modality is listed)."""
    target = Path(shutil.copytree(safe_package_dir, tmp_path_factory.mktemp("declared") / "chest"))
    meta = json.loads((target / "model.json").read_text())
    (target / "model.json").write_text(json.dumps({**meta, "scope": DECLARED_SCOPE}))
    return Predictor(load_package(target), threads=1)


def float_pixels(bad: float) -> bytes:
    """CT_small.dcm as Float Pixel Data (real-world values) with one pixel set to `bad`."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    values = ds.pixel_array.astype(np.float32)
    values[10, 10] = bad
    del ds.PixelData
    for keyword in ("PixelRepresentation", "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.FloatPixelData = values.tobytes()
    return as_bytes(ds)


def nan_rescale_slope() -> bytes:
    """CT_small.dcm whose Rescale Slope reads NaN (a damaged header)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.RescaleSlope = "NaN"
    return as_bytes(ds)


def cr_crop(rows: slice, columns: slice, name: str = "RG1_UNCR.dcm") -> bytes:
    """A region of a real CR film, saved as a CR image of its own (a sliver, a strip, a few pixels)."""
    ds = pydicom.dcmread(get_testdata_file(name))
    crop = np.ascontiguousarray(ds.pixel_array[rows, columns])
    ds.Rows, ds.Columns = crop.shape
    ds.PixelData = crop.tobytes()
    return as_bytes(ds)


@pytest.mark.parametrize(
    "make", [lambda: float_pixels(np.nan), lambda: float_pixels(np.inf), nan_rescale_slope], ids=["nan-pixel", "inf-pixel", "nan-slope"]
)
def test_pixels_that_are_not_finite_are_refused_before_inference(predictor, monkeypatch, make):
    """A NaN probability is below every threshold: the image would be filed as routine, and the JSON report would
    carry a NaN no strict parser reads. The decoder refuses such pixels (training and ingest read them too)."""
    monkeypatch.setattr(predictor, "outputs", no_inference)
    outcome = predictor.score_or_reject(make(), "float.dcm")
    assert isinstance(outcome, Rejection), outcome
    assert outcome.error == "DicomError" and "NaN or infinite" in outcome.reason and outcome.hint
    json.dumps(result_document(predictor, [], [outcome]), allow_nan=False)


def test_decoded_pixels_that_are_not_finite_never_reach_the_model(predictor, safe_predictor, monkeypatch):
    """Pixels handed over already decoded (score_decoded) are checked too; the OOD screen cannot catch a NaN, whose
    score is never above any threshold."""
    decoded = read_dicom(get_testdata_file("CT_small.dcm"))
    pixels = decoded.pixels.copy()
    pixels[0, 0, 10, 10] = np.nan
    image = dataclasses.replace(decoded, pixels=pixels, frame_means=None)  # as another decoder might hand it over
    for scorer in (predictor, safe_predictor):
        monkeypatch.setattr(scorer, "outputs", no_inference)
        with pytest.raises(InputError, match="NaN or infinite"):
            scorer.score_decoded(image, "float.dcm")


@pytest.mark.parametrize(
    "rows, columns, field",
    [
        (slice(None), slice(600, 664), "aspect_ratio"),  # 1955 x 64: a vertical strip
        (slice(600, 1000), slice(None), "aspect_ratio"),  # 400 x 1841
        (slice(900, 901), slice(900, 901), "rows"),  # 1 x 1
        (slice(900, 908), slice(900, 908), "rows"),  # 8 x 8
    ],
    ids=["strip", "band", "one-pixel", "eight-pixels"],
)
def test_slivers_and_specks_of_a_film_are_out_of_scope(declared, monkeypatch, rows, columns, field):
    """The graph resizes every image to its square input: a 30:1 strip of a radiograph becomes a smear the model
    still scores (URGENT, for the strip here), and a few pixels hold no picture at all."""
    monkeypatch.setattr(declared, "outputs", no_inference)
    outcome = declared.score_or_reject(cr_crop(rows, columns), "crop.dcm")
    assert isinstance(outcome, Rejection), outcome
    assert (outcome.code, outcome.field) == ("out_of_scope", field)
    assert field in outcome.reason


def test_whole_films_and_small_square_images_stay_in_scope(declared):
    for data in (Path(get_testdata_file("RG1_UNCR.dcm")).read_bytes(), cr_crop(slice(900, 928), slice(900, 928))):
        outcome = declared.score_or_reject(data, "film.dcm")
        assert not (isinstance(outcome, Rejection) and outcome.code == "out_of_scope"), outcome


def test_a_scopes_own_larger_minimum_still_holds():
    film = header_facts(read_dicom(get_testdata_file("RG1_UNCR.dcm")))
    assert first_failure({"min_rows": 2000}, film).field == "rows"
    band = header_facts(read_dicom(cr_crop(slice(600, 1000), slice(None))))
    assert (band["aspect_ratio"], first_failure({}, band).allowed) == (4.6, {"max": 3.0})


def test_a_rejection_keeps_what_to_do_in_every_report_form(predictor, declared):
    truncated = predictor.score_or_reject(get_testdata_file("MR_truncated.dcm"), "MR_truncated.dcm")
    foreign = declared.score_or_reject(get_testdata_file("CT_small.dcm"), "CT_small.dcm")
    for rejection in (truncated, foreign):
        assert isinstance(rejection, Rejection) and rejection.hint, rejection
        assert rejection.as_dict()["hint"] == rejection.hint
    assert (foreign.code, foreign.field) == ("out_of_scope", "modality") and "--allow-out-of-scope" in foreign.hint
    document = json.loads(json.dumps(result_document(predictor, [], [truncated, foreign])))
    assert [r["hint"] for r in document["rejected"]] == [truncated.hint, foreign.hint]
    stream = io.StringIO()
    write_csv(stream, predictor, [], [truncated, foreign])
    assert [row["hint"] for row in csv.DictReader(io.StringIO(stream.getvalue()))] == [truncated.hint, foreign.hint]
    assert truncated.hint in format_table(predictor, [], [truncated])
