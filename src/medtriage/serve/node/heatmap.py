"""`--heatmaps`: the occlusion picture of a study's most urgent instance as a DICOM Secondary Capture
(RGB, 8-bit) in the same study, so the PACS viewer shows where the model looked next to the image."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import generate_uid

from medtriage.io.dicom import read_dicom
from medtriage.serve.dicom_results import built_from_header, read_header
from medtriage.serve.predictor import Predictor, Score
from medtriage.serve.saliency import explain_frame

HEATMAP_SERIES_NUMBER = 9902
# Patient direction letters along +x, +y, +z of the patient coordinate system, negative first (PS3.3 C.7.6.1.1.1).
AXIS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))
PATIENT_LETTERS = {"R", "L", "A", "P", "F", "H"}
MINOR_COSINE = 0.1  # a direction's lesser components below this are noise, not a named obliquity


def secondary_capture(predictor: Predictor, path: Path, score: Score) -> hd.sc.SCImage:
    """The overlay of `score`'s frame of the instance at `path`, referencing that instance's study."""
    image = read_dicom(path, frame=None if score.frame is None else score.frame - 1)
    _, png = explain_frame(predictor, image.pixels[0])
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    source = read_header(path)
    with built_from_header("the heatmap Secondary Capture", where=str(score.sop_uid)):
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=generate_uid(),
            series_number=HEATMAP_SERIES_NUMBER,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="MedTriage",
            patient_orientation=("L", "F"),  # replaced below: highdicom takes single letters only
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            series_description=f"AI triage where the model looked ({predictor.package.describe(with_sha=False)})",
        )
        image.PatientOrientation = patient_orientation(source, score.frame)
    return image


def patient_orientation(source: pydicom.Dataset, frame: int | None) -> list[str]:
    """The source's row and column directions, so the viewer's orientation labels on the heatmap match the image
    (the heatmap is the same picture, only scaled): copied, else derived from Image Orientation (Patient),
    else empty (Type 2: unknown), never a guess."""
    copied = [str(value) for value in source.get("PatientOrientation") or []]
    if len(copied) == 2 and all(value and set(value) <= PATIENT_LETTERS for value in copied):
        return copied
    cosines = _image_orientation(source, frame)
    if cosines is None or len(cosines) != 6:
        return []
    derived = [_direction_letters(cosines[:3]), _direction_letters(cosines[3:])]
    return derived if all(derived) else []


def _image_orientation(source: pydicom.Dataset, frame: int | None) -> list[float] | None:
    """Image Orientation (Patient) of a classic image, or of the frame in an enhanced multi-frame object."""
    if "ImageOrientationPatient" in source:
        return [float(value) for value in source.ImageOrientationPatient]
    shared = source.get("SharedFunctionalGroupsSequence") or []
    per_frame = source.get("PerFrameFunctionalGroupsSequence") or []
    index = (frame or 1) - 1
    for group in [*shared[:1], *per_frame[index : index + 1]]:
        if group.get("PlaneOrientationSequence"):
            return [float(value) for value in group.PlaneOrientationSequence[0].ImageOrientationPatient]
    return None


def _direction_letters(cosine: list[float]) -> str:
    """'L', or 'LP' for a direction mostly to the left and somewhat posterior: largest component first."""
    axes = sorted(range(3), key=lambda axis: -abs(cosine[axis]))
    return "".join(AXIS_LETTERS[axis][cosine[axis] > 0] for axis in axes if abs(cosine[axis]) >= MINOR_COSINE)
