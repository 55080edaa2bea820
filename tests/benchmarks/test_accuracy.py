"""The accuracy benchmark's choices and report lines (the runs themselves are `python -m benchmarks.accuracy`)."""

from benchmarks.accuracy import (
    Row,
    choose_package,
    selection_line,
    verdict_lines,
)


def row(label, losses, val_auc=0.996):
    return Row(label, [f"{label}{i}" for i in range(len(losses))], [{"val_auc": val_auc, "val_log_loss": x} for x in losses], [])


def test_the_package_is_the_candidate_with_the_lowest_validation_log_loss():
    rows = [row("single", [0.09, 0.07, 0.11]), row("ensemble", [0.08])]
    assert choose_package(rows) == (rows[0], 1)
    rows.append(row("wider ensemble", [0.05]))
    assert choose_package(rows) == (rows[2], 0)


def test_selection_line_reports_the_measured_spread_of_validation_auc():
    line = selection_line([row("a", [0.1, 0.2], val_auc=0.91), row("b", [0.3], val_auc=0.97)])
    assert "validation AUC of the 3 candidates spans 0.910-0.970" in line


def test_verdicts_follow_the_figures():
    proof = {"served_test_auc": 0.95, "torch_test_auc": 0.95}
    assert [line.endswith("**met**") for line in verdict_lines(proof)[1:]] == [True, True]
    proof = {"served_test_auc": 0.90, "torch_test_auc": 0.93}
    assert [line.endswith("**not met**") for line in verdict_lines(proof)[1:]] == [True, True]
