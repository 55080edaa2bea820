"""The content check: an OOD score inside the served graph withholds scores of images unlike the training X-rays,
whatever their headers say, and flags held-out X-rays only at about the stated false-alarm rate."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from medtriage.data.sources.medmnist import as_chw
from medtriage.errors import MedTriageError
from medtriage.io.dicom import DecodedImage, read_dicom
from medtriage.io.npz import read_npz
from medtriage.io.pathology import iter_tile_batches, prepare_slide
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor, Rejection, to_model_channels
from tests.export.tiny_package import NPZ, ROOT

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SLIDE = ROOT / "data" / "samples" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def predictor(safe_predictor) -> Predictor:
    """This module scores with the package that carries an OOD output and drift references."""
    return safe_predictor


def relabelled_as_cr(name: str) -> bytes:
    """A real CT or MR slice whose header claims it is a chest CR: the lie a scope check cannot see."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.Modality, ds.SOPClassUID, ds.BodyPartExamined = "CR", CR_STORAGE, "CHEST"
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def scored_or_rejected(predictor: Predictor, image: DecodedImage, name: str):
    try:
        return predictor.score_decoded(image, name)
    except MedTriageError as err:
        return Rejection.of(name, err)


def as_decoded(pixels: np.ndarray, modality: str) -> DecodedImage:
    return DecodedImage(
        pixels=pixels.astype(np.float32),
        sop_uid="1.2.3.4",
        study_uid="1.2.3",
        series_uid="1.2.3.1",
        patient_id="",
        modality=modality,
        sop_class_uid=CR_STORAGE,
        photometric="RGB",
        rows=pixels.shape[-2],
        columns=pixels.shape[-1],
        frames=len(pixels),
        bits_stored=8,
        transfer_syntax="",
    )


def test_the_package_declares_its_ood_output(predictor):
    ood = predictor.package.meta["ood"]
    assert ood["output"] == "ood_score" in predictor.output_names
    assert ood["false_alarm_rate"] == 0.01 and 0.0 < ood["val_flagged"] <= 0.02
    assert ood["parity"]["max_rel_diff"] <= ood["parity"]["tolerance"]


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_ct_and_mr_slices_relabelled_as_cr_are_withheld(predictor, name):
    data = relabelled_as_cr(name)
    assert read_dicom(data).modality == "CR"
    outcome = predictor.score_or_reject(data, name)
    assert isinstance(outcome, Rejection), outcome
    assert (outcome.code, outcome.error) == ("unusual_input", "UnusualInputError")
    assert outcome.withheld and outcome.withheld[0].ood_score > predictor.package.ood_threshold
    assert "withheld" not in outcome.as_dict()


def test_pathology_tiles_are_withheld(predictor):
    prepared = prepare_slide(SLIDE, tile_size=224, min_tissue=0.5)
    try:
        _, tiles = next(iter_tile_batches(prepared, batch_size=8))
    finally:
        prepared.slide.close()
    outcomes = [scored_or_rejected(predictor, as_decoded(tile[None], "SM"), f"tile{i}") for i, tile in enumerate(tiles)]
    flagged = [isinstance(o, Rejection) and o.code == "unusual_input" for o in outcomes]
    assert len(tiles) == 8 and all(flagged), [o.withheld[0].ood_score if isinstance(o, Rejection) else o for o in outcomes]


def test_held_out_xrays_are_flagged_at_about_the_stated_rate(predictor):
    images, _ = read_npz(NPZ)["test"]
    _, ood = predictor.outputs(np.stack([as_chw(image) for image in images]))
    rate = float(np.mean(ood > predictor.package.ood_threshold))
    assert rate <= 3 * predictor.package.meta["ood"]["false_alarm_rate"], rate


def test_real_cr_files_are_not_flagged(predictor):
    for name in ("RG1_UNCI.dcm", "RG1_J2KI.dcm"):
        path = get_testdata_file(name)
        if path is None:
            pytest.skip("pydicom-data is not installed")
        assert not isinstance(predictor.score_or_reject(path, name), Rejection)


def test_allow_out_of_scope_scores_and_flags_unusual_inputs(safe_package_dir):
    allowed = Predictor(load_package(safe_package_dir), threads=1, allow_out_of_scope=True)
    scores = allowed.score_file(relabelled_as_cr("CT_small.dcm"), "ct-as-cr")
    assert scores[0].flags == ["unusual_input"] and 0.0 <= scores[0].probability <= 1.0


def test_served_ood_score_equals_torch(predictor, safe_exported):
    model = safe_exported[1]
    for name in ("CT_small.dcm", "MR_small.dcm", "RG1_UNCI.dcm"):
        path = get_testdata_file(name)
        if path is None:
            continue
        pixels = to_model_channels(read_dicom(path).pixels, 1)
        with torch.no_grad():
            expected = model(torch.from_numpy(pixels))[1].numpy()
        _, served = predictor.outputs(pixels)
        np.testing.assert_allclose(served, expected, rtol=1e-3, atol=1e-4)
