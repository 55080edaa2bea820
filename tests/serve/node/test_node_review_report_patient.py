"""The study's report is filed under the study's patient: a study whose first image names no Patient ID takes the
first one another image names (the node holds it so), and its SR carries that one, not the blank."""

from __future__ import annotations

import time

import pydicom

from medtriage.serve.node.header import read_identity
from medtriage.serve.node.store import NodeStore
from medtriage.serve.node.worker import Worker
from tests.serve.node.peers import cr_study


def test_the_report_of_a_study_whose_first_image_has_no_patient_id_names_the_study_s_patient(predictor, tmp_path):
    """Before, the SR copied the first image's blank Patient ID and Name: a PACS filed it under no patient (Orthanc
    under a patient of its own), away from the study's images that named one."""
    unnamed, named = cr_study(tmp_path / "in", 2, seed=41, patient="PSEUDO-41")
    ds = pydicom.dcmread(unnamed)
    ds.PatientID, ds.PatientName = "", ""
    ds.save_as(unnamed)
    store = NodeStore(tmp_path / "state", recover=True)
    worker = Worker(store, predictor, ["PACS@127.0.0.1:1"], study_timeout=0)
    try:
        for path in (unnamed, named):
            header = read_identity(path)
            store.receive(path.read_bytes(), header.sop_uid, header.study_uid, header.series_uid, header.sop_class, header.fields)
            time.sleep(0.01)
        assert worker.score_queued()
        time.sleep(0.01)
        assert worker.close_quiet_studies()
        (row,) = store._execute("SELECT file FROM deliveries WHERE kind = 'sr'")
        sr = pydicom.dcmread(store.outbox_path(row["file"]))
    finally:
        store.close()
    assert (sr.PatientID, str(sr.PatientName)) == ("PSEUDO-41", "Pseudo^One")
    assert len(sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence) == 2
