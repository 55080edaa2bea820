"""Site simulator: real PneumoniaMNIST X-rays written as DICOM files from three hospitals.

Every image of the npz (all splits; the npz split is not carried over) becomes one study of one
patient at one site. Each site has its own acquisition quirks (vendor tags, bits stored,
MONOCHROME1, rescale, window or VOI LUT, matrix size, pixel spacing, noise, transfer syntax),
fake but realistic PHI for de-identification to remove, and a `labels.csv` as the hospital
exports it, including a few bad rows. Output is byte-identical for the same seed.

Layout: `<out>/<site>/<MODALITY>.<SOP Instance UID>.dcm` and `<out>/<site>/labels.csv`, plus each
simulated site's secret in `<out>/.keys/<site>.key` (where `ingest_sites` looks for it). The secrets
follow from the seed too, so pseudonyms, and with them the patient-level splits and every figure
trained on the pool, repeat on any machine. A real site makes a random secret once and keeps it.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from medtriage.data.sources.medmnist import PNEUMONIA_LABELS
from medtriage.errors import InputError
from medtriage.io.npz import read_npz
from medtriage.io.safe_output import write_atomic
from medtriage.progress import progress

DEFAULT_NPZ = Path("data/samples/pneumoniamnist_28.npz")
DEFAULT_OUT = Path("data/sites")
CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")
STUDIES_PER_PATIENT = ([1, 2, 3, 4], [0.5, 0.25, 0.15, 0.1])


@dataclass(frozen=True)
class SiteProfile:
    """One hospital's acquisition habits and export format."""

    name: str
    institution: str
    address: str
    station: str
    manufacturer: str
    model: str
    modality: str  # CR or DX
    share: float  # fraction of all images
    matrix: int  # rows = columns after resampling
    pixel_spacing: float  # mm
    bits_stored: int
    photometric: str
    rescale: tuple[float, float] | None  # (slope, intercept)
    voi: str  # "window", "lut" or "none"
    noise: float  # Gaussian sigma on the [0, 1] intensity scale
    transfer_syntax: UID
    label_key: str  # labels.csv column that identifies the image
    label_header: tuple[str, str]  # the hospital's own column names
    patient_id_format: str
    accession_format: str


SITES = (
    SiteProfile(
        "st_marys",
        "St Mary's General Hospital",
        "12 Harbour Road, Port Ellis",
        "DXROOM2",
        "AGFA",
        "DX-D 600",
        "DX",
        0.45,
        96,
        0.2,
        12,
        "MONOCHROME2",
        (1.0, -1024.0),
        "window",
        0.01,
        ExplicitVRLittleEndian,
        "accession_number",
        ("accession_number", "finding"),
        "SM{:07d}",
        "SMA{:08d}",
    ),
    SiteProfile(
        "northgate",
        "Northgate Community Hospital",
        "4 Mill Lane, Northgate",
        "CR01",
        "Carestream Health",
        "DirectView CR 975",
        "CR",
        0.30,
        64,
        0.3,
        8,
        "MONOCHROME1",
        None,
        "lut",
        0.02,
        ExplicitVRLittleEndian,
        "sop_instance_uid",
        ("sop_instance_uid", "finding"),
        "NG-{:06d}",
        "NG{:06d}",
    ),
    SiteProfile(
        "riverside",
        "Riverside University Medical Center",
        "200 River Drive, Lowford",
        "FCR-PEDS",
        "FUJIFILM Corporation",
        "FCR PROFECT CS",
        "CR",
        0.25,
        128,
        0.15,
        16,
        "MONOCHROME2",
        (0.5, -100.0),
        "none",
        0.005,
        JPEG2000Lossless,
        "accession_number",
        ("Accession Number", "Finding"),
        "{:08d}",
        "RUMC-{:07d}",
    ),
)

