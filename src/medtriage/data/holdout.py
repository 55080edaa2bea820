"""Leave-one-site-out: one site's images all become test, the other sites keep train/val.

The test rows of the other sites are left out of the run (their count is printed), so the test
figures are those of the unseen site alone. The data fingerprint records which site was held out.
"""

from __future__ import annotations

import dataclasses
import hashlib

from medtriage.data.manifest import Manifest
from medtriage.errors import ConfigError, DataNotFoundError


def hold_out_site(manifest: Manifest, site: str) -> Manifest:
    """A copy of `manifest` whose test split is every row of `site` and nothing else."""
    if site not in manifest.sites:
        raise ConfigError(f"unknown site '{site}' to hold out", where="data.holdout_site", hint=f"choose one of {manifest.sites}")
    rows = manifest.rows.copy()
    held = rows["site"] == site
    left_out = int((~held & (rows["split"] == "test")).sum())
    rows.loc[held, "split"] = "test"
    rows = rows[held | (rows["split"] != "test")]
    if not len(rows[rows["split"] == "train"]):
        raise DataNotFoundError(
            f"no training images left once '{site}' is held out",
            where=manifest.pool_dir,
            hint="leave-one-site-out needs at least two sites",
        )
    print(f"leave-one-site-out: {int(held.sum())} images of {site} -> test; {left_out} test images of other sites left out")
    fingerprint = hashlib.sha256(f"{manifest.fingerprint}|holdout_site={site}".encode()).hexdigest()
    return dataclasses.replace(manifest, rows=rows, fingerprint=fingerprint)
