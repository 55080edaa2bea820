"""The accuracy benchmark's choices and report lines (the runs themselves are `python -m benchmarks.accuracy`)."""

from benchmarks.accuracy import (
    Row,
    choose_package,
    loso_lines,
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


def test_leave_one_site_out_table_sets_the_variants_side_by_side():
    def run(seed, aucs):
        per_site = dict(zip(("north", "south"), aucs))
        return {
            "seed": seed,
            "per_site": per_site,
            "worst": min(aucs),
            "parent_run_id": f"{seed}" * 32,
            "command": f"python scripts/train.py -m experiment=loso_pneumonia_sites trainer.seed={seed}",
        }

    lines = loso_lines({"fixed": [run(0, (0.90, 0.80)), run(1, (0.92, 0.84))], "per_image": [run(0, (0.91, 0.88)), run(1, (0.93, 0.90))]})
    assert "| south | 0.820 ± 0.028 | 0.890 ± 0.014 |" in lines
    assert lines[-1] == "| **worst site** | **0.820 ± 0.028** | **0.890 ± 0.014** |"
    assert loso_lines(None) == []


def test_every_leave_one_site_out_job_composes_fully(tmp_path):
    from benchmarks.accuracy import QUICK, loso_job_config, loso_sites
    from medtriage.config import to_plain_dict

    sites = loso_sites()
    assert len(sites) >= 2
    for site in sites:
        config = to_plain_dict(loso_job_config(site, ["model.preprocess.intensity=per_image", *QUICK], tmp_path))
        assert config["data"]["holdout_site"] == site and config["paths"]["output_dir"] == str(tmp_path / site)
        assert config["model"]["preprocess"]["intensity"] == "per_image"
