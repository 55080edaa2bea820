"""Mirrored test-time views only for models trained on mirrored images: a chest X-ray is not left-right symmetric,
so to a model trained without flips a mirrored view is out of distribution and averaging it in shifts every score.
Every export path that builds views refuses them, before any image is scored; a training that would export with
them is refused before it starts."""

from __future__ import annotations

import copy
from dataclasses import asdict
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from medtriage.config import check_values, compose_train_config
from medtriage.config.schema import trained_with_flips
from medtriage.errors import ConfigError, DataNotFoundError
from medtriage.export import ensemble, fold_ensemble
from medtriage.export.run import export_run
from medtriage.model.checkpoint import save_checkpoint
from medtriage.model.networks import PreprocessSpec, build_triage_net

FLIPPED = {"augment": {"enabled": True, "hflip": True}, "augment_on": "device"}
UNFLIPPED = {"augment": {"enabled": True, "hflip": False}, "augment_on": "device"}


def _train_config(tmp_path, augment: dict, augment_on: str) -> dict:
    """A resolved training config as a checkpoint stores it, of a 28 px ResNet-10 on a pool that does not exist."""
    spec = asdict(PreprocessSpec(size=28, in_channels=1))
    return {
        "model": {"name": "resnet10", "stem_stride": 2, "preprocess": spec},
        "data": {"label_names": ["a", "b"], "pool_dir": str(tmp_path / "no-pool"), "augment": augment, "cv_fold": 0},
        "trainer": {"augment_on": augment_on, "seed": 0},
    }


def _net():
    return build_triage_net("resnet10", 2, PreprocessSpec(size=28, in_channels=1)).eval()


def _export_overrides(tmp_path, tta: str) -> dict:
    return {"export": {"models_dir": str(tmp_path / "models"), "name": "x", "tta": tta}}


def _refused(err) -> None:
    assert err.value.where == "export.tta" and "trained without left-right flips" in str(err.value)
    assert "data.augment.hflip=true" in err.value.hint and "trainer.augment_on=device" in err.value.hint


@pytest.mark.parametrize(
    ("augment", "augment_on", "flipped"),
    [
        ({"enabled": True, "hflip": True}, "device", True),
        ({"enabled": True, "hflip": False}, "device", False),
        ({"enabled": False, "hflip": True}, "device", False),  # augmentation off: no flip was drawn
        ({"enabled": True, "hflip": True}, "cpu", False),  # the CPU transforms have no flip
        ({}, "device", False),  # the defaults: no flip
    ],
)
def test_only_a_training_that_drew_flips_counts_as_trained_with_flips(tmp_path, augment, augment_on, flipped):
    assert trained_with_flips(_train_config(tmp_path, augment, augment_on)) is flipped


def test_a_run_trained_without_flips_is_refused_flip_views_before_any_data_is_read(tmp_path):
    config = _train_config(tmp_path, **UNFLIPPED)
    checkpoint = save_checkpoint(tmp_path / "best.pt", model=_net().state_dict(), config=config)
    with pytest.raises(ConfigError) as err:
        export_run(None, checkpoint, {**config, **_export_overrides(tmp_path, "flip")})
    _refused(err)


def test_a_run_trained_with_flips_may_average_flip_views(tmp_path):
    config = _train_config(tmp_path, **FLIPPED)
    checkpoint = save_checkpoint(tmp_path / "best.pt", model=_net().state_dict(), config=config)
    with pytest.raises(DataNotFoundError):  # past the views: it goes on to read the (missing) pool
        export_run(None, checkpoint, {**config, **_export_overrides(tmp_path, "flip")})


def test_an_ensemble_with_one_member_trained_without_flips_is_refused_flip_views(tmp_path, monkeypatch):
    configs = [_train_config(tmp_path, **FLIPPED), _train_config(tmp_path, **UNFLIPPED)]
    monkeypatch.setattr(ensemble, "load_members", lambda run_ids, download_dir: ([_net(), _net()], configs))
    with pytest.raises(ConfigError) as err:
        ensemble.export_ensemble(["r0", "r1"], "x", tta="flip")
    _refused(err)
    assert "members [1] of 2" in str(err.value)


def _fold_members(tmp_path, unflipped: bool) -> fold_ensemble.FoldMembers:
    configs = [_train_config(tmp_path, **(UNFLIPPED if unflipped else FLIPPED)) for _ in range(2)]
    for fold, config in enumerate(configs):
        config["data"]["cv_fold"] = fold
        config |= _export_overrides(tmp_path, "none")
    pool = SimpleNamespace(label_names=["a", "b"], pool_dir=tmp_path / "no-pool")  # read only once scoring starts
    return fold_ensemble.FoldMembers([_net(), _net()], configs, [pool, pool], [0, 1])


def test_fold_models_trained_without_flips_are_refused_flip_views_before_scoring(tmp_path, monkeypatch):
    monkeypatch.setattr(fold_ensemble, "fold_runs", lambda cv_dirs: _fold_members(tmp_path, unflipped=True))
    with pytest.raises(ConfigError) as err:
        fold_ensemble.export_fold_ensemble(tmp_path / "cv", "x", tta="flip")
    _refused(err)


def test_a_refit_of_folds_trained_without_flips_is_refused_flip_views(tmp_path, monkeypatch):
    members = _fold_members(tmp_path, unflipped=True)
    monkeypatch.setattr(fold_ensemble, "fold_runs", lambda cv_dir: members)
    refit = copy.deepcopy(members.configs[0])
    refit["data"]["refit"] = True
    save_checkpoint(tmp_path / "refit" / "checkpoints" / "last.pt", model=_net().state_dict(), config=refit)
    with pytest.raises(ConfigError) as err:
        fold_ensemble.export_refit(tmp_path / "cv", [tmp_path / "refit"], "x", tta="flip")
    _refused(err)


def test_a_training_that_would_export_flip_views_without_flips_is_refused_before_it_starts(tmp_path):
    base = [f"paths.output_dir={tmp_path / 'run'}", "export.tta=flip"]
    with pytest.raises(ConfigError, match="export.tta=flip for a model trained without left-right flips"):
        check_values(compose_train_config(base))
    check_values(compose_train_config([*base, "data.augment.hflip=true", "trainer.augment_on=device"]))
    check_values(compose_train_config([*base, "export.enabled=false"]))  # no export at its end: nothing to refuse


def test_the_composed_config_and_its_stored_dict_agree_on_flips(tmp_path):
    cfg = compose_train_config([f"paths.output_dir={tmp_path / 'run'}", "data.augment.hflip=true", "trainer.augment_on=device"])
    stored = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert trained_with_flips(cfg) and trained_with_flips(stored)
