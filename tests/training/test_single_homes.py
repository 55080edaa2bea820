"""Checks that live in one place give one answer wherever they run: threshold rules, ports, the finished-run mark,
and the export settings checked once on the way from training to a package."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medtriage import training
from medtriage.errors import ConfigError


def test_an_unknown_rule_gets_the_same_message_at_launch_and_at_export():
    from medtriage.evaluation.operating_points import choose_threshold
    from medtriage.export.run import check_export_settings

    with pytest.raises(ConfigError) as at_launch:
        check_export_settings({"urgent_rule": "youdens"})
    with pytest.raises(ConfigError) as at_export:
        choose_threshold(np.array([0.2, 0.8]), np.array([0, 1]), "youdens")
    assert at_launch.value.where == "export.urgent_rule"
    assert (at_launch.value.reason, at_launch.value.hint) == (at_export.value.reason, at_export.value.hint)
    assert at_launch.value.hint == "use one of sensitivity, specificity, youden"


def test_a_port_out_of_range_gets_the_same_message_from_every_option():
    from medtriage.serve.node.cli import check_network_options
    from medtriage.serve.node.sender import Peer

    args = argparse.Namespace(aet="MEDTRIAGE", allow_aet=None, port=99999, metrics_port=None, retry_max=60.0, dicomweb=None)
    with pytest.raises(ConfigError) as listen_port:
        check_network_options(args)
    with pytest.raises(ConfigError) as send_to:
        Peer.parse("PACS@pacs.example.org:99999")
    assert (listen_port.value.where, send_to.value.where) == ("--port", "--send-to")
    assert listen_port.value.reason == send_to.value.reason == "port 99999 is out of range"
    assert listen_port.value.hint == send_to.value.hint


def _run(run_dir: Path, checkpoint: str, finished: bool) -> Path:
    """A run folder with `checkpoint` in it, marked finished the way the end of a run marks it."""
    from medtriage.training.report import METRICS_FILE
    from medtriage.training.resume import RESUME_KEYS

    path = run_dir / checkpoint
    path.parent.mkdir(parents=True)
    torch.save({key: 0 for key in RESUME_KEYS} | {"epoch": 1}, path)
    if finished:
        (run_dir / METRICS_FILE).write_text("{}")
    return path


def test_resume_takes_the_newest_run_without_the_mark_the_end_of_a_run_writes(tmp_path):
    from medtriage.training.resume import find_resume_checkpoint

    interrupted = _run(tmp_path / "exp" / "older", "checkpoints/last.pt", finished=False)
    _run(tmp_path / "exp" / "newer", "checkpoints/last.pt", finished=True)
    assert find_resume_checkpoint(None, tmp_path, "exp")[0] == interrupted


@pytest.mark.parametrize("given", ["run", "run/last.pt"])
def test_resume_from_a_finished_run_holding_its_checkpoint_directly_is_refused(tmp_path, given):
    from medtriage.training.resume import find_resume_checkpoint

    _run(tmp_path / "run", "last.pt", finished=True)
    with pytest.raises(ConfigError, match="names a run that finished"):
        find_resume_checkpoint(str(tmp_path / given), tmp_path, "exp")


class _Stop(Exception):
    """Ends the export once its settings are in hand: what follows needs a real pool."""


def _no_pool(pool_dir):
    raise _Stop


def _counting_checks(monkeypatch) -> list:
    import medtriage.export.run as export_run
    import medtriage.workflows.train_and_export as workflow

    calls, check = [], export_run.check_export_settings

    def counted(export):
        calls.append(export)
        return check(export)

    monkeypatch.setattr(export_run, "check_export_settings", counted)
    monkeypatch.setattr(workflow, "check_export_settings", counted)
    monkeypatch.setattr(export_run, "load_model", lambda path: (None, {}))
    monkeypatch.setattr(export_run, "load_manifest", _no_pool)
    return calls


def test_train_then_export_checks_the_export_settings_once(tmp_path, monkeypatch):
    from medtriage.training.job import RunResult
    from medtriage.workflows.train_and_export import train_and_export

    calls = _counting_checks(monkeypatch)
    finished = RunResult(run_id="run", best_val_auc=0.5, checkpoint=tmp_path / "best.pt", output_dir=tmp_path)
    monkeypatch.setattr(training, "run", lambda cfg: finished)
    with pytest.raises(_Stop):
        train_and_export(OmegaConf.create({"export": {"enabled": True}, "data": {"pool_dir": str(tmp_path)}}))
    assert len(calls) == 1


def test_an_export_on_its_own_still_checks_the_export_settings(tmp_path, monkeypatch):
    from medtriage.export.run import export_run

    calls = _counting_checks(monkeypatch)
    cfg = {"export": {"threshold_rule": "sensitivty"}, "data": {"pool_dir": str(tmp_path)}}
    with pytest.raises(ConfigError) as err:
        export_run(None, tmp_path / "best.pt", cfg)
    assert err.value.where == "export.threshold_rule" and len(calls) == 1
