"""Worklist edge cases: pictures of studies with several uploaded instances, uploads whose UIDs are not valid,
uploads into a study the DICOM node is still receiving, and the page's security headers (checked in Chromium
too, with hostile header values in the rows)."""

import io
import json

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from medtriage.serve.http import create_app
from medtriage.serve.node.header import read_identity
from medtriage.serve.node.store import NodeStore
from medtriage.serve.node.worker import Worker
from medtriage.serve.worklist import Worklist
from tests.serve import test_worklist as base
from tests.serve.test_http_edges import LiveServer
from tests.serve.test_worklist import AUTH, TOKEN

chest_files, live_server = base.chest_files, base.live_server  # the worklist tests' fixtures


def edited(path, **values) -> bytes:
    """The file's bytes with some header elements replaced (e.g. StudyInstanceUID of another file)."""
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def upload(client, name: str, data: bytes):
    return client.post("/v1/score", files=[("files", (name, data, "application/dicom"))], headers=AUTH)


def test_the_picture_of_a_shown_study_survives_uploads_of_its_other_instances(predictor, chest_files):
    client = TestClient(create_app(predictor, token=TOKEN, worklist_size=1))
    top, lower = chest_files["by_p"][-1], chest_files["by_p"][0]
    header = pydicom.dcmread(top, stop_before_pixels=True)
    upload(client, top.name, top.read_bytes())
    second = edited(lower, StudyInstanceUID=header.StudyInstanceUID, PatientID=header.PatientID)  # less suspicious
    upload(client, lower.name, second)
    (entry,) = client.get("/v1/worklist", headers=AUTH).json()["entries"]
    assert entry["instances"] == 2 and entry["file"] == top.name
    png = client.get(entry["overlay"], headers=AUTH)
    assert png.status_code == 200, png.text


def test_an_upload_with_invalid_uids_is_listed_with_its_priority_and_picture(predictor, chest_files):
    client = TestClient(create_app(predictor, token=TOKEN))
    path = chest_files["by_p"][-1]
    assert upload(client, path.name, edited(path, SeriesInstanceUID="series one")).json()["results"]
    (entry,) = client.get("/v1/worklist", headers=AUTH).json()["entries"]
    assert entry["state"] == "scored" and entry["priority"] == predictor.priority(chest_files["p"][path])
    assert client.get(entry["overlay"], headers=AUTH).status_code == 200


def test_an_upload_leaves_a_study_the_node_is_receiving_for_the_node_to_close(predictor, chest_files, tmp_path):
    store = NodeStore(tmp_path / "state")
    worker = Worker(store, predictor, destinations=[], study_timeout=0)
    sent, uploaded = chest_files["by_p"][0], chest_files["by_p"][-1]
    header = read_identity(sent)
    store.receive(sent.read_bytes(), header.sop_uid, header.study_uid, header.series_uid, header.sop_class, header.fields, "MODALITY")
    worker.score_queued()  # scored by the node; the study waits for its quiet time before its SR is sent

    worklist = Worklist(predictor, store=store)
    same_study = edited(uploaded, StudyInstanceUID=header.study_uid, PatientID=header.fields["patient_id"])
    assert isinstance(worklist.score_or_reject(same_study, uploaded.name), list)
    (row,) = worklist.rows()
    assert row["instances"] == 2 and row["priority"] == predictor.priority(chest_files["p"][uploaded])  # listed at once

    worker.close_quiet_studies()
    (study,) = store.shown_studies(1)
    assert study["state"] == "scored" and study["sr_uid"], "the node closes the study and sends its SR"
    assert json.loads(store.instance(study["top_sop"])["result"])[0]["file"] == uploaded.name


