"""A re-export reads the pool's label names to name the graph's outputs: a pool whose labels are in another order
than the network was trained on is refused, as are ensemble members trained on different labels."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from medtriage.errors import ConfigError
from medtriage.export import ensemble
from medtriage.export.run import export_run
from medtriage.model.checkpoint import save_checkpoint
from medtriage.model.networks import PreprocessSpec, build_triage_net


def _train_config(pool_dir, labels: list[str]) -> dict:
    spec = asdict(PreprocessSpec(size=28, in_channels=1))
    return {"model": {"name": "resnet10", "stem_stride": 2, "preprocess": spec}, "data": {"label_names": labels, "pool_dir": str(pool_dir)}}


def _exported(tmp_path, two_site_pool, labels: list[str]):
    config = _train_config(two_site_pool.pool_dir, labels)
    net = build_triage_net("resnet10", 2, PreprocessSpec(size=28, in_channels=1))
    checkpoint = save_checkpoint(tmp_path / "best.pt", model=net.state_dict(), config=config)
    overrides = {"export": {"models_dir": str(tmp_path / "models"), "name": "x", "log_to_mlflow": False, "register_model": False}}
    return export_run(None, checkpoint, {**config, **overrides})


def test_a_pool_naming_the_labels_in_another_order_is_refused_before_anything_is_exported(tmp_path, two_site_pool):
    with pytest.raises(
        ConfigError, match=r"\['normal', 'pneumonia'\], but the network was trained on \['pneumonia', 'normal'\]"
    ) as refused:
        _exported(tmp_path, two_site_pool, ["pneumonia", "normal"])
    assert refused.value.where == str(two_site_pool.pool_dir)
    assert not (tmp_path / "models").exists()


def test_a_pool_with_the_trained_labels_exports(tmp_path, two_site_pool):
    package = _exported(tmp_path, two_site_pool, ["normal", "pneumonia"])
    assert (package / "model.json").is_file()


def test_ensemble_members_trained_on_labels_in_other_orders_are_refused(tmp_path, monkeypatch):
    configs = [_train_config(tmp_path, ["normal", "pneumonia"]), _train_config(tmp_path, ["pneumonia", "normal"])]
    net = build_triage_net("resnet10", 2, PreprocessSpec(size=28, in_channels=1))
    monkeypatch.setattr(
        ensemble,
        "find_checkpoint",
        lambda run_id, folder: save_checkpoint(folder / "best.pt", model=net.state_dict(), config=configs[int(run_id)]),
    )
    monkeypatch.setattr(ensemble, "check_finished_run", lambda run_id: None)  # runs stood in for by their checkpoints
    with pytest.raises(ConfigError, match="were trained on different data") as refused:
        ensemble.export_ensemble(["0", "1"], "x")
    assert "['normal', 'pneumonia']" in str(refused.value) and "['pneumonia', 'normal']" in str(refused.value)
