"""Faults: the listener killed (-9) in the middle of an association, and the PACS down while results are due."""

from __future__ import annotations

import sqlite3

import pydicom
import pytest

from tests.serve.node.peers import (
    Orthanc,
    cr_study,
    free_port,
    referenced_sops,
    send_files,
    srs,
    start_listener,
    storescu,
    wait_for,
    wait_for_srs,
)

STUDIES, PER_STUDY, KILL_AFTER = 3, 40, 55  # 120 instances; the kill lands inside the second study


@pytest.fixture
def own_orthanc(orthanc_exe, tmp_path):
    port = free_port()  # the node's port, which Orthanc's DicomModalities points at
    (tmp_path / "orthanc").mkdir()
    server = Orthanc(tmp_path / "orthanc", port, orthanc_exe).start()
    yield server, port
    server.close()


@pytest.mark.slow
def test_kill_9_mid_association_then_every_stored_instance_is_delivered_once(package_dir, own_orthanc, tmp_path):
    orthanc, port = own_orthanc
    node = start_listener(package_dir, tmp_path / "state", port, orthanc)
    files = [path for i in range(STUDIES) for path in cr_study(tmp_path / f"study{i}", PER_STUDY, seed=20 + i)]
    stored: list = []

    def kill_midway(path, status):
        if status == 0x0000:
            stored.append(path)
        if len(stored) == KILL_AFTER and node.process.poll() is None:
            node.kill()  # SIGKILL: no cleanup, the association is cut

    statuses = send_files(port, files, stop_after=kill_midway)
    assert node.process.returncode == -9 and len(stored) == KILL_AFTER
    assert sum(status is not None for status in statuses.values()) < len(files)  # the association was cut short

    node = start_listener(package_dir, tmp_path / "state", port, orthanc)  # same state: resumes
    try:
        headers = {path: pydicom.dcmread(path, stop_before_pixels=True) for path in files}
        headers_by_sop = {ds.SOPInstanceUID: ds for ds in headers.values()}
        by_study: dict[str, set[str]] = {}
        for path in stored:
            by_study.setdefault(headers[path].StudyInstanceUID, set()).add(headers[path].SOPInstanceUID)
        assert len(by_study) == 2
        wait_for_srs(orthanc, by_study, timeout=60)
        wait_for(lambda: set(node.counts()["studies"]) == {"delivered"}, 30, "every study delivered")
        sent = {headers[path].SOPInstanceUID for path in files}
        with sqlite3.connect(node.state / "node.sqlite") as db:
            rows = dict(db.execute("SELECT sop_uid, state FROM instances").fetchall())
            deliveries = db.execute("SELECT study_uid, COUNT(*), SUM(state = 'delivered') FROM deliveries GROUP BY study_uid").fetchall()
        assert set(rows) <= sent and set(rows.values()) <= {"scored", "rejected"}  # nothing left half-done
        for study_uid, succeeded in by_study.items():
            assert succeeded <= set(rows)  # every instance that got a success response was kept, and scored
            (sr,) = srs(orthanc, study_uid)  # exactly one SR for the study
            references = referenced_sops(sr)
            study_rows = {sop for sop in rows if headers_by_sop[sop].StudyInstanceUID == study_uid}
            # each scored instance once (rejections, e.g. unusual input, are "not analysed" and not referenced)
            assert sorted(references) == sorted(sop for sop in study_rows if rows[sop] == "scored")
        assert sorted((uid, 1, 1) for uid in by_study) == sorted(deliveries)  # one delivery per study, delivered
        with sqlite3.connect(node.state / "node.sqlite") as db:
            unexplained = db.execute("SELECT COUNT(*) FROM instances WHERE state = 'rejected' AND reason IS NULL").fetchone()
        assert unexplained == (0,)  # a rejection carries its reason
    finally:
        assert node.stop() == 0


@pytest.mark.slow
def test_results_wait_while_orthanc_is_down_and_arrive_when_it_is_back(package_dir, own_orthanc, storescu_exe, tmp_path):
    orthanc, port = own_orthanc
    node = start_listener(package_dir, tmp_path / "state", port, orthanc)
    try:
        orthanc.stop()
        studies = [cr_study(tmp_path / f"study{i}", 3, seed=40 + i) for i in range(2)]
        for files in studies:
            assert storescu(storescu_exe, port, files).returncode == 0
        wait_for(lambda: node.counts()["studies"].get("failed", 0) == 2, 30, "both studies failing to deliver")
        with sqlite3.connect(node.state / "node.sqlite") as db:
            reasons = [r for (r,) in db.execute("SELECT reason FROM studies")]
            attempts = min(a for (a,) in db.execute("SELECT attempts FROM deliveries"))
        assert all("no association" in reason and "retrying" in reason for reason in reasons), reasons
        wait_for(lambda: _min_attempts(node) >= 2, 30, "a second try")  # retried with backoff, not given up
        assert attempts >= 1

        orthanc.start()  # same storage, same ports
        uids = [pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID for files in studies]
        found = wait_for_srs(orthanc, uids, timeout=30)
        assert all(len(found[uid]) == 1 and len(referenced_sops(found[uid][0])) == 3 for uid in uids)
        wait_for(lambda: node.counts()["studies"] == {"delivered": 2}, 20, "both studies delivered")
    finally:
        assert node.stop() == 0


def _min_attempts(node) -> int:
    with sqlite3.connect(node.state / "node.sqlite") as db:
        return min(a for (a,) in db.execute("SELECT attempts FROM deliveries"))