@pytest.mark.parametrize("with_state", [False, True], ids=["in memory", "state folder"])
def test_an_upload_naming_a_study_held_for_another_patient_is_refused_not_merged(predictor, chest_files, tmp_path, with_state):
    worklist = Worklist(predictor, store=tmp_path / "state" if with_state else None)
    first, stranger = chest_files["by_p"][0], chest_files["by_p"][-1]
    header = read_identity(first)
    assert isinstance(worklist.score_or_reject(first.read_bytes(), first.name), list)
    other_patient = edited(stranger, StudyInstanceUID=header.study_uid, PatientID=header.fields["patient_id"] + "-OTHER")
    refused = worklist.score_or_reject(other_patient, stranger.name)
    assert refused.error == "ConflictingPatient" and "another patient" in refused.reason and refused.hint
    (row,) = worklist.rows()
    assert row["instances"] == 1 and row["file"] == first.name  # the first patient's study as it was
    if with_state:
        assert len(list((tmp_path / "state" / "spool").iterdir())) == 1  # nothing of the refused upload kept


def test_the_page_carries_a_content_security_policy_and_no_sniffing(predictor):
    page = TestClient(create_app(predictor, token=TOKEN)).get("/worklist")
    policy = page.headers.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
    assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy
    assert page.headers.get("x-content-type-options") == "nosniff" and page.headers["cache-control"] == "no-store"


HOSTILE = {
    "PatientID": '<img src=x onerror="window.pwned=1">',
    "AccessionNumber": "<script>window.pwned=2</script>",
    "StudyDescription": "</dd><b>bold</b>" + "W" * 100,
}


@pytest.mark.slow
def test_the_page_runs_under_its_policy_and_shows_header_values_as_text(live_server, chromium, chest_files):
    path = chest_files["by_p"][-1]
    files = [("files", (path.name, edited(path, **HOSTILE), "application/dicom"))]
    assert httpx.post(f"{live_server}/v1/score", files=files, headers=AUTH, timeout=60).status_code == 200

    page = chromium.new_page(viewport={"width": 1200, "height": 700})
    page.add_init_script(
        "window.violations = []; document.addEventListener('securitypolicyviolation', e => window.violations.push(e.violatedDirective))"
    )
    response = page.goto(f"{live_server}/worklist")
    assert "frame-ancestors 'none'" in response.headers.get("content-security-policy", "")
    page.fill("#token", TOKEN)
    page.click("#save-token")
    page.wait_for_function("() => document.querySelectorAll('#worklist tbody tr').length === 1")
    page.click("#worklist tbody tr:first-child")
    page.wait_for_function("() => document.getElementById('overlay').complete && document.getElementById('overlay').naturalWidth > 0")
    cells = page.eval_on_selector_all("#worklist tbody td", "cells => cells.map(c => c.textContent)")
    assert HOSTILE["PatientID"] in cells and HOSTILE["AccessionNumber"] in cells
    assert HOSTILE["StudyDescription"][:100] in page.text_content("#detail-fields")
    assert page.evaluate("() => window.pwned") is None and page.evaluate("() => window.violations") == []
    assert page.eval_on_selector_all("#detail-fields b, #worklist img", "nodes => nodes.length") == 0


@pytest.mark.parametrize("token", ["clé-secret-1234", "clé-ŝecret-1234"])
def test_the_page_sends_a_token_beyond_ascii_as_the_service_compares_it(predictor, chromium, token):
    """The service compares a token as its UTF-8 bytes. The page sent 'é' as one Latin-1 byte (refused as a wrong
    token), and fetch refuses a header with 'ŝ' in it, which the page reported as a service that could not be reached."""
    with LiveServer(create_app(predictor, token=token)) as client:
        page = chromium.new_page()
        page.set_default_timeout(10_000)
        page.goto(f"{client.base_url}/worklist")
        page.wait_for_function("() => document.getElementById('status').textContent.includes('needs an access token')")
        page.fill("#token", token)
        page.click("#save-token")
        page.wait_for_function(
            "() => document.getElementById('updated').textContent !== '' || document.getElementById('status').textContent !== ''"
        )
        assert page.text_content("#status") == "" and page.text_content("#updated").startswith("List as of")
        page.close()


