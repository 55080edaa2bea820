"""Leakage audit of a pooled manifest, run before training (and by `medtriage audit POOL`).

Checks, each a finding with a severity (`error` fails the audit, `warning` does not):
- `patient_in_two_splits`       the same (site, pseudonymous patient) in more than one split
- `study_in_two_splits`         one DICOM study (Study Instance UID) under two patient IDs in more than one split:
                                a UID is unique worldwide, so this is one patient whose ID was written two ways
- `same_image_in_two_splits`    identical decoded pixels (manifest fingerprint) in two splits
- `near_duplicate_in_two_splits`  a perceptual-hash match across splits, at one site or across sites
- `same_image_at_two_sites`     an exact or near duplicate shared by two sites in one split (warning)
- `site_without_positives`      a split in which a site has images but no positive label, so its
                                per-site sensitivity and AUC are undefined
- `site_without_negatives`      a split in which a site has images but no negative (label 0) one, so its
                                per-site specificity and AUC are undefined (warning: a patient with any positive
                                image is a positive patient, so in pneumonia pools negative patients are the scarce
                                stratum and a small site's val or test often has none; the run's pooled figures stand)
- `site_in_one_split`           a site whose images all lie in one split other than test (warning): splits are
                                cut by patient, so a site of a single patient (or too few per stratum) stays whole
                                in one split (train, at the default fractions) and is missing from the others: never
                                validated or tested. Not reported for a site all in test (the held-out site of
                                leave-one-site-out) nor for a pool of one split (a refit)

A failed audit stops training (`require_clean`) unless `data.allow_audit_failure` overrides it, for known duplicate
images; no override lets a patient in two splits through, whether by its patient ID or by a DICOM study.

A constant image (every pixel alike: a blank export) is no one's image: every one hashes alike, whatever its value,
so it is paired with no other image, here and in the fold grouping (`duplicate_pairs`).

Perceptual hash: 32x32 bilinear thumbnail -> 2D DCT -> the 12x12 lowest frequencies (DC dropped)
thresholded at their median = 143 bits. Measured on the 4,999 distinct PneumoniaMNIST images: no two
distinct images within 12 bits, while the same image resampled to 64-128 px with noise stays within
12 bits in 99% of cases; `MAX_DISTANCE` = 12. numpy and pillow only; pandas arrives with the manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medtriage.data.pool_folder import PIXELS_FILE
from medtriage.data.splits import DICOM_UID, patient_identity
from medtriage.errors import InputError, MedTriageError

HASH_SIDE, THUMBNAIL, MAX_DISTANCE = 12, 32, 12
HASH_BITS = HASH_SIDE * HASH_SIDE - 1  # a perceptual hash's bits: its DC term is dropped
NEGATIVE_LABEL = 0  # label index 0 is the normal/negative class; any other label counts as positive
MAX_EXAMPLES = 20  # examples kept per finding, so a report stays readable
# findings no override lets through: every split is cut by patient (a DICOM study being one patient), so a patient in
# two splits is never a known, accepted state of a pool, and every figure of a run on it would be measured on patients
# it trained on. A study at two sites reaches two splits when one of them is held out (`holdout.hold_out_site`)
NOT_OVERRIDABLE = ("patient_in_two_splits", "study_in_two_splits")


class LeakageError(MedTriageError):
    """The pool failed the leakage audit; training must not start on it unless explicitly overridden."""


@dataclass
class Finding:
    kind: str
    severity: str  # "error" | "warning"
    count: int
    message: str
    examples: list = field(default_factory=list)


@dataclass
class AuditResult:
    pool: str
    images: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def to_dict(self) -> dict:
        return {"pool": self.pool, "images": self.images, "ok": self.ok, "findings": [asdict(f) for f in self.findings]}

    def summary(self) -> str:
        head = f"leakage audit of {self.pool} ({self.images} images): {'PASSED' if self.ok else 'FAILED'}"
        lines = [f"  [{f.severity}] {f.kind}: {f.message}" for f in self.findings]
        return "\n".join([head, *lines]) if lines else head + ", no findings"

    def markdown(self) -> str:
        """For a model card: one line per finding."""
        lines = [f"Leakage audit: **{'passed' if self.ok else 'FAILED'}** on {self.images} images."]
        lines += [f"- {f.severity}: `{f.kind}` — {f.message}" for f in self.findings]
        return "\n".join(lines)


def audit_manifest(manifest, *, check_images: bool = True, max_distance: int = MAX_DISTANCE) -> AuditResult:
    """Audit a `Manifest` (see `medtriage.data.manifest.load_manifest`)."""
    rows = manifest.rows.reset_index(drop=True)
    result = AuditResult(str(manifest.pool_dir), len(rows))
    result.findings += _patients_in_two_splits(rows)
    result.findings += _studies_in_two_splits(rows)
    result.findings += _sites_without_class(rows, positive=True)
    result.findings += _sites_without_class(rows, positive=False)
    result.findings += _sites_in_one_split(rows)
    if check_images and len(rows):
        images = finite_images(manifest)
        result.findings += _duplicates(rows, image_pairs(images, max_distance), max_distance)
        result.findings += _constant_images(rows, images)
    return result


def require_clean(manifest, *, override: bool = False, **kwargs) -> AuditResult:
    """The training-start gate: raise `LeakageError` on a failed audit unless `override` is set. The override is for
    known duplicate images (the official PneumoniaMNIST splits); a finding in `NOT_OVERRIDABLE` refuses regardless."""
    result = audit_manifest(manifest, **kwargs)
    binding = [f.kind for f in result.findings if f.severity == "error" and f.kind in NOT_OVERRIDABLE]
    if binding:
        raise LeakageError(
            result.summary(),
            where=manifest.pool_dir,
            hint=f"no override (data.allow_audit_failure) lets {', '.join(binding)} through: rebuild the pool so that each "
            "patient's images lie in one split (a study kept at two sites: keep one site's copy, or hold out a site that shares no study)",
        )
    if not result.ok and not override:
        raise LeakageError(
            result.summary(),
            where=manifest.pool_dir,
            hint="fix the splits (or the pool), or override explicitly (data.allow_audit_failure=true) and say why",
        )
    return result


# ---------------------------------------------------------------- checks on the table


def patient_keys(rows):
    """(site, patient) per row of a manifest table, as the splits tell patients apart (`splits.patient_identity`: an
    ID with and without its padding spaces is one patient); tuples, so no site or ID with a "/" can pose as another."""
    return rows["site"].combine(rows["patient_id"], patient_identity)


def _patients_in_two_splits(rows) -> list[Finding]:
    patients = patient_keys(rows)
    splits = rows["split"].groupby(patients).agg(lambda s: sorted(set(s)))
    leaked = splits[splits.map(len) > 1]
    if leaked.empty:
        return []
    examples = [{"site": site, "patient_id": pid, "splits": s} for (site, pid), s in leaked.head(MAX_EXAMPLES).items()]
    return [
        Finding("patient_in_two_splits", "error", len(leaked), f"{len(leaked)} patient(s) have images in more than one split", examples)
    ]


def study_keys(rows):
    """The Study Instance UID of each row, missing (NaN) where it is not a DICOM UID (a pool of npz images or slide
    tiles names its studies itself, and only a DICOM UID is unique beyond its pool)."""
    study = rows["study_uid"].astype(str).str.strip()
    return study.where(study.str.fullmatch(DICOM_UID))


def _studies_in_two_splits(rows) -> list[Finding]:
    """Patients are told apart by their IDs as written: one patient under two spellings of its ID (a case, a leading
    zero, a typo at the site) is two patients to the splits and to `patient_in_two_splits`, but its studies keep
    their UIDs. Studies of a single patient in two splits are that check's to report."""
    studies = study_keys(rows)
    known = studies.notna()
    if not known.any():
        return []
    table = rows[known].assign(study=studies[known], patient=patient_keys(rows)[known])
    spread = table.groupby("study").agg(splits=("split", lambda s: sorted(set(s))), patients=("patient", lambda p: sorted(set(p))))
    leaked = spread[(spread["splits"].map(len) > 1) & (spread["patients"].map(len) > 1)]
    if leaked.empty:
        return []
    examples = [
        {"study_uid": study, "splits": row.splits, "patients": ["/".join(p) for p in row.patients]}
        for study, row in leaked.head(MAX_EXAMPLES).iterrows()
    ]
    message = f"{len(leaked)} study(ies) under more than one patient ID in more than one split: one patient, its ID written two ways"
    return [Finding("study_in_two_splits", "error", len(leaked), message, examples)]


