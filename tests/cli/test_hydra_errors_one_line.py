"""What a new ML engineer mistypes on the training command line, which Hydra answers before the job starts: a misspelt
key, a group option that does not exist, a value of the wrong type, a runs folder that cannot be made. Each ends as the
project's other errors do: one `error:` line naming the key or path and what to do, exit status 2, no traceback.

Before, Hydra printed five to fifteen lines (for a misspelt key, advising `+key=value`, which trains with the setting
read by nothing) or a traceback, with status 1; a multirun job's own error ended in a traceback too."""

from __future__ import annotations

import importlib
import sys

import pytest

from tests.cli.test_cli_bad_inputs import root_logging_kept

pytest.importorskip("torch")


def run_command(module: str, argv: list[str], monkeypatch, tmp_path) -> int:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with root_logging_kept(), pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main()
    return exit_info.value.code


def one_line_error(code, capsys, *fragments) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err and "HYDRA_FULL_ERROR" not in err, err
    assert "To append to your config use" not in err  # Hydra's advice: `+key=value` trains with the key read by nothing
    assert all(fragment in lines[0] for fragment in fragments), err
    return lines[0]


@pytest.mark.parametrize("module", ["medtriage.cli.train", "medtriage.cli.cross_validate"])
@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("trainer.max_epoch=1", ["trainer.max_epoch", "no such setting", "schema.py"]),
        ("model=resnet19", ["model=resnet19", "resnet18", "configs/model/"]),
        ("experiment=pneumoniamnst", ["experiment=pneumoniamnst", "pneumoniamnist_sota"]),
        ("trainer.lr=fast", ["trainer.lr", "'fast'", "Float"]),
        ("trainer.device=tpu", ["trainer.device", "cpu"]),
        ("trainer.lr=[1", ["trainer.lr=[1", "cannot read the override"]),
    ],
)
def test_a_mistyped_override_is_one_line_with_status_2(module, override, fragments, tmp_path, monkeypatch, capsys):
    code = run_command(module, ["experiment=pneumoniamnist", f"paths.runs_dir={tmp_path}/runs", override], monkeypatch, tmp_path)
    one_line_error(code, capsys, *fragments)


def test_a_runs_folder_that_cannot_be_made_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "runs.txt"
    a_file.write_text("not a folder\n")
    code = run_command("medtriage.cli.train", ["experiment=pneumoniamnist", f"paths.runs_dir={a_file}"], monkeypatch, tmp_path)
    one_line_error(code, capsys, str(a_file), "paths.runs_dir")


def test_a_multirun_jobs_own_error_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    argv = ["-m", "experiment=pneumoniamnist", f"paths.runs_dir={tmp_path}/runs", "export.enabled=false"]
    argv += [f"trainer.resume_from={tmp_path}/gone_a,{tmp_path}/gone_b"]  # each job refuses this before any data work
    code = run_command("medtriage.cli.train", argv, monkeypatch, tmp_path)
    one_line_error(code, capsys, "gone_a", "trainer.resume_from")