def test_an_urgent_study_stays_listed_when_newer_routine_studies_arrive(predictor, chest_files, monkeypatch):
    """The list shows the newest N studies: N less urgent arrivals would otherwise push an unread URGENT study off it."""
    from medtriage.serve.node import store

    by_priority = {path: predictor.priority(p) for path, p in chest_files["p"].items()}
    urgent = next(path for path in reversed(chest_files["by_p"]) if by_priority[path] == "URGENT")
    calm = chest_files["by_p"][0]  # the least suspicious file, and a copy of it as another study
    assert by_priority[calm] != "URGENT"
    later = [
        ("calm.dcm", calm.read_bytes()),
        ("calm-again.dcm", edited(calm, StudyInstanceUID=generate_uid(), SOPInstanceUID=generate_uid())),
    ]
    client = TestClient(create_app(predictor, token=TOKEN, worklist_size=1))
    for name, data in [(urgent.name, urgent.read_bytes()), *later]:
        assert upload(client, name, data).status_code == 200
    body = client.get("/v1/worklist", headers=AUTH).json()
    assert sorted(e["file"] for e in body["entries"]) == sorted([urgent.name, "calm-again.dcm"]) and body["evicted"] == 1
    shown_urgent = next(e for e in body["entries"] if e["file"] == urgent.name)
    assert client.get(shown_urgent["overlay"], headers=AUTH).status_code == 200

    monkeypatch.setattr(store, "URGENT_KEPT_S", -60)  # as if a day had passed
    body = client.get("/v1/worklist", headers=AUTH).json()
    assert [e["file"] for e in body["entries"]] == ["calm-again.dcm"] and body["evicted"] == 2


def test_a_picture_looks_its_study_up_once_and_reads_its_file_once(predictor, chest_files, tmp_path, monkeypatch):
    """Opening a picture not yet drawn looks its study up once (the lookup runs the list's query) and reads the spooled
    file once; opening it again only looks the study up."""
    from medtriage.serve import worklist as module

    client = TestClient(create_app(predictor, token=TOKEN, state=str(tmp_path / "state")))
    path = chest_files["by_p"][-1]
    upload(client, path.name, path.read_bytes())
    (entry,) = client.get("/v1/worklist", headers=AUTH).json()["entries"]
    reads = {"study": 0, "file": 0}
    study_by_id, read_dicom = NodeStore.study_by_id, module.read_dicom

    def counted_study(self, *args, **kwargs):
        reads["study"] += 1
        return study_by_id(self, *args, **kwargs)

    def counted_read(*args, **kwargs):
        reads["file"] += 1
        return read_dicom(*args, **kwargs)

    monkeypatch.setattr(NodeStore, "study_by_id", counted_study)
    monkeypatch.setattr(module, "read_dicom", counted_read)
    drawn = client.get(entry["overlay"], headers=AUTH)
    assert drawn.status_code == 200 and reads == {"study": 1, "file": 1}
    kept = client.get(entry["overlay"], headers=AUTH)
    assert kept.content == drawn.content and reads == {"study": 2, "file": 1}


def test_a_picture_drawn_while_a_request_waited_for_its_slot_is_not_drawn_again(predictor, chest_files, monkeypatch):
    from medtriage.serve import worklist as module

    worklist = Worklist(predictor)
    path = chest_files["by_p"][-1]
    assert isinstance(worklist.score_or_reject(path.read_bytes(), path.name), list)
    (entry,) = worklist.rows()
    png, waiting = worklist.kept_overlay(entry["id"])  # the study as the waiting request looked it up
    assert png is None
    drawn = worklist.overlay(entry["id"])  # another request, answered first
    draws, explain_frame = [], module.explain_frame
    monkeypatch.setattr(module, "explain_frame", lambda *args: draws.append(args) or explain_frame(*args))
    assert worklist.overlay(entry["id"], waiting) == drawn and draws == []
