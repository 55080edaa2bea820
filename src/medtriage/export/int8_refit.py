"""What serving compares an int8 graph's outputs with, refitted on them: the OOD threshold, the drift references of
the probability and the OOD score, and (labelled images only) the review/urgent operating points, each by the rule
the fp32 export used, on the same (validation) images. Each block says under `refit` whether it was refitted, and
if not, why. Torch-free.
"""

from __future__ import annotations

import numpy as np

from medtriage.errors import MedTriageError

Outputs = tuple[np.ndarray, np.ndarray | None]  # probabilities [N, K] and OOD scores [N] (None: no OOD output)
GRAPH_OUTPUT_FEATURES = ("probability", "ood_score")  # drift features read from the graph; input_mean is the pixels'


def refit_on_int8(meta: dict, positive: int, outputs32: Outputs, outputs8: Outputs, labels: np.ndarray | None, split: str) -> dict:
    """`meta` with the OOD threshold, the drift references of the graph's outputs and (with labels) the operating
    points refitted on the int8 graph's outputs (`outputs8`, beside the fp32 graph's on the same images), each by the
    rule the fp32 export used; each block says under `refit` whether it was. A block is refitted only where the images are the split the fp32 value was set on:
    validation (out-of-fold values of a fold ensemble cannot be reproduced from the served ensemble's scores)."""
    (p32, ood32), (p8, ood8) = outputs32, outputs8
    where = {"graph": "int8", "split": split, "images": len(p8)}
    meta = dict(meta)
    if meta.get("ood") and ood8 is not None:
        meta["ood"] = _refit_block(meta["ood"], meta["ood"].get("threshold_split"), split, lambda b: _refit_ood(b, ood8, where))
    if meta.get("drift"):
        outputs = {"probability": (p32[:, positive], p8[:, positive]), "ood_score": (ood32, ood8)}
        meta["drift"] = _refit_block(
            meta["drift"], meta["drift"]["reference"].get("split"), split, lambda b: _refit_drift(b, outputs, where)
        )
    thresholds = meta["thresholds"]
    reason = _operating_points_kept(meta, labels, positive)
    if reason:
        meta["thresholds"] = {**thresholds, "refit": {"graph": "fp32", "reason": f"kept from the fp32 model: {reason}"}}
    else:
        scores, is_positive = p8[:, positive], np.asarray(labels) == positive
        meta["thresholds"] = _refit_block(
            thresholds, meta["calibration"].get("split"), split, lambda b: _refit_operating_points(b, scores, is_positive, where)
        )
    return meta


def _operating_points_kept(meta: dict, labels: np.ndarray | None, positive: int) -> str | None:
    """Why the operating points cannot be chosen again on these images (None: they can)."""
    if labels is None:
        return "the calibration images carry no labels"
    if "pathology" in meta:
        return "they apply to slide scores, not to images"
    if len(np.unique(np.asarray(labels) == positive)) < 2:
        return "the calibration images hold one class only"
    return None


def _refit_block(block: dict, fp32_split: str | None, split: str, refit) -> dict:
    if split == "val" and fp32_split in (None, "val"):
        return refit(block)
    reason = f"kept from the fp32 model: set on its {fp32_split} scores, while the calibration images are the {split} split"
    return {**block, "refit": {"graph": "fp32", "reason": reason}}


def _refit_ood(block: dict, scores: np.ndarray, where: dict) -> dict:
    """The export's rule (flagging_threshold): the validation quantile that flags `false_alarm_rate` of the images."""
    from medtriage.evaluation.operating_points import flagging_threshold

    threshold = flagging_threshold(
        scores,
        block["false_alarm_rate"],
        where="--calibration",
        hint="the int8 graph scores a calibration image so: leave it out of the calibration images, or keep the OOD score's "
        "nodes in float (--exclude)",
    )
    fp32 = {"threshold": block["threshold"], "val_flagged_int8": float(np.mean(scores > block["threshold"]))}
    return {**block, "threshold": threshold, "val_flagged": float(np.mean(scores > threshold)), "refit": {**where, "fp32": fp32}}


def _refit_drift(block: dict, outputs: dict[str, tuple[np.ndarray, np.ndarray | None]], where: dict) -> dict:
    """Each reference histogram of a graph output, pooled and per site, with its edges carried to the int8 graph: an
    edge that had a share q of the images' fp32 values below it moves to the int8 values' q-quantile. The images have no
    sites here, so per-site references can only be carried this way; the shares, and the PSI thresholds (which depend
    on ranks, not values), stay."""
    reference = block["reference"]
    carried = [name for name in GRAPH_OUTPUT_FEATURES if name in block["features"] and outputs[name][1] is not None]

    def moved(histograms: dict) -> dict:
        return {name: _carry(h, *outputs[name]) if name in carried else h for name, h in histograms.items()}

    refit = {
        **where,
        "features": carried,
        "method": "edges moved to the int8 outputs' quantiles at the fp32 outputs' shares below them",
    }
    return {
        **block,
        "reference": {**reference, "all": moved(reference["all"]), "per_site": {s: moved(h) for s, h in reference["per_site"].items()}},
        "refit": refit,
    }


def _carry(histogram: dict, fp32_values: np.ndarray, int8_values: np.ndarray) -> dict:
    edges = np.asarray(histogram["edges"], dtype=np.float64)
    below = np.searchsorted(np.sort(fp32_values.astype(np.float64)), edges, side="left") / len(fp32_values)
    return {**histogram, "edges": [float(e) for e in np.quantile(int8_values.astype(np.float64), below)]}


def _refit_operating_points(block: dict, scores: np.ndarray, is_positive: np.ndarray, where: dict) -> dict:
    """The export's rules and targets (evaluation/operating_points), chosen again on the int8 probabilities."""
    from medtriage.evaluation.operating_points import choose_priority_thresholds

    review, urgent = block["review"], block.get("urgent")
    try:
        refitted = choose_priority_thresholds(
            scores, is_positive, review["rule"], review.get("target"), urgent and urgent["rule"], urgent and urgent.get("target")
        )
    except MedTriageError as err:
        raise _as_quantisation_refusal(err) from None
    fp32 = {k: block[k]["threshold"] for k in ("review", "urgent") if block.get(k)}
    return {**block, **refitted, "refit": {**where, "fp32": fp32}}


def _as_quantisation_refusal(err: MedTriageError) -> MedTriageError:
    """A rule's refusal names the export setting that chose it, which quantising cannot change: the same refusal,
    naming what can (other calibration images, nodes kept float, or an fp32 package exported with another setting)."""
    if not (err.where or "").startswith("export."):
        return err
    return type(err)(
        f"refitting the operating points on the int8 graph: {err.reason}",
        where="--calibration",
        hint="the int8 graph scores the calibration images so: keep the nodes that move its scores in float (--exclude) or "
        f"calibrate on other validation images (--calibration); or export the fp32 package again with another {err.where} "
        "and quantise that",
    )
