"""Patient-level splits stratified by site and label."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest

from medtriage.data.splits import assign_splits
from medtriage.errors import ConfigError


def synthetic_rows(seed: int = 0, sites=("a", "b", "c"), patients_per_site: int = 120) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for site in sites:
        for patient in range(patients_per_site):
            label = int(rng.random() < 0.7)
            for _ in range(int(rng.integers(1, 5))):
                rows.append({"site": site, "patient_id": f"P{patient:04d}", "label": label if rng.random() < 0.8 else 0})
    return rows


def patient_splits(rows, splits) -> dict:
    seen = defaultdict(set)
    for row, split in zip(rows, splits):
        seen[(row["site"], row["patient_id"])].add(split)
    return seen


def test_no_patient_in_two_splits():
    rows = synthetic_rows()
    splits = assign_splits(rows, 0.15, 0.2, seed=0)
    assert len(splits) == len(rows)
    assert all(len(s) == 1 for s in patient_splits(rows, splits).values())


def test_each_site_and_label_gets_its_share_of_patients():
    rows = synthetic_rows()
    splits = assign_splits(rows, 0.15, 0.2, seed=0)
    patient_label = defaultdict(int)
    for row in rows:
        key = (row["site"], row["patient_id"])
        patient_label[key] = max(patient_label[key], row["label"])
    strata = defaultdict(Counter)
    for key, split in patient_splits(rows, splits).items():
        strata[(key[0], patient_label[key])][split.pop()] += 1
    for counts in strata.values():
        total = sum(counts.values())
        assert abs(counts["test"] - 0.2 * total) <= 1
        assert abs(counts["val"] - 0.15 * total) <= 1


def test_deterministic_and_seed_dependent():
    rows = synthetic_rows()
    assert assign_splits(rows, 0.15, 0.2, seed=4) == assign_splits(rows, 0.15, 0.2, seed=4)
    assert assign_splits(rows, 0.15, 0.2, seed=4) != assign_splits(rows, 0.15, 0.2, seed=5)


def test_patient_ids_are_local_to_a_site():
    rows = [{"site": site, "patient_id": "P1", "label": 1} for site in ("a", "b")] * 2
    splits = assign_splits(rows, 0.0, 0.5, seed=0)
    # two patients (a/P1, b/P1), each alone in its stratum: each stays whole
    assert splits[0] == splits[2] and splits[1] == splits[3]


def test_adding_a_site_leaves_other_sites_alone():
    rows = synthetic_rows(sites=("a", "b"))
    more = rows + synthetic_rows(seed=1, sites=("z",))
    assert assign_splits(more, 0.15, 0.2, seed=0)[: len(rows)] == assign_splits(rows, 0.15, 0.2, seed=0)


@pytest.mark.parametrize("val, test", [(0.5, 0.5), (-0.1, 0.2), (0.2, 1.0)])
def test_fractions_that_leave_no_training_data_are_refused(val, test):
    with pytest.raises(ConfigError, match="leave nothing to train on"):
        assign_splits(synthetic_rows(), val, test, seed=0)