FAMILY = [
    "Chen",
    "Garcia",
    "Okafor",
    "Nguyen",
    "Smith",
    "Müller",
    "Kowalski",
    "Haddad",
    "Silva",
    "Ivanova",
    "Tanaka",
    "O'Brien",
    "Patel",
    "Johansson",
    "Rossi",
    "Mensah",
    "Dubois",
    "Novak",
    "Khan",
    "Lopez",
]
GIVEN = [
    "Mia",
    "Leo",
    "Ava",
    "Noah",
    "Zoe",
    "Omar",
    "Lina",
    "Finn",
    "Ines",
    "Kai",
    "Ella",
    "Ravi",
    "Nora",
    "Yusuf",
    "Ada",
    "Theo",
    "Sofia",
    "Milan",
    "Aiko",
    "Jonas",
]
PHYSICIANS = ["Hart^Eleanor^^Dr", "Mbeki^Samuel^^Dr", "Lindqvist^Anna^^Dr", "Ortega^Luis^^Dr", "Wong^Grace^^Dr"]


@dataclass
class SiteResult:
    """What was written for one site, including the defects planted on purpose."""

    site: str
    images: int = 0
    patients: int = 0
    label_rows: int = 0
    planted: dict = field(default_factory=dict)  # defect kind -> count
    stray_files: list = field(default_factory=list)  # deliberately damaged or non-image files


KEYS_FOLDER = ".keys"  # medtriage.io.ingest.ingest_sites' default place for <site>.key


def make_sites(
    npz: str | Path = DEFAULT_NPZ,
    out_dir: str | Path = DEFAULT_OUT,
    seed: int = 0,
    limit: int | None = None,
    sites: tuple[SiteProfile, ...] = SITES,
) -> list[SiteResult]:
    """Write one folder per site under `out_dir` (replacing earlier output). `limit` caps the image count."""
    images, labels = _all_images(npz)
    order = np.random.default_rng(seed).permutation(len(images))[:limit]
    out_dir = Path(out_dir)
    results = []
    with progress(None, len(order), "writing site DICOM", "file") as bar:
        for site_index, (site, chunk) in enumerate(zip(sites, _shares(order, sites))):
            writer = _SiteWriter(site, out_dir / site.name, seed, site_index)
            results.append(writer.write(images[chunk], labels[chunk], bar))
            _write_site_key(out_dir, site.name, seed)
    return results


def _write_site_key(out_dir: Path, site: str, seed: int) -> None:
    """The simulated site's secret, derived from the seed: a reproducible pool, unlike a real site's key."""
    secret = hashlib.sha256(f"medtriage simulated site|{seed}|{site}".encode()).hexdigest() + "\n"
    write_atomic(out_dir / KEYS_FOLDER / f"{site}.key", secret.encode(), private=True)


def _all_images(npz) -> tuple[np.ndarray, np.ndarray]:
    """Every npz image once: PneumoniaMNIST holds byte-identical copies, which would leak across splits."""
    splits = read_npz(npz)
    _check_pneumonia_layout(splits, npz)
    images = np.concatenate([x for x, _ in splits.values()])
    labels = np.concatenate([y for _, y in splits.values()])
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)
    return images[keep], labels[keep]


def _check_pneumonia_layout(splits: dict[str, tuple[np.ndarray, np.ndarray]], npz) -> None:
    """The sites are grey-scale X-ray departments labelling normal (0) or pneumonia (1): another MedMNIST set (colour
    images, other classes) cannot be written as their exports, and a label such as -1 would silently read as
    pneumonia."""
    hint = "give a grey-scale two-class npz (normal 0, pneumonia 1) such as data/samples/pneumoniamnist_28.npz"
    shapes = {images.shape[1:] for images, _ in splits.values()}
    if len(shapes) > 1 or any(len(shape) != 2 for shape in shapes):
        raise InputError(f"images are {sorted(map(list, shapes))}, not one grey-scale [H, W] size", where=npz, hint=hint)
    for split, (_, labels) in splits.items():
        bad = labels[(labels < 0) | (labels >= len(PNEUMONIA_LABELS))]
        if len(bad):
            raise InputError(f"'{split}_labels' holds label {int(bad[0])}, not 0 (normal) or 1 (pneumonia)", where=npz, hint=hint)


