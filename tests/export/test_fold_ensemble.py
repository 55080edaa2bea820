"""Cross-validations served together must hold out the same images in each fold; a refusal names the setting they
differ in (checked on the fold runs' configs and pools, as the fold runs record them)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from medtriage.data.manifest import Manifest
from medtriage.errors import ConfigError


def fold_config(fold: int, site: str | None = None, seed: int = 0, **data) -> dict:
    """A fold run's config, as its checkpoint records it (data.holdout_site: the site left out of it)."""
    settings = {"pool_dir": "/pools/a", "cv_folds": 2, "cv_fold": fold, "cv_seed": 0, "limit": None, "holdout_site": site}
    return {"data": {**settings, **data}, "trainer": {"seed": seed}}


def test_cross_validations_that_held_out_different_sites_are_refused_by_the_sites():
    from medtriage.export.fold_ensemble import _check_one_cut

    cv = [[fold_config(k, site) for k in range(2)] for site in ("site-a", "site-b")]
    with pytest.raises(ConfigError, match=r"not cut alike: they held out different sites \(site-a vs site-b\)") as refused:
        _check_one_cut([Path("cv-a"), Path("cv-b")], cv)
    assert "seed" not in refused.value.reason and "limit" not in refused.value.reason
    assert refused.value.where == "cv-a cv-b"
    assert "data.holdout_site" in refused.value.hint and "data.cv_seed" not in refused.value.hint
    _check_one_cut([Path("cv-a"), Path("cv-b")], [cv[0], cv[0]])  # the same site held out in both: one cut


def test_folds_of_one_folder_that_held_out_different_sites_are_not_one_cross_validation(tmp_path):
    from medtriage.export.fold_ensemble import _check_one_cross_validation

    with pytest.raises(ConfigError, match="folds of one cross-validation"):
        _check_one_cross_validation(tmp_path, [fold_config(0, "site-a"), fold_config(1, "site-b")])


def pool(val_rows: list[int]) -> Manifest:
    """A pool whose `val` split (a fold's held-out images) is `val_rows` of six."""
    split = ["val" if k in val_rows else "train" for k in range(6)]
    rows = pd.DataFrame({"split": split, "site": "site-a", "label": [0, 1] * 3})
    return Manifest(Path("/pools/a"), rows, pd.DataFrame(), ["normal", "pneumonia"], "fingerprint")


def test_folds_cut_alike_from_pools_built_differently_name_the_pool_setting_not_a_limit():
    from medtriage.export.fold_ensemble import FoldMembers, _check_held_out_alike

    configs = [fold_config(0, pool_seed=0, source="sites"), fold_config(0, seed=3, pool_seed=1, source="sites")]
    members = FoldMembers([None, None], configs, [pool([0, 1, 2]), pool([3, 4, 5])], [0, 0])
    with pytest.raises(ConfigError, match=r"different images in fold 0 \(their pool was built with data.pool_seed 0 vs 1\)") as refused:
        _check_held_out_alike(members, [0, 1], 0)
    assert "limit" not in refused.value.reason


def test_folds_whose_limits_were_sampled_with_different_seeds_name_the_seeds():
    from medtriage.export.fold_ensemble import FoldMembers, _check_held_out_alike, _held_out_rows

    configs = [fold_config(0, limit=2), fold_config(0, seed=3, limit=2)]
    members = FoldMembers([None, None], configs, [pool([0, 1, 2, 3, 4, 5])] * 2, [0, 0])
    assert _held_out_rows(configs[0], members.manifests[0]) != _held_out_rows(configs[1], members.manifests[1])
    with pytest.raises(ConfigError, match=r"data.limit sampled with trainer.seed 0 vs 3"):
        _check_held_out_alike(members, [0, 1], 0)
