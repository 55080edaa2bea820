"""What export writes so a package can guard itself: its declared scope (from the training pool's
headers), its drift references (from validation), and a calibration kept only where it helps."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from medtriage.evaluation.calibration import expected_calibration_error, fit_temperature, probabilities
from medtriage.evaluation.metrics import EvaluationInputError
from medtriage.format.references import drift_block

log = logging.getLogger(__name__)
SPACING_MARGIN = 2.0  # a detector up to 2x finer or coarser than the training sites' is still in scope
BT601_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
CALIBRATION_FOLDS = 5
BOOTSTRAP_RESAMPLES = 1000


# --- scope ---------------------------------------------------------------------------------------


PROJECTION_RADIOGRAPHY = ("CR", "DX")  # one chest film, read from a cassette (CR) or a flat-panel detector (DX)


def scope_from_rows(rows, declared_modality: str) -> dict:
    """`model.json` → `scope` from training manifest rows with header facts (data/pool.py). A pool without them (an
    npz) gives only the modality the export config declares: a CT slice must not be scored by a chest X-ray model
    just because its training images came without headers."""
    if "modality" not in rows.columns or rows["modality"].isna().all():
        return declared_scope(declared_modality)

    def values(column: str) -> list[str]:
        found = rows[column].dropna().astype(str).str.strip().str.upper() if column in rows else []
        return sorted({v for v in found if v})

    spacing = [float(v) for text in rows.get("pixel_spacing_mm", []) if isinstance(text, str) and text for v in text.split("\\")]
    bits = rows["bits_stored"].astype(int)
    return {
        "modalities": values("modality"),
        "sop_classes": sorted({str(v).strip() for v in rows["sop_class_uid"].dropna()}),
        "photometric": values("photometric"),
        "channels": sorted({int(v) for v in rows["channels"]}),
        "body_parts": values("body_part") or None,
        "view_positions": values("view_position") or None,
        "bits_stored": [int(bits.min()), int(bits.max())],
        "min_rows": int(rows["rows"].min()),
        "min_columns": int(rows["columns"].min()),
        "pixel_spacing_mm": [round(min(spacing) / SPACING_MARGIN, 6), round(max(spacing) * SPACING_MARGIN, 6)] if spacing else None,
        "source": f"training split of the pool ({len(rows)} images); pixel spacing widened {SPACING_MARGIN:g}x each way",
    }


def declared_scope(modality: str) -> dict:
    """Only the declared modality is checked; CR and DX stand for each other (the same projection radiograph)."""
    modality = modality.strip().upper()
    return {
        "modalities": list(PROJECTION_RADIOGRAPHY) if modality in PROJECTION_RADIOGRAPHY else [modality],
        "source": f"declared by export.modality ({modality}): the training pool records no DICOM headers",
    }


# --- drift references ----------------------------------------------------------------------------


def input_means(images: Sequence[np.ndarray], channels: int) -> np.ndarray:
    """Mean decoded intensity per image in model channels: what serving computes for each scored image."""
    means = []
    for image in images:
        image = np.asarray(image, dtype=np.float32)
        if image.shape[0] == 3 and channels == 1:  # RGB -> luminance, as serving's to_model_channels
            image = np.einsum("chw,c->hw", image, BT601_LUMA)
        means.append(float(image.mean()))
    return np.array(means)


def drift_references(
    val_images: Sequence[np.ndarray], channels: int, probability: np.ndarray, sites: np.ndarray, ood_scores: np.ndarray | None
) -> dict:
    """`model.json` → `drift` from validation. The probability is binned in float32, as the graph serves it: values that
    float32 rounds alike (every p > 1 - 3e-8 serves as 1.0) must fall in one bin, or an unshifted source drifts."""
    features = {"input_mean": input_means(val_images, channels), "probability": np.asarray(probability, dtype=np.float32)}
    if ood_scores is not None:
        features["ood_score"] = np.asarray(ood_scores)
    return drift_block(features, sites)


# --- calibration ---------------------------------------------------------------------------------


def choose_calibration(
    logits: np.ndarray,
    labels: np.ndarray,
    bins: int,
    allowed: bool = True,
    folds: int = CALIBRATION_FOLDS,
    seed: int = 0,
    split: str = "val",
) -> dict:
    """Temperature scaling or none, whichever has the lower cross-validated ECE on the held-out scores (`split`: the
    validation split, or out-of-fold predictions): in each fold a temperature is fitted on the other folds and judged
    on this one, so the choice rests on data the temperature never saw; temperature is kept only when it lowers ECE by
    more than one standard error of the paired fold differences. The kept temperature is then fitted on all of them."""
    labels = np.asarray(labels).astype(int)
    before = expected_calibration_error(probabilities(logits), labels, bins)
    fold_of = stratified_folds(labels, folds, seed)
    cv = {"none": [], "temperature": []}
    for k in range(folds):
        held, rest = fold_of == k, fold_of != k
        t = fit_temperature(logits[rest], labels[rest], where=f"{split} scores outside calibration fold {k}")
        cv["none"].append(expected_calibration_error(probabilities(logits[held]), labels[held], bins))
        cv["temperature"].append(expected_calibration_error(probabilities(logits[held], t), labels[held], bins))
    cv_mean = {name: float(np.mean(v)) for name, v in cv.items()}
    gain = np.array(cv["none"]) - np.array(cv["temperature"])  # paired per fold
    helps = gain.mean() > max(0.0, gain.std(ddof=1) / np.sqrt(folds))  # by more than its own fold-to-fold noise
    method = "temperature" if allowed and helps else "none"
    temperature = fit_temperature(logits, labels) if method == "temperature" else 1.0
    log.info("calibration: cross-validated ECE none %.4f, temperature %.4f -> %s", cv_mean["none"], cv_mean["temperature"], method)
    return {
        "method": method,
        "temperature": float(temperature),
        "split": split,
        "bins": bins,
        "ece_before": before,
        "ece_after": expected_calibration_error(probabilities(logits, temperature), labels, bins),
        "selection": {
            "rule": f"temperature when it lowers the mean ECE of {folds}-fold cross-validation on the {split} scores "
            "by more than one standard error of the paired fold differences"
            + ("" if allowed else " (temperature disabled by export.calibrate=false)"),
            "cv_ece": cv_mean,
            "cv_gain_se": float(gain.std(ddof=1) / np.sqrt(folds)),
            "folds": folds,
        },
    }


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's fold, each class dealt round-robin over the folds after a shuffle: every fold holds images, and a
    class of two images or more is in every fold's complement, so each fold's temperature sees every such class."""
    classes, counts = np.unique(labels, return_counts=True)
    if len(labels) < folds or counts.min() < 2:  # (an empty split stops at the first test)
        per_class = ", ".join(f"class {c}: {n}" for c, n in zip(classes.tolist(), counts.tolist(), strict=True))
        raise EvaluationInputError(
            f"calibration's {folds}-fold cross-validation needs {folds} held-out images or more and 2 or more of each"
            f" class present; there are {len(labels)} ({per_class or 'none'})",
            where="calibration's cross-validation",
            hint="export from a larger held-out split: more labelled images, or a higher data.limit",
        )
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in classes])
    fold_of = np.empty(len(labels), dtype=int)
    fold_of[order] = np.arange(len(labels)) % folds
    return fold_of


def ece_with_interval(
    probs: np.ndarray, labels: np.ndarray, bins: int, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95, seed: int = 0
) -> dict:
    """ECE and its percentile bootstrap interval over resamples of the images."""
    labels = np.asarray(labels).astype(int)
    rng = np.random.default_rng(seed)
    draws = [
        expected_calibration_error(probs[pick], labels[pick], bins)
        for pick in (rng.integers(0, len(labels), len(labels)) for _ in range(resamples))
    ]
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return {
        "ece": expected_calibration_error(probs, labels, bins),
        "ci": [float(low), float(high)],
        "level": level,
        "resamples": resamples,
        "images": int(len(labels)),
    }


def calibration_on_test(test_logits: np.ndarray, test_labels: np.ndarray, temperature: float, bins: int) -> dict:
    """Test ECE of the raw and the served probabilities, each with its bootstrap interval."""
    return {
        "uncalibrated": ece_with_interval(probabilities(test_logits), test_labels, bins),
        "served": ece_with_interval(probabilities(test_logits, temperature), test_labels, bins),
    }
