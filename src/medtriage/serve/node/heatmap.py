"""`--heatmaps`: the occlusion picture of a study's most urgent instance as a DICOM Secondary Capture
(RGB, 8-bit) in the same study, so the PACS viewer shows where the model looked next to the image: with the
source's orientation, pixel shape and side, so it hangs and looks like the image it explains. It names the package
that scored the image, and is drawn only by that package: a picture from another model (a node restarted with a new
package closing a study scored before) would not show where the scoring model looked."""

from __future__ import annotations

import io
import math
import re
from fractions import Fraction
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import generate_uid

from medtriage.errors import DicomError, MedTriageError
from medtriage.io.dicom import read_dicom
from medtriage.serve.dicom_results import (
    built_from_header,
    carried_header,
    declare_character_set,
    equipment,
    long_string,
    missing_uids,
    naming_patient,
    read_header,
    referenced_frames,
    revision_series_uid,
    scoring_equipment,
)
from medtriage.serve.package import identity_label, picture_refused
from medtriage.serve.predictor import Predictor, Score
from medtriage.serve.saliency import DISPLAY_SIDE, explain_frame

HEATMAP_SERIES_NUMBER = 9902
# Patient direction letters along +x, +y, +z of the patient coordinate system, negative first (PS3.3 C.7.6.1.1.1).
AXIS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))
PATIENT_LETTERS = {"R", "L", "A", "P", "F", "H"}
MINOR_COSINE = 0.1  # a direction's lesser components below this are noise, not a named obliquity
LATERALITIES = {"R", "L", "B", "U"}  # Image Laterality: right, left, both, unpaired (PS3.3 C.7.6.1)
CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")  # a CS value: copied only when valid, so a bad source cannot spoil the SC
ASPECT_DENOMINATOR = 1000  # pixel shapes closer than 1 in 1000 to square are square (spacings differing by rounding)


def secondary_capture(
    predictor: Predictor, path: Path, score: Score, revision: int | None = None, patient: pydicom.Dataset | None = None
) -> hd.sc.SCImage:
    """The overlay of `score`'s frame of the instance at `path`, referencing that instance's study. `revision` as for
    the study's SR (dicom_results.build_study_sr): the heatmaps of one study share a series, numbered in order.
    `patient`: the header of the study's image its SR names the patient from (dicom_results.patient_source), where
    the picture is to name that patient, not its own image's (which may leave it blank)."""
    identity = _drawn_by_scoring_package(predictor, score)
    where = score.sop_uid or score.file  # a source may lack its SOP Instance UID
    with built_from_header("the heatmap Secondary Capture", where=where):
        source = carried_header(read_header(path))  # values a strict PACS would refuse the image for are left out
        if patient is not None:
            source = naming_patient(source, carried_header(patient))
    _require_study(source, where)
    image = read_dicom(path, frame=None if score.frame is None else score.frame - 1)
    _, png = explain_frame(predictor, image.pixels[0])
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    with built_from_header("the heatmap Secondary Capture", where=where):
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
            patient_orientation=("L", "F"),  # replaced below: highdicom takes single letters only
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            series_description=long_string(f"AI triage where the model looked ({identity_label(identity)})"),
            contributing_equipment=[scoring_equipment(identity, "scored the source image and drew where it looked")],
            **equipment(identity),
        )
        image.PatientOrientation = patient_orientation(source, score.frame)
        aspect = pixel_aspect_ratio(source, score.frame)
        if aspect:
            image.PixelAspectRatio = aspect
        describe_anatomy(image, source, score.frame)
        describe_derivation(image, source, score.frame, identity, predictor.package.positive_label)
        declare_character_set(image)  # the package's name and labels are its own text, not the source's
    return image


def _require_study(source: pydicom.Dataset, where: str) -> None:
    """Refuse a source without a Study Instance UID, the study the heatmap is filed in: missing, the builders fail with
    an AttributeError's text; empty, they make a picture in no study. The source's other UIDs are only referenced
    where present (Source Image Sequence), and its series and frame of reference are not the heatmap's."""
    missing = missing_uids(source, ("StudyInstanceUID",))
    if missing:
        raise DicomError(
            f"the image has no value for {missing[0]}, the study its heatmap would be filed in",
            where=where,
            hint="export the image again with its Study Instance UID in its header; its score needs none and stands without the heatmap",
        )


def _drawn_by_scoring_package(predictor: Predictor, score: Score) -> dict:
    """The identity of the package that scored `score`, which must be the one that draws the picture."""
    identity = score.scoring_package()
    refused = picture_refused(identity, predictor.package.identity())
    if refused:
        raise MedTriageError(
            refused,
            where=score.sop_uid,
            hint="the study's report still names the package that scored it; send the study again for a new score and picture",
        )
    return identity


