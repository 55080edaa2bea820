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
from medtriage.serve.dicom_results import built_from_header, read_header, revision_series_uid
from medtriage.serve.predictor import Predictor, Score
from medtriage.serve.saliency import DISPLAY_SIDE, explain_frame

HEATMAP_SERIES_NUMBER = 9902
# Patient direction letters along +x, +y, +z of the patient coordinate system, negative first (PS3.3 C.7.6.1.1.1).
AXIS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))
PATIENT_LETTERS = {"R", "L", "A", "P", "F", "H"}
MINOR_COSINE = 0.1  # a direction's lesser components below this are noise, not a named obliquity


def secondary_capture(predictor: Predictor, path: Path, score: Score, revision: int | None = None) -> hd.sc.SCImage:
    """The overlay of `score`'s frame of the instance at `path`, referencing that instance's study. `revision` as for
    the study's SR (dicom_results.build_study_sr): the heatmaps of one study share a series, numbered in order."""
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
            series_instance_uid=revision_series_uid(source, predictor.package, "heatmaps") if revision else generate_uid(),
            series_number=HEATMAP_SERIES_NUMBER,
            sop_instance_uid=generate_uid(),
            instance_number=revision or 1,
            manufacturer="MedTriage",
            patient_orientation=("L", "F"),  # replaced below: highdicom takes single letters only
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            series_description=f"AI triage where the model looked ({predictor.package.describe(with_sha=False)})",
        )
        image.PatientOrientation = patient_orientation(source, score.frame)
        describe_derivation(image, source, score.frame, predictor)
    return image


def describe_derivation(image: pydicom.Dataset, source: pydicom.Dataset, frame: int | None, predictor: Predictor) -> None:
    """Where the heatmap comes from, for the PACS and the reader: the source instance (and frame), what the picture
    is (a scaled copy with the occlusion map on it, not for diagnosis), and the source's burned-in annotation and
    lossy compression flags, which hold for the heatmap's pixels as much as for the source's."""
    if source.get("SOPClassUID") and source.get("SOPInstanceUID"):
        reference = pydicom.Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        if frame is not None:
            reference.ReferencedFrameNumber = frame
        image.SourceImageSequence = [reference]
    package = predictor.package
    image.DerivationDescription = (
        f"Occlusion sensitivity of {package.describe(with_sha=False)} on the source image scaled to at most {DISPLAY_SIDE} "
        f"pixels: warm where hiding a region lowered the probability of {package.positive_label}. "
        "Decision support, not for diagnosis; no pixel spacing."
    )
    if str(source.get("BurnedInAnnotation", "")).strip().upper() in ("YES", "NO"):
        image.BurnedInAnnotation = str(source.BurnedInAnnotation).strip().upper()
    if str(source.get("LossyImageCompression", "")).strip() == "01":  # once lossy, never unflagged (PS3.3 C.7.6.1.1.5)
        image.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if source.get(keyword):
                setattr(image, keyword, source[keyword].value)


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