# positive? -> (finding, images missing, figure lost, severity). A missing negative class only warns (module docstring):
# simulated site pools of 40 to 240 images, as the training and leave-one-site-out tests build them, all have one
_CLASS_GAPS = {
    True: ("site_without_positives", "positive", "sensitivity", "error"),
    False: ("site_without_negatives", "negative", "specificity", "warning"),
}


def _sites_without_class(rows, *, positive: bool) -> list[Finding]:
    """`site_without_positives` or `site_without_negatives`: a (split, site) with images but none of one class, so
    the per-site figures that need that class (sensitivity or specificity, and AUC either way) are undefined."""
    is_positive = rows["label"].astype(int) != NEGATIVE_LABEL
    wanted = is_positive if positive else ~is_positive
    counts = wanted.groupby([rows["split"], rows["site"]]).sum()
    missing = [{"split": split, "site": site} for (split, site), n in counts.items() if n == 0]
    if not missing:
        return []
    kind, images, figure, severity = _CLASS_GAPS[positive]
    where = ", ".join(f"{m['site']} in {m['split']}" for m in missing)
    message = f"no {images} images for {where}: per-site {figure}/AUC undefined"
    return [Finding(kind, severity, len(missing), message, missing[:MAX_EXAMPLES])]


def _sites_in_one_split(rows) -> list[Finding]:
    """Sites that never reach validation or test (or training) because all their patients landed in one split.
    Only reported when the pool has more than one split (a refit puts everything in train on purpose) and not for a
    site all in test (the held-out site of leave-one-site-out)."""
    if rows["split"].nunique() < 2:
        return []
    patients = patient_keys(rows)
    confined = []
    for site, group in rows.groupby("site", sort=True):
        splits = set(group["split"])
        if len(splits) == 1 and (split := splits.pop()) != "test":
            confined.append({"site": site, "split": split, "patients": int(patients[group.index].nunique())})
    if not confined:
        return []
    where = ", ".join(f"{c['site']} only in {c['split']} ({c['patients']} patient(s))" for c in confined)
    message = f"site(s) with every image in one split, as splits are cut by patient, so absent from the others: {where}"
    return [Finding("site_in_one_split", "warning", len(confined), message, confined[:MAX_EXAMPLES])]


