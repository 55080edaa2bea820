"""Reference distributions in `model.json` (`drift.reference`) and the population-stability index.

Export summarises what the model saw on validation as a histogram per feature (edges at the
reference's deciles, and the share of images in each bin); serving bins a rolling window of live
values with the same edges and compares the shares:
PSI = sum_i (live_i - ref_i) * ln(live_i / ref_i). By convention PSI < 0.1 is stable and
PSI > 0.25 a marked shift. numpy only: export writes these, serve reads them.
"""

from __future__ import annotations

import numpy as np

from medtriage.errors import InputError

DEFAULT_BINS = 10
SHARE_FLOOR = 1e-3  # an empty bin counts as this share, so one new value cannot make PSI infinite
REFERENCE_FIELD = "drift.reference"


class ReferenceDataError(InputError, ValueError):
    """Values no reference distribution can be built from (still a ValueError, as it was raised before)."""


def reference_histogram(values, bins: int = DEFAULT_BINS, where: str = REFERENCE_FIELD) -> dict:
    """`{"edges", "proportions"}` of `values`: interior edges at its quantiles (ties merged). NaN and infinite values
    are left out; with none left it is refused, naming `where`, the model.json field the histogram is for."""
    values = np.asarray(values, dtype=np.float64).ravel()
    given, values = values.size, values[np.isfinite(values)]
    if values.size == 0:
        raise ReferenceDataError(
            f"no finite values to build a reference distribution from ({given} given, every one NaN or infinite)"
            if given
            else "no values to build a reference distribution from",
            where=where,
            hint="images that decode to NaN, or a diverged model, give such values: check the validation images and the "
            "run the feature was computed from",
        )
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    return {"edges": [float(e) for e in edges], "proportions": [float(p) for p in shares(edges, values)]}


def shares(edges, values) -> np.ndarray:
    """Share of `values` in each of the len(edges) + 1 bins (left-closed, like the reference)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    counts = np.bincount(np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right"), minlength=len(edges) + 1)
    return counts / max(len(values), 1)


def psi(reference: dict, values) -> float:
    """Population-stability index of `values` against a reference histogram."""
    expected = np.clip(np.asarray(reference["proportions"], dtype=np.float64), SHARE_FLOOR, None)
    actual = np.clip(shares(reference["edges"], values), SHARE_FLOOR, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def null_psi_quantile(
    values,
    window: int,
    bins: int = DEFAULT_BINS,
    quantile: float = 0.99,
    draws: int = 400,
    seed: int = 0,
    whole: bool = False,
    where: str = REFERENCE_FIELD,
) -> float:
    """How high PSI gets by chance alone: the `quantile` of PSI between a reference built from a random half
    of `values` and a `window` of images drawn from the other half (so the reference's own sampling noise
    counts too), over `draws` random splits. A threshold at it has about 1 - quantile false alarms per check.
    `whole`: the reference is built from all of `values` (as a site's is), so each draw resamples a reference of
    that size and a window, both with replacement (halving a few dozen images would overstate the noise). `where`: the
    model.json field the threshold is for, which a refusal of a drawn reference names."""
    values = np.asarray(values, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(draws):
        if whole:
            built_from, drawn_from = rng.choice(values, len(values), replace=True), values
        else:
            order = rng.permutation(len(values))
            built_from, drawn_from = values[order[: len(values) // 2]], values[order[len(values) // 2 :]]
        samples.append(psi(reference_histogram(built_from, bins, where), rng.choice(drawn_from, window, replace=True)))
    return float(np.quantile(samples, quantile))


DRIFT_WINDOW, DRIFT_MIN_IMAGES = 200, 100  # images per source window; fewer than min_images never alert
CONVENTIONAL_PSI = 0.25  # "marked shift": the threshold never goes below it
FALSE_ALARM_QUANTILE = 0.99  # of PSI on windows drawn from the reference itself


def drift_block(
    features: dict[str, np.ndarray], sites, window: int = DRIFT_WINDOW, min_images: int = DRIFT_MIN_IMAGES, bins: int = DEFAULT_BINS
) -> dict:
    """`model.json` → `drift`: reference histograms per feature, pooled and per site, and a PSI threshold
    that unshifted windows of `min_images` pass by chance in about 1% of checks per feature (null_psi_quantile)."""
    sites = np.asarray(sites).astype(str)
    features = {name: np.asarray(values, dtype=np.float64).ravel() for name, values in features.items()}
    pooled = {name: reference_histogram(values, bins, f"{REFERENCE_FIELD}.all.{name}") for name, values in features.items()}
    per_site = {}
    for site in np.unique(sites):
        mask = sites == site
        if mask.sum() >= bins * 5:  # too few images make a histogram of noise: such a site uses the pooled one
            per_site[str(site)] = {
                name: reference_histogram(values[mask], bins, f"{REFERENCE_FIELD}.per_site.{site}.{name}")
                for name, values in features.items()
            }
    # A site's reference rests on fewer images than the pooled one, so chance moves its PSI further: its own threshold.
    site_thresholds = {
        site: _threshold(
            [values[sites == site] for values in features.values()], min_images, bins, f"drift.site_psi_thresholds.{site}", whole=True
        )
        for site in per_site
    }
    return {
        "features": sorted(features),
        "window": window,
        "min_images": min_images,
        "bins": bins,
        "psi_threshold": _threshold(features.values(), min_images, bins, "drift.psi_threshold"),
        "site_psi_thresholds": site_thresholds,
        "threshold_rule": f"max(0.25, {FALSE_ALARM_QUANTILE:.0%} quantile over features of PSI between half of validation "
        f"and {min_images}-image windows from the other half); a site's: of PSI between resamples of its validation images "
        f"as large as its reference and {min_images}-image windows from them",
        "reference": {"split": "val", "images": _image_counts(sites, per_site), "all": pooled, "per_site": per_site},
    }


def _image_counts(sites: np.ndarray, per_site: dict) -> dict[str, int]:
    """How many images the pooled reference and each site's own rest on (a site with too few has none of its own)."""
    return {"all": int(len(sites)), **{site: int((sites == site).sum()) for site in per_site}}


def _threshold(feature_values, min_images: int, bins: int, where: str, whole: bool = False) -> float:
    chance = max(null_psi_quantile(values, min_images, bins, FALSE_ALARM_QUANTILE, whole=whole, where=where) for values in feature_values)
    return round(max(CONVENTIONAL_PSI, chance), 4)
