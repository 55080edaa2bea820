"""What the node's worker writes and counts for a study: the reports (and heatmaps) of a study reopened by a late
instance share one series and are numbered in order, and an instance whose result could not be stored is counted
once, when it is stored, not once per attempt."""

from __future__ import annotations

import time

import pydicom
import pytest

from medtriage.serve.node.store import NodeStore
from medtriage.serve.node.worker import Worker
from tests.serve.node.peers import cr_study

FIELDS = {"patient_id": "P", "accession": "A", "study_date": "", "study_description": "", "modality": "CR"}


def _receive(store: NodeStore, path, study_uid: str) -> None:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    store.receive(path.read_bytes(), ds.SOPInstanceUID, study_uid, ds.SeriesInstanceUID, ds.SOPClassUID, FIELDS)


def _sent(store: NodeStore, study_uid: str, kind: str) -> list[pydicom.Dataset]:
    rows = store._execute("SELECT DISTINCT file FROM deliveries WHERE study_uid = ? AND kind = ? ORDER BY id", (study_uid, kind))
    return [pydicom.dcmread(store.outbox_path(row["file"])) for row in rows]


def test_reports_of_a_reopened_study_share_a_series_numbered_in_order(predictor, tmp_path):
    first, late = cr_study(tmp_path / "in", 2, seed=3)
    study_uid = pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID
    store = NodeStore(tmp_path / "state")
    worker = Worker(store, predictor, ["PACS@127.0.0.1:1"], study_timeout=0, heatmaps=True)
    for path in (first, late):  # the late instance reopens the closed study: a second report
        _receive(store, path, study_uid)
        time.sleep(0.01)
        assert worker.score_queued() and worker.close_quiet_studies()
    one, two = _sent(store, study_uid, "sr")
    assert one.SeriesInstanceUID == two.SeriesInstanceUID and one.SOPInstanceUID != two.SOPInstanceUID
    assert (one.SeriesNumber, one.InstanceNumber, two.InstanceNumber) == (9901, 1, 2)
    assert len(two.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence) == 2
    first_map, second_map = _sent(store, study_uid, "heatmap")  # the pictures likewise, in a series of their own
    assert first_map.SeriesInstanceUID == second_map.SeriesInstanceUID != one.SeriesInstanceUID
    assert (first_map.SeriesNumber, first_map.InstanceNumber, second_map.InstanceNumber) == (9902, 1, 2)
    store.close()


def test_an_instance_is_counted_once_when_storing_its_result_failed_first(predictor, tmp_path, monkeypatch):
    (path,) = cr_study(tmp_path / "in", 1, seed=4)
    store = NodeStore(tmp_path / "state")
    _receive(store, path, "1.2.826.0.1.3680043.8.498.4")
    worker = Worker(store, predictor, ["PACS@127.0.0.1:1"], study_timeout=60)
    stored = store.set_scored

    def full_disk_once(*args):
        monkeypatch.setattr(store, "set_scored", stored)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "set_scored", full_disk_once)
    with pytest.raises(OSError):  # the node's loop logs it; the instance stays queued
        worker.score_queued()
    assert worker.monitor.registry.get_sample_value("medtriage_scored_total") == 0
    assert worker.score_queued() and not store.unscored()
    assert worker.monitor.registry.get_sample_value("medtriage_scored_total") == 1
    store.close()