# ---------------------------------------------------------------- checks on the pixels


def perceptual_hashes(images, side: int = HASH_SIDE) -> np.ndarray:
    """One hash per `[C, H, W]` image (a list, an `[N, C, H, W]` array or a stream such as `Manifest.images`):
    bool `[N, side * side - 1]`."""
    thumbs = [np.asarray(_thumbnail(image)) for image in images]  # one at a time: a stream is never held whole
    thumbs = np.stack(thumbs) if thumbs else np.zeros((0, THUMBNAIL, THUMBNAIL), np.float32)
    dct = _dct_matrix(THUMBNAIL)[:side]
    low = (dct @ thumbs @ dct.T).reshape(len(thumbs), side * side)[:, 1:]  # DC only says how bright
    return low > np.median(low, axis=1, keepdims=True)


def _thumbnail(image) -> Image.Image:
    gray = np.asarray(image, dtype=np.float32).mean(axis=0)
    return Image.fromarray(gray, mode="F").resize((THUMBNAIL, THUMBNAIL), Image.BILINEAR)


def duplicate_pairs(manifest, max_distance: int = MAX_DISTANCE) -> list[tuple[int, int, int]]:
    """`image_pairs` of the rows of `manifest` (row positions)."""
    return image_pairs(finite_images(manifest), max_distance)


def image_pairs(images: list[np.ndarray], max_distance: int = MAX_DISTANCE) -> list[tuple[int, int, int]]:
    """`near_pairs` of `images`, constant images left out: one has no frequencies but rounding noise to hash, so all
    of them match one another, and a blank image names no patient to keep together."""
    varied = [i for i, image in enumerate(images) if not _constant(image)]
    hashes = perceptual_hashes([images[i] for i in varied])
    return [(varied[i], varied[j], distance) for i, j, distance in near_pairs(hashes, max_distance)]


def _constant(image: np.ndarray) -> bool:
    return not image.size or image.min() == image.max()


def _constant_images(rows, images: list[np.ndarray]) -> list[Finding]:
    """Images with every pixel alike: a blank or failed export, which teaches and tests nothing, and which the
    duplicate checks pass over (`image_pairs`)."""
    blank = [i for i, image in enumerate(images) if _constant(image)]
    if not blank:
        return []
    examples = [{"row": i, "site": rows["site"].iat[i], "split": rows["split"].iat[i], "path": rows["path"].iat[i]} for i in blank]
    message = f"{len(blank)} image(s) with every pixel alike (blank): check their source; the duplicate checks pass over them"
    return [Finding("constant_image", "warning", len(blank), message, examples[:MAX_EXAMPLES])]


