"""train.py and cross_validate.py build the pool from site DICOM: pydicom's warnings on the way name their file, once, as
`medtriage build-pool` says them (io.header_warnings), not as bare Python warnings."""

from __future__ import annotations

import pytest

from medtriage.errors import DataNotFoundError
from medtriage.io.header_warnings import saying_header_warnings
from tests.cli.test_cli_bad_inputs import run_hydra_main


@pytest.mark.parametrize(
    ("module", "work"), [("medtriage.cli.train", "train_and_export"), ("medtriage.cli.cross_validate", "cross_validate")]
)
def test_the_training_commands_say_pydicoms_warnings_naming_the_file(module, work, tmp_path, monkeypatch, capsys):
    import importlib

    seen = []

    def stand_in(*args, **kwargs):
        seen.append(saying_header_warnings())
        raise DataNotFoundError("stopped here", where="the test")

    monkeypatch.setattr(importlib.import_module(module), work, stand_in)
    assert run_hydra_main(module, ["experiment=pneumonia_sites"], tmp_path, monkeypatch) != 0
    assert seen == [True] and "stopped here" in capsys.readouterr().err
