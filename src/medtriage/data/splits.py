"""Patient-level train/val/test splits, stratified by site and label.

A patient (site + patient id: ids are only unique within a hospital; the id without its padding spaces, see
`patient_identity`) lands in exactly one split, so no test image shares a patient with a training image. A DICOM study
(a Study Instance UID, unique worldwide) is one patient whatever Patient IDs its images carry (one pseudonym per image,
an ID written two ways): the patients it names move together, with all their other studies. Within each stratum (site, patient label)
patients are shuffled with a seed and cut by the requested fractions (each count rounded), so every site and class
is represented in every split in proportion once its stratum is large enough: at the default fractions a stratum of
one or two patients goes to train whole and one of three has none in val, which the leakage audit then reports:
`site_without_positives` (an error) when it is a site's positive stratum, `site_without_negatives` (a warning) when it
is its negative one, and `site_in_one_split` (a warning) when all of a site's strata are that small. The patient
label is the max of its image labels: a patient with any pneumonia image counts as a pneumonia patient.
"""

from __future__ import annotations

import re
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

from medtriage.errors import ConfigError
from medtriage.io.deid import patient_id_text

DICOM_UID = r"[0-9]+(\.[0-9]+)+"  # digits and dots (PS3.5 9.1): what names a study beyond its pool
_DICOM_UID = re.compile(DICOM_UID)


def assign_splits(rows: Iterable[Mapping], val_fraction: float = 0.15, test_fraction: float = 0.2, seed: int = 0) -> list[str]:
    """Split name (`train`, `val` or `test`) for each row (mappings with site, patient_id, label and, optionally,
    study_uid), in order."""
    check_fractions(val_fraction, test_fraction)
    if not seed >= 0:  # numpy's seeding refuses it with no word of which setting
        raise ConfigError(
            f"split seed {seed} is negative", where="data.pool_seed (--seed of the pool builder)", hint="use a seed of 0 or more"
        )
    rows = list(rows)
    units = _units(rows)
    split_of_unit = {}
    for stratum, members in sorted(_strata(_unit_labels(rows, units)).items()):
        split_of_unit.update(_cut(members, val_fraction, test_fraction, _stratum_rng(seed, stratum)))
    return [split_of_unit[unit] for unit in units]


def check_fractions(val_fraction: float, test_fraction: float, where: str = "data.val_fraction / data.test_fraction") -> None:
    """Refuse split fractions that leave no patient to train on; `where` names them as the caller's user sets them."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"split fractions val={val_fraction}, test={test_fraction} leave nothing to train on",
            where=where,
            hint="use fractions in [0, 1) whose sum is below 1, e.g. 0.15 and 0.2",
        )


def patient_identity(site: object, patient_id: object) -> tuple[str, str]:
    """Who a row belongs to, for splits and the leakage audit alike: a DICOM reader keeps the leading spaces a
    site pads a Patient ID with, and one patient must not become two."""
    return str(site), patient_id_text(patient_id)


def _patient_key(row: Mapping) -> tuple[str, str]:
    return patient_identity(row["site"], row["patient_id"])


def study_identity(study_uid: object) -> str | None:
    """The study a row belongs to beyond its patient ID, None unless its name is a DICOM UID (an npz or tile pool
    names its studies itself, and only a DICOM UID is unique beyond its pool)."""
    text = str(study_uid or "").strip()
    return text if _DICOM_UID.fullmatch(text) else None


def _units(rows: list[Mapping]) -> list[tuple[str, str]]:
    """Per row, the unit it moves with: patients who share a DICOM study are one unit (union-find), named by its
    smallest patient key, so that the units do not depend on the order of the rows."""
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def root(key: tuple[str, str]) -> tuple[str, str]:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    first_patient_of_study: dict[str, tuple[str, str]] = {}
    for row in rows:
        key = root(_patient_key(row))
        study = study_identity(row.get("study_uid"))
        if study is not None:
            other = root(first_patient_of_study.setdefault(study, key))
            parent[max(key, other)] = min(key, other)
    return [root(_patient_key(row)) for row in rows]


def _unit_labels(rows: list[Mapping], units: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Unit -> its label (max over its images)."""
    labels: dict[tuple[str, str], int] = {}
    for row, unit in zip(rows, units):
        labels[unit] = max(labels.get(unit, int(row["label"])), int(row["label"]))
    return labels


def _strata(patients: dict[tuple[str, str], int]) -> dict[tuple[str, int], list[tuple[str, str]]]:
    strata: dict[tuple[str, int], list] = defaultdict(list)
    for key, label in patients.items():
        strata[(key[0], label)].append(key)
    return strata


def _stratum_rng(seed: int, stratum: tuple[str, int]) -> np.random.Generator:
    """Independent of the other strata, so adding a site does not reshuffle the others."""
    return np.random.default_rng([seed, zlib.crc32(stratum[0].encode()), stratum[1]])


def _cut(members: list, val_fraction: float, test_fraction: float, rng: np.random.Generator) -> dict:
    members = sorted(members)
    order = rng.permutation(len(members))
    n_test = int(round(test_fraction * len(members)))
    n_val = int(round(val_fraction * len(members)))
    names = ["test"] * n_test + ["val"] * n_val
    names += ["train"] * (len(members) - len(names))
    return {members[i]: name for i, name in zip(order, names)}