def pixel_aspect_ratio(source: pydicom.Dataset, frame: int | None) -> list[int] | None:
    """The vertical and horizontal size of the source's pixels as whole numbers (Pixel Aspect Ratio, PS3.3 C.7.6.3),
    None where they are square or unknown. The heatmap is the source scaled alike along both axes, so its pixels have
    the same shape, and a viewer given the ratio shows it as unstretched as the source. A ratio, not a pixel spacing:
    the picture is for looking, not for measuring."""
    for sizes in _pixel_sizes(source, frame):
        try:
            vertical, horizontal = (float(value) for value in sizes)
        except (TypeError, ValueError):
            continue
        if vertical > 0 and horizontal > 0 and math.isfinite(vertical / horizontal):
            ratio = Fraction(vertical / horizontal).limit_denominator(ASPECT_DENOMINATOR)
            return None if ratio in (0, 1) else [ratio.numerator, ratio.denominator]
    return None


def _pixel_sizes(source: pydicom.Dataset, frame: int | None) -> list:
    """(row spacing, column spacing) pairs that may describe the source's pixels, the most authoritative first."""
    spacings = [source.get(keyword) for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")]
    measures = [
        group.PixelMeasuresSequence[0].get("PixelSpacing") for group in _frame_groups(source, frame) if group.get("PixelMeasuresSequence")
    ]
    return [sizes for sizes in [*spacings, *measures, source.get("PixelAspectRatio")] if sizes]


def describe_anatomy(image: pydicom.Dataset, source: pydicom.Dataset, frame: int | None) -> None:
    """Which side and which view the picture shows, as the source says, for hanging protocols and the reader: Image
    Laterality (from the source's image, frame or series laterality; image level, since one heatmap series may hold
    pictures of both sides of a study) and View Position. Where the source names no side, the series' Laterality is
    present and empty: it is Type 2C, required for a paired body part without an Image Laterality, and the heatmap
    cannot tell whether the body part is paired (empty is the standard's "unknown")."""
    laterality = image_laterality(source, frame)
    if laterality:
        image.ImageLaterality = laterality
    else:
        image.Laterality = ""
    view = str(source.get("ViewPosition") or "").strip().upper()
    if CODE_STRING.fullmatch(view):
        image.ViewPosition = view


def image_laterality(source: pydicom.Dataset, frame: int | None) -> str | None:
    """R, L, B or U: the source's Image Laterality, else its frame's (Frame Anatomy of an enhanced object), else its
    series' Laterality; None where none holds a valid value."""
    anatomy = [group.FrameAnatomySequence[0] for group in _frame_groups(source, frame) if group.get("FrameAnatomySequence")]
    candidates = [source.get("ImageLaterality"), *(item.get("FrameLaterality") for item in anatomy), source.get("Laterality")]
    return next((value for value in (str(c or "").strip().upper() for c in candidates) if value in LATERALITIES), None)


def describe_derivation(image: pydicom.Dataset, source: pydicom.Dataset, frame: int | None, identity: dict, positive_label: str) -> None:
    """Where the heatmap comes from, for the PACS and the reader: the source instance (and frame), what the picture
    is (a scaled copy with the occlusion map of the package `identity` on it, not for diagnosis), and the source's
    burned-in annotation and lossy compression flags, which hold for the heatmap's pixels as much as for the source's."""
    if source.get("SOPClassUID") and source.get("SOPInstanceUID"):
        reference = pydicom.Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        frames = referenced_frames(source, frame)  # none for a single-frame SOP class, which the description still names
        if frames:
            reference.ReferencedFrameNumber = frames[0]
        image.SourceImageSequence = [reference]
    of_frame = f" (frame {frame})" if frame is not None else ""
    image.DerivationDescription = (
        f"Occlusion sensitivity of {identity_label(identity)} (model.onnx sha256 {identity['sha256']}) on the source image{of_frame} "
        f"scaled to at most {DISPLAY_SIDE} pixels: warm where hiding a region lowered the probability of {positive_label}. "
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
    """Image Orientation (Patient) of a classic image, or of the frame in an enhanced multi-frame object; None where
    it is missing or holds other than finite numbers (an empty value, a letter): a damaged value of the scored image
    costs the picture its orientation labels, not the picture."""
    planes = [group.PlaneOrientationSequence[0] for group in _frame_groups(source, frame) if group.get("PlaneOrientationSequence")]
    holder = source if "ImageOrientationPatient" in source else planes[0] if planes else pydicom.Dataset()
    try:
        cosines = [float(value) for value in holder.get("ImageOrientationPatient") or []]
    except Exception:  # noqa: BLE001 -- pydicom converts lazily, and a damaged value raises any type
        return None
    return cosines if cosines and all(math.isfinite(value) for value in cosines) else None


def _frame_groups(source: pydicom.Dataset, frame: int | None) -> list[pydicom.Dataset]:
    """The functional groups of an enhanced multi-frame object that hold for `frame` (1-based): shared, then its own."""
    shared = source.get("SharedFunctionalGroupsSequence") or []
    per_frame = source.get("PerFrameFunctionalGroupsSequence") or []
    index = (frame or 1) - 1
    return [*shared[:1], *per_frame[index : index + 1]]


def _direction_letters(cosine: list[float]) -> str:
    """'L', or 'LP' for a direction mostly to the left and somewhat posterior: largest component first."""
    axes = sorted(range(3), key=lambda axis: -abs(cosine[axis]))
    return "".join(AXIS_LETTERS[axis][cosine[axis] > 0] for axis in axes if abs(cosine[axis]) >= MINOR_COSINE)
