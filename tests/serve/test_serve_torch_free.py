"""The inference side runs where torch, monai, mlflow and hydra cannot be imported."""

import json

from pydicom.data import get_testdata_file


def test_the_blocker_really_blocks(run_without_training_stack):
    out = run_without_training_stack("import torch")
    assert out.returncode != 0 and "torch is blocked" in out.stderr


def test_serve_scores_a_file_and_builds_an_sr_without_torch(package_dir, run_without_training_stack):
    ct = get_testdata_file("CT_small.dcm")
    out = run_without_training_stack(
        f"""
        import json, sys
        import medtriage.serve.cli, medtriage.serve.http, medtriage.serve.dicom_results
        from medtriage.serve.package import load_package
        from medtriage.serve.predictor import Predictor
        from medtriage.serve.dicom_results import build_sr, read_header
        predictor = Predictor(load_package({str(package_dir)!r}))
        scores = predictor.score_file({ct!r})
        build_sr(read_header({ct!r}), scores, predictor.package)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in Blocker.blocked)
        print(json.dumps({{"p": scores[0].probability, "heavy": heavy}}))
        """
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["p"] <= 1.0 and result["heavy"] == []


def test_the_score_command_runs_without_torch(package_dir, run_without_training_stack):
    ct = get_testdata_file("CT_small.dcm")
    out = run_without_training_stack(
        f"""
        import sys
        from medtriage.cli import main
        sys.exit(main(["score", {str(package_dir)!r}, {ct!r}, "--json"]))
        """
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["results"][0]["file"].endswith("CT_small.dcm")
