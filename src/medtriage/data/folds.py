"""K-fold cross-validation on train + validation, with test left out of the run altogether.

Model selection must not lean on a validation split that saturates (AUC near 1) or that shares
images with train (the official PneumoniaMNIST splits do: `medtriage audit` lists them). So the
train and validation rows are pooled and cut into `folds` stratified folds, and fold `fold`
becomes the validation split of the run. Rows that must not be separated travel together:
the images of one patient (or one DICOM study), and images the leakage audit finds identical or near-identical
(perceptual hash within `audit.MAX_DISTANCE` bits). The test rows are dropped from the manifest,
so a cross-validation run cannot see, score or log test. Its audit then no longer sees test either, so a pool with
a patient in test and in train or validation is refused here (as it is by the audit of a plain run), and so is one with
a test image identical or near-identical to a train or validation image, unless `allow_duplicates` (the run's
`data.allow_audit_failure`) lets such known duplicates through, as it does for a plain run. A constant (blank) image
joins no other (`audit.duplicate_pairs`).

A refit (`all_labelled`) then trains the chosen recipe on every labelled image, with no validation split: what the
folds held out of each model, and what a validation split holds out of a plain run (here a quarter of the scarce
normal images), it learns from. Its calibration comes from the recipe's out-of-fold scores instead.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from medtriage.data.audit import MAX_DISTANCE, NEGATIVE_LABEL, LeakageError, duplicate_pairs, patient_keys, study_keys
from medtriage.data.manifest import Manifest
from medtriage.errors import ConfigError, DataNotFoundError


def cross_validation_fold(manifest: Manifest, folds: int, fold: int, seed: int = 0, *, allow_duplicates: bool = False) -> Manifest:
    """A copy of `manifest`: fold `fold` of the pooled train+val rows is `val`, the other folds `train`, no test.
    `allow_duplicates`: test images duplicated in train or validation are let through (`data.allow_audit_failure`)."""
    if folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {folds}", where="data.cv_folds", hint="use 3 to 10 folds")
    if not 0 <= fold < folds:
        raise ConfigError(f"fold {fold} is not one of 0..{folds - 1}", where="data.cv_fold", hint=f"choose a fold below {folds}")
    if not 0 <= seed < 2**32:  # what the fold shuffle accepts; its own error names no setting
        raise ConfigError(f"cross-validation seed {seed} is out of range", where="data.cv_seed", hint="use a seed from 0 to 2**32 - 1")
    _require_test_patients_apart(manifest)
    pairs = duplicate_pairs(manifest)
    _require_test_images_apart(manifest, pairs, allow_duplicates)
    labelled = (manifest.rows["split"] != "test").to_numpy()
    rows = manifest.rows[labelled].copy()
    if not len(rows):
        raise DataNotFoundError(
            "no train or validation images to cut into folds",
            where=manifest.pool_dir,
            hint="cross-validation needs a pool with labelled images",
        )
    held = _held_out(rows["label"].to_numpy(), _groups(rows, _among(pairs, labelled)), folds, fold, seed)
    split = np.full(len(rows), "train", dtype=object)
    split[held] = "val"
    rows["split"] = split
    fingerprint = hashlib.sha256(f"{manifest.fingerprint}|cv={folds}/{fold}/seed{seed}".encode()).hexdigest()
    print(f"cross-validation fold {fold + 1}/{folds}: {len(rows) - len(held)} train, {len(held)} validation images; test left out")
    return dataclasses.replace(manifest, rows=rows, fingerprint=fingerprint, _pixels=None)


def _held_out(labels: np.ndarray, groups: np.ndarray, folds: int, fold: int, seed: int) -> np.ndarray:
    """Row positions of fold `fold`; a pool too small to give that fold any image is refused, not run unvalidated."""
    n_groups = len(np.unique(groups))
    if n_groups < folds:
        raise ConfigError(
            f"{folds} folds asked of {n_groups} group(s) of inseparable images (a patient's images, and duplicates, stay together)",
            where="data.cv_folds",
            hint=f"use at most {n_groups} folds, or a pool with more patients",
        )
    splitter = StratifiedGroupKFold(n_splits=folds)  # its own shuffle: see `_shuffled`
    try:
        held = list(splitter.split(np.zeros(len(labels)), labels, _shuffled(groups, seed)))[fold][1]
    except ValueError as err:  # every class smaller than the number of folds
        raise ConfigError(f"cannot stratify into {folds} folds: {err}", where="data.cv_folds", hint="use fewer folds") from err
    if not len(held):
        raise ConfigError(
            f"fold {fold} of {folds} holds no validation images: stratifying {n_groups} groups of inseparable images left it empty",
            where="data.cv_folds",
            hint="use fewer folds, or another data.cv_seed",
        )
    _require_both_classes(labels, held, folds, fold)
    return held


def _shuffled(groups: np.ndarray, seed: int) -> np.ndarray:
    """The groups renumbered in a seeded random order, which an unshuffled `StratifiedGroupKFold` takes as the order to
    place groups of equal class spread in. scikit-learn before 1.8 shuffled each group's class counts apart from the
    group itself (scikit-learn#32478): folds of groups cut at random, not stratified, and not the cut a later version
    makes of the same seed. This is that later shuffle (the same permutation), on every version."""
    _, rank = np.unique(groups, return_inverse=True)
    order = np.random.RandomState(seed).permutation(rank.max() + 1)  # a legacy generator: its stream never changes
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    return position[rank]


def _require_both_classes(labels: np.ndarray, held: np.ndarray, folds: int, fold: int) -> None:
    """Stratification counts images, but groups move whole: a class held by few patients can leave a fold's validation
    images without it (its AUC undefined, its epoch chosen on nothing) or its training images without it (a model
    that never saw that class). The audit only warns of a missing negative class per site, so it is refused here."""
    positive = labels != NEGATIVE_LABEL
    if positive.all() or not positive.any():
        return  # a pool of one class: no fold can be asked for the other
    in_fold = np.zeros(len(labels), dtype=bool)
    in_fold[held] = True
    for side, members in (("validation", in_fold), ("training", ~in_fold)):
        for kind, wanted in (("negative", ~positive), ("positive", positive)):
            if not (members & wanted).any():
                raise ConfigError(
                    f"fold {fold} of {folds} has no {side} images of the {kind} class: its {int(wanted.sum())} {kind} "
                    "image(s) belong to too few patients (a patient's images, and duplicates, stay in one fold)",
                    where="data.cv_folds",
                    hint=f"use fewer folds, another data.cv_seed, or a pool with more {kind} patients",
                )


def all_labelled(manifest: Manifest, *, allow_duplicates: bool = False) -> Manifest:
    """A copy of `manifest`: the train and validation rows pooled as `train`, no validation split, no test.
    `allow_duplicates` as for `cross_validation_fold`."""
    _require_test_patients_apart(manifest)
    _require_test_images_apart(manifest, duplicate_pairs(manifest), allow_duplicates)
    rows = manifest.rows[manifest.rows["split"] != "test"].copy()
    if not len(rows):
        raise DataNotFoundError(
            "no train or validation images to refit on", where=manifest.pool_dir, hint="a refit needs a pool with labelled images"
        )
    rows["split"] = "train"
    fingerprint = hashlib.sha256(f"{manifest.fingerprint}|refit".encode()).hexdigest()
    print(f"refit on all {len(rows)} labelled images (train + validation pooled): no validation split; test left out")
    return dataclasses.replace(manifest, rows=rows, fingerprint=fingerprint, _pixels=None)


def _require_test_patients_apart(manifest: Manifest) -> None:
    """A run without test rows is audited without them, so a test patient who also has train or validation images
    would go unseen by its audit while its models are scored on test later: refuse such a pool here. A DICOM study
    counts as one patient whatever its patient IDs (the audit's `study_in_two_splits`)."""
    rows = manifest.rows.reset_index(drop=True)
    is_test = rows["split"] == "test"
    for what, keys in (("patient(s)", patient_keys(rows)), ("DICOM study(ies)", study_keys(rows).dropna())):
        in_test = is_test[keys.index]
        shared = sorted(set(keys[in_test]) & set(keys[~in_test]))
        if shared:
            example = "/".join(shared[0]) if isinstance(shared[0], tuple) else shared[0]
            raise LeakageError(
                f"{len(shared)} {what} with images in test and in train or validation, e.g. {example}",
                where=manifest.pool_dir,
                hint="rebuild the pool so that each patient's images lie in one split (`medtriage audit POOL` lists them)",
            )


def _require_test_images_apart(manifest: Manifest, pairs: list[tuple[int, int, int]], allow_duplicates: bool) -> None:
    """As `_require_test_patients_apart`, for `pairs` of (near-)identical images (`audit.duplicate_pairs`): the audit
    of a plain run refuses them unless overridden, and so does this."""
    split = manifest.rows["split"].to_numpy()
    across = [(i, j, d) for i, j, d in pairs if (split[i] == "test") != (split[j] == "test")]
    if not across:
        return
    paths = manifest.rows["path"].astype(str).to_numpy()
    i, j, distance = across[0]
    said = (
        f"{len(across)} pair(s) of identical or near-identical images in test and in train or validation, "
        f"e.g. {paths[i]} and {paths[j]} (perceptual hash {distance} bit(s) apart)"
    )
    if allow_duplicates:
        print(f"{said}: let through by data.allow_audit_failure")
        return
    raise LeakageError(
        said,
        where=manifest.pool_dir,
        hint="rebuild the pool without them (`medtriage audit POOL` lists them), "
        "or override explicitly (data.allow_audit_failure=true) and say why",
    )


def _among(pairs: list[tuple[int, int, int]], kept: np.ndarray) -> list[tuple[int, int, int]]:
    """The `pairs` of row positions whose rows are both `kept`, as positions among the kept rows."""
    position = np.cumsum(kept) - 1
    return [(int(position[i]), int(position[j]), d) for i, j, d in pairs if kept[i] and kept[j]]


def inseparable_groups(manifest: Manifest, max_distance: int = MAX_DISTANCE) -> np.ndarray:
    """One group id per row: rows of one patient or one DICOM study, and (near-)duplicate images, share a group
    (union-find)."""
    return _groups(manifest.rows, duplicate_pairs(manifest, max_distance))


def _groups(rows, pairs: list[tuple[int, int, int]]) -> np.ndarray:
    """`inseparable_groups` of `rows`, given their `duplicate_pairs`."""
    rows = rows.reset_index(drop=True)
    parent = np.arange(len(rows))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        parent[root(i)] = root(j)

    # a DICOM study is one patient, whatever its patient ID was written as
    for keys in (patient_keys(rows), study_keys(rows).dropna()):
        first_row: dict = {}
        for i, key in keys.items():
            join(i, first_row.setdefault(key, i))
    for i, j, _ in pairs:
        join(i, j)
    return np.array([root(i) for i in range(len(rows))])
