"""The fold-ensemble benchmark's section (the run is `python -m benchmarks.accuracy_folds`)."""

from argparse import Namespace

from benchmarks import accuracy_folds as bench
from tests.benchmarks.test_docs_figures import check_section, written_sections

ARGS = Namespace(folds=3, quick=False)
TRIAL = {"run_id": "b37f0907" * 4, "fold_wall_s": [1587.5, 1586.6, 1514.7]}


def result(test_auc: float, test_acc: float) -> dict:
    return {
        "version": 1,
        "run_id": "5ee1" * 8,
        "members": 3,
        "views": "shift",
        "out_of_fold_images": 4406,
        "out_of_fold_normal": 523,
        "out_of_fold_auc": 0.9971,
        "temperature": 1.21,
        "youden_threshold": 0.8123,
        "test_auc": test_auc,
        "ci_low": 0.981,
        "ci_high": 0.995,
        "test_acc": test_acc,
        "test_acc_argmax": 0.9,
        "test_acc_finding": 0.95,
        "export_s": 150.0,
    }


def section(r: dict) -> str:
    return bench.section(r, TRIAL, "shift", ARGS, "python -m benchmarks.accuracy_folds")


def test_the_section_reports_the_package_its_members_and_both_verdicts():
    text = section(result(0.9887, 0.9423))
    assert check_section(bench.SECTION, text.split("\n", 1)[1], written_sections()) == []
    assert "| balanced-longer: ensemble of its 3 fold models, shift views | 0.9887 | [0.981, 0.995] | 0.9423 (t = 0.812) |" in text
    assert "training: 26.5 + 26.4 + 25.2 min" in text and "trial run `b37f0907`" in text
    assert "4406 out-of-fold scores (523 normal)" in text and "temperature (1.210)" in text
    assert "- test AUC 0.9887: **not met**" in text and "- test ACC 0.9423: **not met**" in text
    assert "*published:* Google AutoML Vision | 0.991" in text


def test_targets_reached_are_met():
    text = section(result(0.9903, 0.9503))
    assert "- test AUC 0.9903: **met**" in text and "- test ACC 0.9503: **met**" in text
