"""What the de-identification profile cannot make safe, so it goes to quarantine instead of the pool.

The profile cleans headers and the metadata segments of compressed frames; it never touches pixels or reads
free-text content. So objects whose identity may live there (structured reports, documents, images with burned-in
text) are screened out first, each with a fixed machine-readable reason, and so are compressed frames whose segments
cannot be walked to find that metadata, frames past Number of Frames (pictures no viewer shows), and streams of a
syntax that is not walked at all (video, JPEG XL).
numpy/pydicom only.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from medtriage.io.deid import NO_PATIENT_IDENTITY, NO_SOP_INSTANCE, REEXPORT, patient_key, transfer_syntax
from medtriage.io.stream_metadata import damaged_frame, frames_past_count, unwalked_stream

# Objects whose identity lives in free text or documents the header profile does not reach.
UNSAFE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.": "structured report (free-text content items)",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document (PDF, CDA, 3D model)",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state (free-text annotations)",
    "1.2.840.10008.5.1.4.1.1.9.": "waveform",
    "1.2.840.10008.5.1.4.1.1.66": "raw data",
}
# Objects that often carry text burned into the pixels: secondary capture (screenshots, scans),
# ultrasound, visible-light photographs. Accepted only when the site states BurnedInAnnotation=NO.
BURN_IN_PRONE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.6.",
    "1.2.840.10008.5.1.4.1.1.3.",
    "1.2.840.10008.5.1.4.1.1.77.",
)
BURN_IN_PRONE_MODALITIES = frozenset({"US", "SC", "OT", "XC", "ES", "GM", "DOC"})


@dataclass(frozen=True)
class Unsafe:
    """Why a file goes to quarantine: `reason` is a fixed machine-readable code, `detail` is for people."""

    reason: str
    detail: str


def _burned_in_values(ds: Dataset) -> set[str]:
    """BurnedInAnnotation's values, upper case. It holds one, but a writer may give several (YES\\NO): any YES is
    taken at its word, and only NO alone clears an image prone to burned-in text."""
    value = ds.get("BurnedInAnnotation", "") or ""
    values = value if isinstance(value, MultiValue) else [value]
    return {str(v).strip().upper() for v in values if str(v).strip()}


def screen(ds: Dataset) -> Unsafe | None:
    """None when the profile can make `ds` safe; otherwise the quarantine reason."""
    sop_class = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    for prefix, what in UNSAFE_SOP_CLASSES.items():
        if sop_class.startswith(prefix):
            return Unsafe("unsafe_sop_class", f"{what} ({sop_class}): header de-identification cannot reach its content")
    burned_in = _burned_in_values(ds)
    if "YES" in burned_in:
        return Unsafe("burned_in_annotation", "BurnedInAnnotation is YES: identifying text in the pixels")
    prone = sop_class.startswith(BURN_IN_PRONE_SOP_CLASSES) or str(ds.get("Modality", "")).upper() in BURN_IN_PRONE_MODALITIES
    if prone and burned_in != {"NO"}:
        return Unsafe(
            "burned_in_annotation_unknown",
            f"{ds.get('Modality', '?')} / {sop_class} often has text in its pixels "
            "and BurnedInAnnotation is not NO: review it and set NO, or mask the pixels first",
        )
    if not ds.get("SOPInstanceUID"):  # missing or empty, as de-identification finds it (`deid.not_deidentifiable`)
        return Unsafe("unreadable", NO_SOP_INSTANCE)
    if patient_key(ds) is None:
        return Unsafe("no_patient_identity", f"{NO_PATIENT_IDENTITY}: patient-level splits would be impossible")
    if unwalked := unwalked_stream(ds, transfer_syntax(ds)):  # before the pixel checks, which would say truncated
        return Unsafe("unwalked_compression", unwalked)
    if past := frames_past_count(ds, transfer_syntax(ds)):  # a whole frame, not bytes beside a frame's pixels
        return Unsafe("damaged_compressed_frame", f"{past}; {REEXPORT}")
    if damaged := damaged_frame(ds, transfer_syntax(ds)):
        return Unsafe(
            "damaged_compressed_frame",
            f"{damaged}: what it may hold beside its pixels cannot be told apart to remove; {REEXPORT}",
        )
    return None
