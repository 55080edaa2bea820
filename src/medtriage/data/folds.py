"""K-fold cross-validation on train + validation, with test left out of the run altogether.

Model selection must not lean on a validation split that saturates (AUC near 1) or that shares
images with train (the official PneumoniaMNIST splits do: `medtriage audit` lists them). So the
train and validation rows are pooled and cut into `folds` stratified folds, and fold `fold`
becomes the validation split of the run. Rows that must not be separated travel together:
the images of one patient, and images the leakage audit finds identical or near-identical
(perceptual hash within `audit.MAX_DISTANCE` bits). The test rows are dropped from the manifest,
so a cross-validation run cannot see, score or log test. Its audit then no longer sees test either, so a pool with
a patient in test and in train or validation is refused here (as it is by the audit of a plain run).

A refit (`all_labelled`) then trains the chosen recipe on every labelled image, with no validation split: what the
folds held out of each model, and what a validation split holds out of a plain run (here a quarter of the scarce
normal images), it learns from. Its calibration comes from the recipe's out-of-fold scores instead.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from medtriage.data.audit import MAX_DISTANCE, LeakageError, cached_images, near_pairs, perceptual_hashes
from medtriage.data.manifest import Manifest
from medtriage.errors import ConfigError


def cross_validation_fold(manifest: Manifest, folds: int, fold: int, seed: int = 0) -> Manifest:
    """A copy of `manifest`: fold `fold` of the pooled train+val rows is `val`, the other folds `train`, no test."""
    if folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {folds}", where="data.cv_folds", hint="use 3 to 10 folds")
    if not 0 <= fold < folds:
        raise ConfigError(f"fold {fold} is not one of 0..{folds - 1}", where="data.cv_fold", hint=f"choose a fold below {folds}")
    _require_test_patients_apart(manifest)
    rows = manifest.rows[manifest.rows["split"] != "test"].copy()
    pooled = dataclasses.replace(manifest, rows=rows, _pixels=None)
    groups = inseparable_groups(pooled)
    labels = rows["label"].to_numpy()
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    held = list(splitter.split(np.zeros(len(rows)), labels, groups))[fold][1]
    split = np.full(len(rows), "train", dtype=object)
    split[held] = "val"
    rows["split"] = split
    fingerprint = hashlib.sha256(f"{manifest.fingerprint}|cv={folds}/{fold}/seed{seed}".encode()).hexdigest()
    print(f"cross-validation fold {fold + 1}/{folds}: {len(rows) - len(held)} train, {len(held)} validation images; test left out")
    return dataclasses.replace(manifest, rows=rows, fingerprint=fingerprint, _pixels=None)


def all_labelled(manifest: Manifest) -> Manifest:
    """A copy of `manifest`: the train and validation rows pooled as `train`, no validation split, no test."""
    _require_test_patients_apart(manifest)
    rows = manifest.rows[manifest.rows["split"] != "test"].copy()
    rows["split"] = "train"
    fingerprint = hashlib.sha256(f"{manifest.fingerprint}|refit".encode()).hexdigest()
    print(f"refit on all {len(rows)} labelled images (train + validation pooled): no validation split; test left out")
    return dataclasses.replace(manifest, rows=rows, fingerprint=fingerprint, _pixels=None)


def _require_test_patients_apart(manifest: Manifest) -> None:
    """A run without test rows is audited without them, so a test patient who also has train or validation images
    would go unseen by its audit while its models are scored on test later: refuse such a pool here."""
    rows = manifest.rows
    keys = rows["site"].astype(str) + "/" + rows["patient_id"].astype(str)
    test = (rows["split"] == "test").to_numpy()
    shared = sorted(set(keys[test]) & set(keys[~test]))
    if shared:
        raise LeakageError(
            f"{len(shared)} patient(s) with images in test and in train or validation, e.g. {shared[0]}",
            where=manifest.pool_dir,
            hint="rebuild the pool so that each patient's images lie in one split (`medtriage audit POOL` lists them)",
        )


def inseparable_groups(manifest: Manifest, max_distance: int = MAX_DISTANCE) -> np.ndarray:
    """One group id per row: rows of one patient, and (near-)duplicate images, share a group (union-find)."""
    rows = manifest.rows.reset_index(drop=True)
    patient_keys = (rows["site"].astype(str) + "/" + rows["patient_id"].astype(str)).to_numpy()
    parent = np.arange(len(rows))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        parent[root(i)] = root(j)

    first_of_patient: dict[str, int] = {}
    for i, key in enumerate(patient_keys):
        join(i, first_of_patient.setdefault(key, i))
    for i, j, _ in near_pairs(perceptual_hashes(cached_images(manifest)), max_distance):
        join(i, j)
    return np.array([root(i) for i in range(len(rows))])