def _shares(order: np.ndarray, sites) -> list[np.ndarray]:
    cuts = np.round(np.cumsum([s.share for s in sites]) / sum(s.share for s in sites) * len(order)).astype(int)
    return np.split(order, cuts[:-1])


class _SiteWriter:
    def __init__(self, site: SiteProfile, folder: Path, seed: int, site_index: int):
        self.site, self.folder, self.seed = site, folder, seed
        self.rng = np.random.default_rng([seed, site_index])
        self.offset = int(self.rng.integers(10**6))  # where this site's id numbering starts
        self.result = SiteResult(site.name)

    def uid(self, *parts) -> UID:
        return generate_uid(entropy_srcs=[str(self.seed), self.site.name, *map(str, parts)])

    def write(self, images: np.ndarray, labels: np.ndarray, bar) -> SiteResult:
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        label_rows = []
        for patient in self._patients(len(images)):
            for visit, index in enumerate(patient["images"]):
                ds = self._dataset(patient, visit, index, images[index])
                path = self.folder / f"{self.site.modality}.{ds.SOPInstanceUID}.dcm"
                ds.save_as(path, enforce_file_format=True)
                label_rows.append(self._label_row(ds, PNEUMONIA_LABELS[int(labels[index])]))
                bar.update()
        self.result.images, self.result.patients = len(images), self._patient_count
        label_rows += self._add_strays(images, label_rows)
        self._write_labels(self._with_bad_rows(label_rows))
        return self.result

    def _patients(self, n_images: int):
        """Consecutive images grouped into patients with 1-4 studies each."""
        start, number = 0, 0
        while start < n_images:
            count = int(self.rng.choice(STUDIES_PER_PATIENT[0], p=STUDIES_PER_PATIENT[1]))
            number += 1
            yield self._patient(number, list(range(start, min(start + count, n_images))))
            start += count
        self._patient_count = number

    def _patient(self, number: int, image_indices: list[int]) -> dict:
        rng = self.rng
        first_visit = dt.datetime(2019, 1, 1) + dt.timedelta(
            days=int(rng.integers(0, 5 * 365)),
            hours=int(rng.integers(7, 20)),
            minutes=int(rng.integers(0, 60)),
            seconds=int(rng.integers(0, 60)),
        )
        gaps = np.cumsum([0, *rng.integers(5, 300, len(image_indices) - 1)])
        return {
            "id": self.site.patient_id_format.format(_scramble(number, 10**6, self.offset)),
            "name": f"{FAMILY[rng.integers(len(FAMILY))]}^{GIVEN[rng.integers(len(GIVEN))]}",
            "sex": "MF"[int(rng.integers(2))],
            "birth": first_visit - dt.timedelta(days=int(rng.integers(365, 6 * 365))),  # paediatric cohort
            "visits": [first_visit + dt.timedelta(days=int(g), minutes=int(rng.integers(0, 300))) for g in gaps],
            "images": image_indices,
            "number": number,
        }

    def _dataset(self, patient: dict, visit: int, index: int, image: np.ndarray) -> Dataset:
        site, when = self.site, patient["visits"][visit]
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SOPClassUID = DX_STORAGE if site.modality == "DX" else CR_STORAGE
        ds.SOPInstanceUID = self.uid("sop", index)
        _set_dates(ds, when)
        ds.AccessionNumber = site.accession_format.format(_scramble(index, 10**7, self.offset))
        ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = site.modality, site.manufacturer, site.model
        ds.InstitutionName, ds.InstitutionAddress, ds.StationName = site.institution, site.address, site.station
        ds.ReferringPhysicianName = PHYSICIANS[self.rng.integers(len(PHYSICIANS))]
        ds.OperatorsName = f"{FAMILY[self.rng.integers(len(FAMILY))]}^{GIVEN[self.rng.integers(len(GIVEN))]}"
        ds.StudyDescription, ds.SeriesDescription = "XR CHEST 1 VIEW", "CHEST AP"
        ds.PatientName, ds.PatientID, ds.PatientSex = patient["name"], patient["id"], patient["sex"]
        ds.PatientBirthDate = patient["birth"].strftime("%Y%m%d")
        ds.PatientAge = f"{(when - patient['birth']).days // 365:03d}Y"
        ds.BodyPartExamined, ds.ViewPosition, ds.PatientOrientation = "CHEST", "AP", ["L", "F"]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = self.uid("study", index), self.uid("series", index)
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = str(1000 + index), 1, 1
        block = ds.private_block(0x0011, f"{site.manufacturer.split()[0].upper()} PACS OPERATOR", create=True)
        block.add_new(0x01, "PN", ds.OperatorsName)  # vendors hide the operator here too
        stored = self._set_pixels(ds, image)
        ds.file_meta = _file_meta(ds, site.transfer_syntax)
        if site.transfer_syntax.is_compressed:
            ds.compress(site.transfer_syntax, stored, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        return ds

    def _set_pixels(self, ds: Dataset, image: np.ndarray) -> np.ndarray:
        site = self.site
        intensity = _resample(image, site.matrix)
        intensity += self.rng.normal(0.0, site.noise, intensity.shape).astype(np.float32)
        np.clip(intensity, 0.0, 1.0, out=intensity)
        if site.photometric == "MONOCHROME1":
            intensity = 1.0 - intensity  # detector convention: dense = low value
        top = 2**site.bits_stored - 1
        stored = np.rint(0.05 * top + 0.9 * top * intensity) if site.voi == "window" else np.rint(top * intensity)
        ds.Rows = ds.Columns = site.matrix
        ds.PixelSpacing = ds.ImagerPixelSpacing = [site.pixel_spacing, site.pixel_spacing]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, site.photometric
        ds.BitsAllocated = 8 if site.bits_stored <= 8 else 16
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = site.bits_stored, site.bits_stored - 1, 0
        ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"
        if site.modality == "DX":
            ds.PresentationIntentType, ds.DetectorType = "FOR PRESENTATION", "SCINTILLATOR"
            ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
        if site.rescale:
            ds.RescaleSlope, ds.RescaleIntercept = (_ds_number(v) for v in site.rescale)
            ds.RescaleType = "US"
        self._set_voi(ds, top)
        stored = stored.astype(np.uint8 if ds.BitsAllocated == 8 else np.uint16)
        ds.PixelData = stored.tobytes()
        return stored

    def _set_voi(self, ds: Dataset, top: int) -> None:
        if self.site.voi == "window":
            slope, intercept = self.site.rescale or (1.0, 0.0)
            jitter = self.rng.normal(1.0, 0.02, 2)  # each exposure gets its own auto-window
            ds.WindowCenter = _ds_number((top / 2 * slope + intercept) * jitter[0])
            ds.WindowWidth = _ds_number(0.9 * top * slope * jitter[1])
            ds.VOILUTFunction = "LINEAR"
        elif self.site.voi == "lut":
            item = Dataset()
            item.add_new(0x00283002, "US", [top + 1, 0, 16])  # LUT Descriptor: entries, first value, bits
            curve = np.linspace(0.0, 1.0, top + 1) ** 0.8  # vendor tone curve
            item.add_new(0x00283003, "LO", "VENDOR TONE")
            item.add_new(0x00283006, "OW", np.rint(curve * 65535).astype("<u2").tobytes())
            ds.VOILUTSequence = [item]

    def _label_row(self, ds: Dataset, finding: str) -> dict:
        key = ds.SOPInstanceUID if self.site.label_key == "sop_instance_uid" else ds.AccessionNumber
        return {"key": str(key), "finding": finding, "path": f"{ds.Modality}.{ds.SOPInstanceUID}.dcm"}

    def _add_strays(self, images: np.ndarray, label_rows: list[dict]) -> list[dict]:
        """What real exports contain besides images: a text report, a transfer cut short."""
        if not len(images):
            return []
        index = len(images) + 1
        if self.site.voi == "window":
            name = f"SR.{self.uid('sr', index)}.dcm"
            _text_report(self.uid("sr", index), self.folder / name)
            self.result.stray_files.append(name)
            self.result.planted["non_image"] = 1
            return []
        if self.site.voi == "lut":
            patient = self._patient(self._patient_count + 1, [0])
            ds = self._dataset(patient, 0, index, images[0])
            name = f"{ds.Modality}.{ds.SOPInstanceUID}.dcm"
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            (self.folder / name).write_bytes(buffer.getvalue()[: -len(ds.PixelData) // 2])
            self.result.stray_files.append(name)
            self.result.planted["truncated"] = 1
            return [self._label_row(ds, "pneumonia")]
        return []

    def _with_bad_rows(self, rows: list[dict]) -> list[dict]:
        """Plant the defects a hospital export has: unknown ids, empty findings, free text, missing rows."""
        rows = [dict(r) for r in rows]
        images = [r for r in rows if not r["path"].startswith("SR.") and r["path"] not in self.result.stray_files]
        for i in range(2):
            unknown = (
                self.site.accession_format.format(99_000_000 + i)
                if self.site.label_key != "sop_instance_uid"
                else str(self.uid("unknown", i))
            )
            rows.append({"key": unknown, "finding": "pneumonia", "path": ""})
        self.result.planted["unknown_id"] = 2
        if len(images) >= 4:
            images[0]["finding"] = ""
            self.result.planted["empty_finding"] = 1
            if self.site.voi == "lut":
                rows.remove(images[1])
                self.result.planted["no_label_row"] = 1
            if self.site.voi == "none":
                images[1]["finding"] = "see report"
                self.result.planted["unknown_finding"] = 1
        order = self.rng.permutation(len(rows))
        return [rows[i] for i in order]

    def _write_labels(self, rows: list[dict]) -> None:
        with open(self.folder / "labels.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.site.label_header)
            writer.writerows((r["key"], r["finding"]) for r in rows)
        self.result.label_rows = len(rows)


def _scramble(number: int, modulus: int, offset: int) -> int:
    """Unique, unordered-looking ids: multiplying by a prime coprime to `modulus` is a bijection."""
    return (number * 7919 + offset) % modulus


def _resample(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W] -> float32 [size, size] in [0, 1], bilinear (a detector with another matrix)."""
    resized = Image.fromarray(image.astype(np.float32) / 255.0, mode="F").resize((size, size), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32).copy()


def _ds_number(value: float) -> str:
    return f"{value:.6g}"  # DS holds at most 16 characters


def _set_dates(ds: Dataset, when: dt.datetime) -> None:
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time


def _file_meta(ds: Dataset, transfer_syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if transfer_syntax.is_compressed else transfer_syntax
    return meta


def _text_report(uid: UID, path: Path) -> None:
    """A Basic Text SR (a radiology report) that lands in the image export by mistake."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = BASIC_TEXT_SR, uid, "SR"
    ds.StudyInstanceUID = ds.SeriesInstanceUID = uid
    ds.PatientName, ds.PatientID = "Report^Stray", "SM0000000"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "18748-4", "LN", "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = [concept]
    ds.file_meta = _file_meta(ds, ExplicitVRLittleEndian)
    ds.save_as(path, enforce_file_format=True)


def summary_table(results: list[SiteResult]) -> str:
    lines = [f"{'site':<12}{'images':>8}{'patients':>10}{'label rows':>12}  planted defects"]
    for r in results:
        planted = ", ".join(f"{k}={v}" for k, v in sorted(r.planted.items()))
        lines.append(f"{r.site:<12}{r.images:>8}{r.patients:>10}{r.label_rows:>12}  {planted}")
    return "\n".join(lines)
