"""Ensembles of finished training runs, from MLflow to one package (the path benchmarks and scripts/export_ensemble.py take)."""

from __future__ import annotations

import json

import pytest

from tests.training.test_train_e2e import run_id_of

pytestmark = pytest.mark.slow


def test_runs_exported_with_an_ood_head_ensemble_into_a_package_without_one(tmp_path, tiny_overrides, run_train, capsys):
    from medtriage.export.ensemble import export_ensemble
    from medtriage.serve.package import load_package
    from medtriage.serve.predictor import Predictor
    from tests.io.test_dicom import sample_file

    overrides = [o for o in tiny_overrides if o != "export.enabled=false"] + ["data.limit=48", f"export.models_dir={tmp_path / 'models'}"]
    run_ids = [run_id_of(run_train([*overrides, f"trainer.seed={seed}"]).stdout) for seed in (0, 1)]
    singles = [json.loads(p.read_text()) for p in sorted((tmp_path / "models").glob("*/model.json"))]
    assert singles and all(meta.get("ood") for meta in singles)  # the members' own packages carry an OOD score

    package, _, _ = export_ensemble(run_ids, "tiny-ensemble", overrides=[f"export.models_dir={tmp_path / 'models'}"])
    assert "without an OOD score" in capsys.readouterr().out
    loaded = load_package(package)
    assert not loaded.meta.get("ood") and loaded.ood_output is None
    assert 0.0 <= Predictor(loaded, allow_out_of_scope=True).score_file(sample_file("CT_small.dcm"))[0].probability <= 1.0
