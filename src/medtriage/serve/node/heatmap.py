"""`--heatmaps`: the occlusion picture of a study's most urgent instance as a DICOM Secondary Capture
(RGB, 8-bit) in the same study, so the PACS viewer shows where the model looked next to the image."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.uid import generate_uid

from medtriage.io.dicom import read_dicom
from medtriage.serve.dicom_results import built_from_header, read_header
from medtriage.serve.predictor import Predictor, Score
from medtriage.serve.saliency import explain_frame

HEATMAP_SERIES_NUMBER = 9902


def secondary_capture(predictor: Predictor, path: Path, score: Score) -> hd.sc.SCImage:
    """The overlay of `score`'s frame of the instance at `path`, referencing that instance's study."""
    image = read_dicom(path, frame=None if score.frame is None else score.frame - 1)
    _, png = explain_frame(predictor, image.pixels[0])
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    source = read_header(path)
    with built_from_header("the heatmap Secondary Capture", where=str(score.sop_uid)):
        return hd.sc.SCImage.from_ref_dataset(
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
            patient_orientation=("L", "F"),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            series_description=f"AI triage where the model looked ({predictor.package.describe(with_sha=False)})",
        )
