"""Cross-validations served together must hold out the same images in each fold; a refusal names the setting they
differ in (checked on the fold runs' configs and pools, as the fold runs record them)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medtriage.data.manifest import Manifest
from medtriage.errors import ConfigError
from medtriage.model.networks import PreprocessSpec, build_triage_net


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


def test_folds_cut_alike_from_pools_that_differ_say_so_without_blaming_a_seed_no_limit_sampled_with():
    """Pools built with different settings are refused before any is loaded (`_check_pool_built_alike`): what is left
    to differ is the pools given, not the trainer.seed that samples only a data.limit."""
    from medtriage.export.fold_ensemble import FoldMembers, _check_held_out_alike

    configs = [fold_config(0), fold_config(0, seed=3)]
    members = FoldMembers([None, None], configs, [pool([0, 1, 2]), pool([3, 4, 5])], [0, 0])
    with pytest.raises(ConfigError, match=r"different images in fold 0 \(their pools differ\)") as refused:
        _check_held_out_alike(members, [0, 1], 0)
    assert "limit" not in refused.value.reason and "seed" not in refused.value.reason


def test_folds_of_pools_built_with_another_pool_seed_are_refused_naming_it():
    from medtriage.export.fold_ensemble import _check_pool_built_alike

    configs = [fold_config(0, pool_seed=0, source="sites"), fold_config(0, seed=3, pool_seed=1, source="sites")]
    with pytest.raises(ConfigError, match=r"with different settings \(data.pool_seed 0 vs 1\)") as refused:
        _check_pool_built_alike([Path("cv-a"), Path("cv-b")], configs)
    assert "data.pool_seed" in refused.value.hint and "data.sites_dir" not in refused.value.hint


def test_folds_whose_limits_were_sampled_with_different_seeds_name_the_seeds():
    from medtriage.export.fold_ensemble import FoldMembers, _check_held_out_alike, _held_out_rows

    configs = [fold_config(0, limit=2), fold_config(0, seed=3, limit=2)]
    members = FoldMembers([None, None], configs, [pool([0, 1, 2, 3, 4, 5])] * 2, [0, 0])
    assert _held_out_rows(configs[0], members.manifests[0]) != _held_out_rows(configs[1], members.manifests[1])
    with pytest.raises(ConfigError, match=r"data.limit sampled with trainer.seed 0 vs 3"):
        _check_held_out_alike(members, [0, 1], 0)


def test_every_fold_is_checked_before_the_first_is_scored():
    from medtriage.export.fold_ensemble import FoldMembers, out_of_fold

    configs = [fold_config(0), fold_config(1, limit=2), fold_config(0), fold_config(1, seed=3, limit=2)]
    members = FoldMembers([None] * 4, configs, [pool([0, 1, 2, 3, 4, 5])] * 4, [0, 1, 0, 1])  # no net: none may score
    with pytest.raises(ConfigError, match=r"different images in fold 1 \(data.limit sampled with trainer.seed 0 vs 3\)"):
        out_of_fold(members, "none")


LABELS = ["normal", "pneumonia"]


def write_npz(path: Path, seed: int) -> Path:
    """A MedMNIST-layout npz, twelve 28 px images per split; another seed, other pixels."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(12) % 2)[:, None]
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def untrained_weights():
    return build_triage_net("resnet10", len(LABELS), PreprocessSpec(size=28, in_channels=1)).state_dict()


@pytest.fixture
def shared_pool(tmp_path):
    """A pool folder built from one npz, and another npz that the fold runs below name for it: loading their pool
    would rebuild the folder from that one."""
    from medtriage.data.sources.medmnist import build_npz_pool

    build_npz_pool(write_npz(tmp_path / "a.npz", 0), tmp_path / "pool", LABELS)
    return tmp_path / "pool", write_npz(tmp_path / "b.npz", 1)


def save_run(run_dir: Path, weights: dict, pool: Path, npz: Path, fold: int | None, **data) -> Path:
    """A training run's final checkpoint and config as training leaves them (fold `fold` of a 2-fold cut)."""
    from medtriage.model.checkpoint import save_checkpoint

    config = {
        "model": {"name": "resnet10", "stem_stride": 2, "preprocess": asdict(PreprocessSpec(size=28, in_channels=1))},
        "data": {
            **{"source": "npz", "npz_path": str(npz), "pool_dir": str(pool), "label_names": LABELS, "holdout_site": None},
            **{"cv_folds": 2, "cv_fold": fold, "cv_seed": 0, "limit": None, **data},
        },
        "trainer": {"seed": 0, "weights": "last"},
        "export": {"name": "folds"},
        "tracking": {"experiment_name": "folds"},
    }
    return save_checkpoint(run_dir / "checkpoints" / "last.pt", model=weights, config=config)


def pool_files(pool: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(pool.iterdir())}


@pytest.mark.parametrize(
    ("folds", "refit", "more", "reason"),
    [
        ([{}], None, [], "not the 2 folds of one cross-validation"),  # fold 1 missing
        ([{}, {"cv_seed": 7}], None, [], "not the 2 folds of one cross-validation"),  # fold 1 of another cut
        ([{}, {}], None, ["export.positive_label=pnuemonia"], "positive label 'pnuemonia'"),
        ([{}, {}], {"holdout_site": "north"}, [], "its data.holdout_site differ"),  # a refit that held out a site
    ],
)
def test_a_refused_fold_export_leaves_the_shared_pool_as_it_was(shared_pool, untrained_weights, tmp_path, folds, refit, more, reason):
    from medtriage.export.fold_ensemble import export_fold_ensemble, export_refit

    pool, other_npz = shared_pool
    for fold, data in enumerate(folds):
        save_run(tmp_path / "cv" / f"fold{fold}", untrained_weights, pool, other_npz, fold, **data)
    before, overrides = pool_files(pool), [f"export.models_dir={tmp_path / 'models'}", *more]
    with pytest.raises(ConfigError, match=reason):
        if refit is None:
            export_fold_ensemble(tmp_path / "cv", "folds", overrides=overrides)
        else:
            save_run(tmp_path / "refit", untrained_weights, pool, other_npz, None, cv_folds=None, refit=True, **refit)
            export_refit(tmp_path / "cv", [tmp_path / "refit"], "folds", overrides=overrides)
    assert pool_files(pool) == before
    assert not (tmp_path / "models").exists()


def test_cross_validations_whose_pool_was_built_differently_are_refused_before_it_is_rebuilt(shared_pool, untrained_weights, tmp_path):
    from medtriage.export.fold_ensemble import export_fold_ensemble

    pool, other_npz = shared_pool
    for cv, npz in (("cv-a", tmp_path / "a.npz"), ("cv-b", other_npz)):  # the first names the pool's own npz
        for fold in range(2):
            save_run(tmp_path / cv / f"fold{fold}", untrained_weights, pool, npz, fold)
    before = pool_files(pool)
    with pytest.raises(ConfigError, match=r"built their pool .* with different settings \(data.npz_path .*a.npz vs .*b.npz\)") as refused:
        export_fold_ensemble([tmp_path / "cv-a", tmp_path / "cv-b"], "folds", overrides=[f"export.models_dir={tmp_path / 'models'}"])
    assert refused.value.where == f"{tmp_path / 'cv-a'} {tmp_path / 'cv-b'}" and "data.npz_path" in refused.value.hint
    assert "data.source" not in refused.value.hint  # both npz: only the setting that differs is named
    assert pool_files(pool) == before
    assert not (tmp_path / "models").exists()
