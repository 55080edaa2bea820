"""Ensembles of finished training runs, from MLflow to one package (the path benchmarks and scripts/export_ensemble.py take)."""

from __future__ import annotations

import json

import pytest

from tests.training.test_train_e2e import run_id_of

pytestmark = pytest.mark.slow


def test_an_ensemble_of_runs_carries_the_mean_of_its_members_ood_scores(tmp_path, tiny_overrides, run_trains):
    import numpy as np
    import onnxruntime as ort

    from medtriage.export.ensemble import export_ensemble
    from medtriage.serve.package import load_package
    from medtriage.serve.predictor import Predictor, Rejection
    from tests.io.test_dicom import sample_file

    overrides = [o for o in tiny_overrides if not o.startswith(("export.enabled", "paths.runs_dir"))]
    # 256 training images for each OOD fit (not the pool's thousands): the ensemble takes the members' setting
    overrides += ["data.limit=48", "export.ood_fit_images=256", f"export.models_dir={tmp_path / 'models'}"]
    members = [
        [*overrides, f"trainer.seed={seed}", f"export.name=member{seed}", f"paths.runs_dir={tmp_path / f'runs{seed}'}"] for seed in (0, 1)
    ]
    run_ids = [run_id_of(done.stdout) for done in run_trains(*members)]
    singles = sorted((tmp_path / "models").glob("*/model.json"))
    assert len(singles) == 2 and all(json.loads(p.read_text()).get("ood") for p in singles)  # each member's own package

    package, _, _ = export_ensemble(run_ids, "tiny-ensemble", overrides=[f"export.models_dir={tmp_path / 'models'}"])
    loaded = load_package(package)
    ood = loaded.meta["ood"]
    assert ood["fit"]["members"] == 2 and "averaged over the 2 members" in ood["method"] and ood["parity"]["max_rel_diff"] <= 1e-3
    assert 0.0 < ood["val_flagged"] <= 0.05

    # Each member's score is the one its own package serves (same checkpoint, same training and validation images).
    channels = loaded.meta["input"]["channels"]
    images = np.random.default_rng(0).random((3, channels, 40, 40), dtype=np.float32)
    served = [
        ort.InferenceSession(str(p.parent / "model.onnx")).run(["ood_score"], {"pixels": images})[0]
        for p in [*singles, package / "model.json"]
    ]
    np.testing.assert_allclose(served[2], (served[0] + served[1]) / 2, rtol=1e-4)

    # Serving reads it: every scored image carries the ensemble's OOD score.
    (result,) = Predictor(loaded, allow_out_of_scope=True).score_file(sample_file("CT_small.dcm"))
    assert result.ood_score is not None and result.ood_score >= 0.0
    # The npz pool records no headers, so the package is scoped to the declared modality: a CT slice is refused by it.
    assert loaded.scope["modalities"] == ["CR", "DX"]
    refused = Predictor(loaded).score_or_reject(sample_file("CT_small.dcm"), "CT_small.dcm")
    assert isinstance(refused, Rejection) and (refused.code, refused.field) == ("out_of_scope", "modality")
