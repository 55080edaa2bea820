"""Leave-one-site-out: one site's images all become test, the other sites keep train/val.

The test rows of the other sites are left out of the run (their count is printed), so the test
figures are those of the unseen site alone. The data fingerprint records which site was held out.
A pool whose other sites keep no training images is refused, and so is one left without validation images when the
run validates: a cross-validation fold (`data.cv_folds`) cuts its validation split from the remaining train and
validation rows, and a refit (`data.refit`) trains on them all, so neither needs one (`validated=False`).
"""

from __future__ import annotations

import dataclasses
import hashlib

from medtriage.data.manifest import Manifest
from medtriage.errors import ConfigError, DataNotFoundError


def hold_out_site(manifest: Manifest, site: str, *, validated: bool = True) -> Manifest:
    """A copy of `manifest` whose test split is every row of `site` and nothing else. `validated`: the run keeps the
    pool's validation split (False for a cross-validation fold or a refit, which pool train and validation)."""
    if site not in manifest.sites:
        raise ConfigError(f"unknown site '{site}' to hold out", where="data.holdout_site", hint=f"choose one of {manifest.sites}")
    rows = manifest.rows.copy()
    held = rows["site"] == site
    left_out = int((~held & (rows["split"] == "test")).sum())
    rows.loc[held, "split"] = "test"
    rows = rows[held | (rows["split"] != "test")]
    _require_split(rows, "train", site, manifest, hint="leave-one-site-out needs at least two sites")
    if validated:  # with no validation images the run would still train and report test figures, unvalidated
        _require_split(
            rows,
            "val",
            site,
            manifest,
            hint="the other sites have no validation patients: give them more patients, or rebuild the pool with a larger "
            "validation fraction (--val-fraction of the pool builder); a cross-validation fold (data.cv_folds) or a "
            "refit (data.refit) needs none",
        )
    print(f"leave-one-site-out: {int(held.sum())} images of {site} -> test; {left_out} test images of other sites left out")
    fingerprint = hashlib.sha256(f"{manifest.fingerprint}|holdout_site={site}".encode()).hexdigest()
    return dataclasses.replace(manifest, rows=rows, fingerprint=fingerprint)


def _require_split(rows, split: str, site: str, manifest: Manifest, *, hint: str) -> None:
    if not (rows["split"] == split).any():
        name = {"train": "training", "val": "validation"}[split]
        raise DataNotFoundError(f"no {name} images left once '{site}' is held out", where=manifest.pool_dir, hint=hint)
