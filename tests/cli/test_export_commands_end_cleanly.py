"""`medtriage-export` and `medtriage-export-ensemble` end as every other command does (medtriage.cli.report_errors).

Before, each printed its own errors: Ctrl-C during an export and a reader of its output that had left (`| head -1`,
a closed log viewer) ended it with a Python traceback, and an error while finding the tracking store
(ensemble) too."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("mlflow", reason="the export commands need the [train] extra")

from medtriage.cli import export as export_cli  # noqa: E402 -- after the skip
from medtriage.errors import ConfigError  # noqa: E402

RUN_ID = "0123456789abcdef0123456789abcdef"


class ReaderLeft:
    """stdout piped into a reader that has gone: every write raises BrokenPipeError."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        raise OSError("no file behind this stream")


def _raises(err: BaseException):
    def fail(*args, **kwargs):
        raise err

    return fail


@pytest.fixture(autouse=True)
def no_tracking_store(monkeypatch):
    """The commands' work is replaced in each test: no MLflow store is looked up."""
    monkeypatch.setattr(export_cli, "_use_project_store", lambda: None)


def _export_interrupted(monkeypatch):
    monkeypatch.setattr("medtriage.export.from_mlflow.export_from_mlflow", _raises(KeyboardInterrupt()))
    return export_cli.main([f"run_id={RUN_ID}"])


def _ensemble_interrupted(monkeypatch):
    monkeypatch.setattr("medtriage.export.ensemble.export_ensemble", _raises(KeyboardInterrupt()))
    return export_cli.ensemble_main(["--name", "ens", "r1", "r2"])


@pytest.mark.parametrize("run", [_export_interrupted, _ensemble_interrupted], ids=["export", "export-ensemble"])
def test_ctrl_c_ends_an_export_with_one_line_and_status_130(run, monkeypatch, capsys):
    try:
        code = run(monkeypatch)
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt went on, to end the command with a traceback")
    assert code == 130
    assert capsys.readouterr().err.startswith("stopped (Ctrl-C")


def test_an_ensemble_whose_output_reader_left_still_ends_with_its_own_status(monkeypatch, tmp_path):
    monkeypatch.setattr("medtriage.export.ensemble.export_ensemble", lambda *a, **k: (tmp_path / "ens", "run1", None))
    monkeypatch.setattr(sys, "stdout", ReaderLeft())
    try:
        code = export_cli.ensemble_main(["--name", "ens", "r1", "r2"])
    except BrokenPipeError:
        pytest.fail("the BrokenPipeError went on, to end the command with a traceback")
    assert code == 0


def test_an_error_finding_the_ensembles_store_is_a_message_not_a_traceback(monkeypatch, capsys):
    monkeypatch.setattr(export_cli, "_use_project_store", _raises(ConfigError("no configs folder", where="MEDTRIAGE_ROOT")))
    assert export_cli.ensemble_main(["--name", "ens", "r1", "r2"]) == 2
    assert capsys.readouterr().err == "error: MEDTRIAGE_ROOT: no configs folder\n"


@pytest.mark.parametrize(
    "run,argv,message",
    [
        (export_cli.main, ["export.name=x"], "run_id=<mlflow run id>"),
        (export_cli.ensemble_main, ["--name", "ens", "r1"], "an ensemble needs two or more runs"),
    ],
    ids=["export", "export-ensemble"],
)
def test_an_error_keeps_its_message_and_status_2(run, argv, message, monkeypatch, capsys):
    monkeypatch.setattr("medtriage.export.ensemble.export_ensemble", _raises(ConfigError("an ensemble needs two or more runs")))
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_a_success_prints_the_package_and_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("medtriage.export.ensemble.export_ensemble", lambda *a, **k: (tmp_path / "ens", "run1", None))
    assert export_cli.ensemble_main(["--name", "ens", "r1", "r2"]) == 0
    assert capsys.readouterr().out == f"ensemble package {tmp_path / 'ens'} (MLflow run run1)\n"


def test_every_option_of_the_ensemble_command_names_its_default():
    from tests.cli.test_help_lines import help_problems

    assert help_problems(export_cli.ensemble_parser()) == []  # before: --tta gave none


def test_the_ensemble_command_refuses_an_empty_folder(capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_cli.ensemble_main(["--name", "ens", "--cross-validation", ""])
    assert exit_info.value.code == 2
    assert "argument --cross-validation: expected a path, got an empty one" in capsys.readouterr().err
