"""Triage results as a DICOM Comprehensive SR (TID 1500 measurement report) with highdicom.

One SR per source instance, in the source's study, referencing the source study, series and
instance (and frame); each scored frame is one measurement group carrying the calibrated
probability, the finding, the priority and the algorithm name/version (with the model's sha256).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from medtriage import __version__
from medtriage.errors import DicomError
from medtriage.serve.package import ModelPackage
from medtriage.serve.predictor import Score

SCHEME = "99MEDTRIAGE"  # local coding scheme ("99" prefix = private, PS3.16 8.2) for model-specific concepts
PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")
PRIORITY = hd.sr.CodedConcept("priority", SCHEME, "Triage priority")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
SR_SERIES_NUMBER = 9901


def read_header(source: str | Path | bytes | BinaryIO) -> pydicom.Dataset:
    """The source's header (no pixels), for the references the SR carries."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        return pydicom.dcmread(source, stop_before_pixels=True, force=True)
    except Exception as err:
        raise DicomError(f"cannot read the header to reference in the SR ({err})", where=str(source)) from err


def build_sr(source: pydicom.Dataset, scores: list[Score], package: ModelPackage) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR for the scores of one source instance."""
    # highdicom writes each parameter key as one TEXT item, so each key is a whole "name=value".
    parameters = {f"sha256={package.sha256}": package.sha256, f"software=medtriage {__version__}": __version__}
    algorithm = hd.sr.AlgorithmIdentification(name=package.name, version=str(package.version), parameters=parameters)
    groups = [_measurement_group(source, score, package, algorithm) for score in scores]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(package), procedure_reported=PROCEDURE, imaging_measurements=groups,
    )
    try:
        return hd.sr.ComprehensiveSR(
            evidence=[source], content=report, series_instance_uid=generate_uid(), series_number=SR_SERIES_NUMBER,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="MedTriage",
            series_description=f"AI triage {package.describe(with_sha=False)}", is_complete=True,
        )
    except (ValueError, AttributeError, TypeError) as err:
        raise DicomError(f"cannot build an SR referencing this file ({err})", where=str(scores[0].file),
                         hint="the source lacks study/patient attributes an SR must copy") from err


def _observation_context(package: ModelPackage) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=generate_uid(), name="medtriage", model_name=package.name)
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)
    )


def _measurement_group(source: pydicom.Dataset, score: Score, package: ModelPackage, algorithm) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    label = package.positive_label
    probability = hd.sr.Measurement(
        name=hd.sr.CodedConcept(f"p-{label}"[:16], SCHEME, f"Calibrated probability of {label}"),
        value=round(score.probability, 6), unit=NO_UNITS, algorithm_id=algorithm,
    )
    evaluations = [
        hd.sr.QualitativeEvaluation(FINDING, hd.sr.CodedConcept(score.finding[:16], SCHEME, score.finding)),
        hd.sr.QualitativeEvaluation(PRIORITY, hd.sr.CodedConcept(score.priority.lower(), SCHEME, score.priority)),
    ]
    frames = [score.frame] if score.frame is not None else None
    image = hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID, referenced_frame_numbers=frames)
    frame_text = f" frame {score.frame}" if score.frame is not None else ""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"triage{frame_text}"),
        algorithm_id=algorithm, measurements=[probability], qualitative_evaluations=evaluations, source_images=[image],
    )


def write_sr(source: str | Path | bytes | BinaryIO, scores: list[Score], package: ModelPackage, out_dir: str | Path) -> Path:
    """Write the SR for one source instance to `out_dir/<source SOP UID>.SR.dcm`."""
    sr = build_sr(read_header(source), scores, package)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{scores[0].sop_uid or sr.SOPInstanceUID}.SR.dcm"
    sr.save_as(path)
    return path


def sr_bytes(source: bytes, scores: list[Score], package: ModelPackage) -> bytes:
    buffer = io.BytesIO()
    build_sr(read_header(source), scores, package).save_as(buffer)
    return buffer.getvalue()