def finite_images(manifest) -> list[np.ndarray]:
    """`cached_images`, refusing pixels that are not finite: NaN spreads through the thumbnail and the DCT, so every
    damaged image hashes alike and would be reported (and grouped) as one duplicate."""
    images = cached_images(manifest)
    damaged = [i for i, image in enumerate(images) if not np.isfinite(image).all()]
    if damaged:
        paths = manifest.rows["path"].astype(str).to_numpy()
        raise InputError(
            f"{len(damaged)} image(s) with NaN or infinite pixels, e.g. {paths[damaged[0]]}; "
            "their perceptual hashes would all match one another",
            where=Path(manifest.pool_dir) / PIXELS_FILE,
            hint=f"the pool is damaged or its source wrote unchecked pixels; delete {manifest.pool_dir} and build it again",
        )
    return images


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    matrix[0] /= np.sqrt(2)
    return matrix.astype(np.float32)


def near_pairs(hashes: np.ndarray, max_distance: int, block: int = 1024) -> list[tuple[int, int, int]]:
    """(i, j, Hamming distance) for every pair i < j within `max_distance` bits.
    With bits as +-1, Hamming = (bits - a.b) / 2: one matrix product per block instead of N^2 popcounts."""
    signs = np.where(hashes, 1.0, -1.0).astype(np.float32)
    n_bits, pairs = signs.shape[1], []
    for start in range(0, len(signs), block):
        distance = np.rint((n_bits - signs[start : start + block] @ signs.T) / 2).astype(np.int32)
        for a, b in zip(*np.nonzero(distance <= max_distance)):
            if start + int(a) < int(b):
                pairs.append((start + int(a), int(b), int(distance[a, b])))
    return pairs


def cached_images(manifest):
    """Every row's pixels straight from the cache (one memmap, no per-row table lookups), from the pixel file the rows
    were read with: a pool built again since holds other images at the same offsets, and is refused."""
    if not len(manifest.rows):
        return []  # an empty pixel cache cannot be mapped at all
    cache = manifest.pixels()
    shapes = manifest.rows[["channels", "height", "width", "offset"]].astype(int).to_numpy()
    return [np.asarray(cache[o : o + c * h * w]).reshape(c, h, w) for c, h, w, o in shapes]


def _duplicates(rows, pairs: list[tuple[int, int, int]], max_distance: int) -> list[Finding]:
    """Findings of `duplicate_pairs`: `pairs` of row positions in `rows`."""
    fingerprint = rows["fingerprint"].astype(str).to_numpy()
    split, site = rows["split"].astype(str).to_numpy(), rows["site"].astype(str).to_numpy()
    patient = rows["patient_id"].astype(str).to_numpy()
    found: dict[str, list] = {"same_image_in_two_splits": [], "near_duplicate_in_two_splits": [], "same_image_at_two_sites": []}
    for i, j, distance in pairs:
        if split[i] != split[j]:
            kind = "same_image_in_two_splits" if fingerprint[i] == fingerprint[j] else "near_duplicate_in_two_splits"
        elif site[i] != site[j]:
            kind = "same_image_at_two_sites"
        else:
            continue  # the same image twice inside one split and site cannot leak
        found[kind].append(
            {
                "rows": [i, j],
                "sites": [site[i], site[j]],
                "splits": [split[i], split[j]],
                "patients": [patient[i], patient[j]],
                "distance": distance,
            }
        )
    messages = {
        "same_image_in_two_splits": "identical images in two splits",
        "near_duplicate_in_two_splits": f"near-identical images (perceptual hash within {max_distance} bits) in two splits",
        "same_image_at_two_sites": "the same or a near-identical image at two sites (one split)",
    }
    return [
        Finding(
            kind,
            "warning" if kind == "same_image_at_two_sites" else "error",
            len(pairs),
            f"{len(pairs)} pair(s) of {messages[kind]}" + _cross_site_note(pairs),
            pairs[:MAX_EXAMPLES],
        )
        for kind, pairs in found.items()
        if pairs
    ]


def _cross_site_note(pairs: list[dict]) -> str:
    across = sum(1 for p in pairs if p["sites"][0] != p["sites"][1])
    return f", {across} of them across sites" if across else ""
