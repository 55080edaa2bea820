"""Worklist rows: the source each study came from (and whether that source drifts), a list bounded however many
urgent studies arrive, and a list read in a fixed number of queries with the same answer as row-by-row reads."""

from __future__ import annotations

import json
import sqlite3
import time

from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from medtriage.serve.http import create_app
from medtriage.serve.node.header import read_identity
from medtriage.serve.node.store import NodeStore
from medtriage.serve.worklist import Worklist, worklist_router
from tests.serve.node.peers import cr_study
from tests.serve.test_http_edges import LiveServer
from tests.serve.test_worklist_page import CannedService, entry, open_page  # noqa: F401 (fixture)

TOKEN = "rows-token-7e21"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def upload(client, path, source: str | None = None):
    headers = {**AUTH, **({"X-Source": source} if source is not None else {})}
    return client.post("/v1/score", files=[("files", (path.name, path.read_bytes(), "application/dicom"))], headers=headers)


def flag_drift(monitor, source: str) -> None:
    """Enough far-off inputs from `source` for its window to drift from the package's reference."""
    for _ in range(monitor.drift.min_images):
        monitor.drift.observe(source, {"input_mean": 50.0, "probability": 1.0, "ood_score": 1e6})
    assert monitor.drift.drifting(source)


def record_scored(store: NodeStore, package, priority: str, probability: float, version: int | None = None) -> str:
    """A study of one instance scored as `priority` (by the package, or by its `version`), closed as the node does."""
    sop, study = generate_uid(), generate_uid()
    score = {
        "file": f"{sop}.dcm",
        "frame": None,
        "finding": package.positive_label,
        "probability": probability,
        "priority": priority,
        "probabilities": {package.positive_label: probability},
        "sop_uid": sop,
        "study_uid": study,
        "series_uid": "1.2.3",
        "modality": "CR",
        "model": package.name,
        "version": version or package.version,
        "sha256": package.sha256,
        "decision": "",
        "flags": [],
    }
    fields = {"patient_id": f"P-{priority}", "accession": sop[-8:], "study_date": "", "study_description": "", "modality": "CR"}
    store.record_instance(
        sop, study, "1.2.3", "1.2.840.10008.5.1.4.1.1.1", "", fields, "CR_ROOM_1", state="scored", result=json.dumps([score])
    )
    assert store.close_study(study, score, None, None, [], time.time())
    return study


# --- the source of each study ----------------------------------------------------------------------


def test_an_upload_is_listed_with_its_source_and_marked_while_that_source_drifts(safe_predictor, tmp_path):
    ward, plain, hostile = (cr_study(tmp_path / name, 1, seed=seed)[0] for seed, name in enumerate(("ward", "plain", "hostile")))
    app = create_app(safe_predictor, token=TOKEN)
    with LiveServer(app) as client:
        assert upload(client, ward, "ward-3").status_code == 200
        assert upload(client, plain).status_code == 200
        assert upload(client, hostile, "../../etc/passwd<b>" + "x" * 200).status_code == 200
        rows = {row["accession"]: row for row in client.get("/v1/worklist", headers=AUTH).json()["entries"]}
        sources = {accession: row["source"] for accession, row in rows.items()}
        assert sources == {"ACC00000": "ward-3", "ACC00001": "default", "ACC00002": ".._.._etc_passwd_b_" + "x" * 45}
        assert not any(row["source_drifting"] for row in rows.values())

        flag_drift(app.state.monitor, "ward-3")
        listed = {row["accession"]: row for row in client.get("/v1/worklist", headers=AUTH).json()["entries"]}
        assert {accession: row["source_drifting"] for accession, row in listed.items()} == {
            "ACC00000": True,
            "ACC00001": False,
            "ACC00002": False,
        }
        detail = client.get(f"/v1/worklist/{listed['ACC00000']['id']}", headers=AUTH).json()
        assert detail["source"] == "ward-3" and detail["source_drifting"] is True


def test_a_study_from_the_node_is_listed_under_its_calling_ae_title(predictor, tmp_path):
    store = NodeStore(tmp_path / "state")
    (path,) = cr_study(tmp_path / "in", 1, seed=4)
    header = read_identity(path)
    store.receive(path.read_bytes(), header.sop_uid, header.study_uid, header.series_uid, header.sop_class, header.fields, "CR ROOM/2")
    (row,) = Worklist(predictor, store=store).rows()
    assert row["state"] == "received" and row["source"] == "CR ROOM_2"  # the name the node's drift monitor uses


def test_a_state_folder_from_before_sources_gains_the_column_and_keeps_its_rows(predictor, tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    old = sqlite3.connect(folder / "node.sqlite")
    old.executescript(
        "CREATE TABLE instances (sop_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT, sop_class TEXT, "
        "spool TEXT NOT NULL, name TEXT, calling_aet TEXT, received REAL NOT NULL, state TEXT NOT NULL DEFAULT 'received', "
        "result TEXT, reason TEXT);"
        "INSERT INTO instances VALUES ('1.1', '9.9', '1.2', '1.3', 'x.dcm', 'a.dcm', 'HTTP', 0, 'received', NULL, NULL);"
        "INSERT INTO instances VALUES ('1.2', '9.8', '1.2', '1.3', 'y.dcm', 'b.dcm', 'MODALITY', 0, 'received', NULL, NULL);"
        "CREATE TABLE studies (id INTEGER PRIMARY KEY, study_uid TEXT UNIQUE NOT NULL, state TEXT NOT NULL, "
        "first_received REAL, last_received REAL, updated REAL, fields TEXT, top_sop TEXT, priority TEXT, probability REAL, "
        "finding TEXT, reason TEXT, sr_uid TEXT);"
        "INSERT INTO studies (study_uid, state, last_received, fields) VALUES ('9.9', 'receiving', 1, '{}'), ('9.8', 'receiving', 0, '{}');"
    )
    old.close()
    for _ in range(2):  # opened again: the column is there already
        store = NodeStore(folder)
        rows = Worklist(predictor, store=store).rows()
        store.close()
    assert [(row["instances"], row["source"]) for row in rows] == [(1, "MODALITY"), (1, None)]  # an old upload's source is unknown


def test_the_page_shows_each_rows_source_and_marks_a_drifting_one(open_page):  # noqa: F811
    drifting = entry("1", "URGENT", 0.9, source="ward-3", source_drifting=True)
    calm = entry("2", "routine", 0.1, source="CR_ROOM_1", source_drifting=False)
    page = open_page(CannedService([drifting, calm]))
    marked = page.eval_on_selector_all("#worklist tbody tr", "rows => rows.map(r => [r.dataset.id, r.dataset.drifting])")
    assert marked == [["1", "true"], ["2", "false"]]
    cells = page.eval_on_selector_all("#worklist tbody tr", "rows => rows.map(r => r.textContent)")
    assert "ward-3" in cells[0] and "drift" in cells[0] and "CR_ROOM_1" in cells[1] and "drift" not in cells[1]
    page.click("#worklist tbody tr[data-id='1']")
    page.wait_for_function("() => document.getElementById('detail-fields').textContent.includes('ward-3')")
    assert "drift" in page.text_content("#detail-fields")


def test_the_page_says_how_many_urgent_studies_it_leaves_out(open_page):  # noqa: F811
    service = CannedService([entry("1", "URGENT", 0.9)], evicted=5)
    service.answers["/v1/worklist"][1]["urgent_not_listed"] = 3
    page = open_page(service)
    page.wait_for_function("() => !document.getElementById('more').hidden")
    assert "5 older studies are not listed, 3 of them URGENT" in page.text_content("#more")
    assert page.get_attribute("#more", "class") == "urgent"


# --- a bounded list ----------------------------------------------------------------------------------


def test_a_flood_of_urgent_studies_lists_at_most_capacity_of_them_and_counts_the_rest(predictor, tmp_path):
    app = create_app(predictor, token=TOKEN, worklist_size=2, state=str(tmp_path / "state"))
    node = NodeStore(tmp_path / "state")  # the node writes the same folder
    urgent = [record_scored(node, predictor.package, "URGENT", 0.9 + k / 100) for k in range(6)]
    calm = [record_scored(node, predictor.package, "routine", 0.1) for _ in range(2)]  # the newest two
    client = TestClient(app)
    body = client.get("/v1/worklist", headers=AUTH).json()
    assert body["count"] == len(body["entries"]) == 4 and body["evicted"] == 4 and body["urgent_not_listed"] == 4
    assert sorted(row["study_uid"] for row in body["entries"]) == sorted(calm + urgent[-2:])  # the newest urgent ones
    assert client.get("/v1/worklist/1", headers=AUTH).status_code == 404  # the oldest urgent study, not listed


# --- a fixed number of queries, the same answer ------------------------------------------------------


def traced_listing(worklist: Worklist) -> tuple[dict, list[str]]:
    app = FastAPI()
    app.include_router(worklist_router(worklist))
    statements: list[str] = []
    worklist.store._db.set_trace_callback(statements.append)
    try:
        body = TestClient(app).get("/v1/worklist").json()
    finally:
        worklist.store._db.set_trace_callback(None)
    return body, statements


def test_the_list_takes_the_same_few_queries_however_many_rows_it_shows(predictor):
    worklist = Worklist(predictor, capacity=20)
    for k in range(3):
        record_scored(worklist.store, predictor.package, "review", 0.5 + k / 100)
    few, few_statements = traced_listing(worklist)
    for k in range(9):
        record_scored(worklist.store, predictor.package, "URGENT", 0.9 + k / 100, version=predictor.package.version + 1)
    many, many_statements = traced_listing(worklist)
    assert (few["count"], many["count"]) == (3, 12)
    assert len(many_statements) == len(few_statements) <= 2, many_statements


def test_every_kind_of_row_reads_as_before(predictor, tmp_path):
    """Uploads of several instances, studies the node is receiving or could not analyse, and studies another
    package scored (with and without the picture it drew): each row and detail as the row-by-row reads gave them."""
    worklist = Worklist(predictor, store=tmp_path / "state")
    store, package = worklist.store, predictor.package
    first, second = cr_study(tmp_path / "two", 2, seed=7)
    for path in (first, second):
        assert isinstance(worklist.score_or_reject(path.read_bytes(), path.name), list)
    (queued,) = cr_study(tmp_path / "queued", 1, seed=8)
    (refused,) = cr_study(tmp_path / "refused", 1, seed=9)
    for path in (queued, refused):
        h = read_identity(path)
        store.receive(path.read_bytes(), h.sop_uid, h.study_uid, h.series_uid, h.sop_class, h.fields, "CR_ROOM_1")
    store.set_rejected(read_identity(refused).sop_uid, "truncated pixel data")
    assert store.close_study(read_identity(refused).study_uid, None, "truncated pixel data", None, [], time.time())
    other = record_scored(store, package, "URGENT", 0.97, version=package.version + 1)
    drawn = record_scored(store, package, "review", 0.6, version=package.version + 1)
    drawn_sop = store.study_instances(drawn)[0]["sop_uid"]
    store.save_overlay(drawn_sop, b"png", {"grid": 7, "package": {**package.identity(), "version": package.version + 1}})

    rows = {row["study_uid"]: row for row in worklist.rows()}
    upload_row = rows[read_identity(first).study_uid]
    order = [row["study_uid"] for row in worklist.rows()]
    assert order.index(other) < order.index(drawn) and order[-2:] == [read_identity(p).study_uid for p in (refused, queued)]
    assert (upload_row["instances"], upload_row["state"], upload_row["model"]) == (2, "scored", package.name)
    assert upload_row["overlay"] == f"/v1/worklist/{upload_row['id']}/overlay.png" and upload_row["overlay_unavailable"] is None
    assert upload_row["file"] in (first.name, second.name) and upload_row["patient_id"] == "PSEUDO-1"
    waiting = rows[read_identity(queued).study_uid]
    assert (waiting["state"], waiting["priority"], waiting["file"], waiting["instances"]) == ("received", None, None, 1)
    not_analysed = rows[read_identity(refused).study_uid]
    assert (not_analysed["state"], not_analysed["reason"], not_analysed["overlay"]) == ("not analysed", "truncated pixel data", None)
    assert rows[other]["overlay"] is None and f"v{package.version + 1}" in rows[other]["overlay_unavailable"]
    assert rows[other]["version"] == package.version + 1 and rows[other]["priority"] == "URGENT"
    assert rows[drawn]["overlay"] and rows[drawn]["overlay_unavailable"] is None

    assert worklist.detail(rows[drawn]["id"])["saliency"]["grid"] == 7 and worklist.overlay(rows[drawn]["id"]) == b"png"
    assert worklist.detail(rows[other]["id"])["thresholds"] is None and worklist.detail(rows[other]["id"])["saliency"] is None
    assert worklist.detail(upload_row["id"])["thresholds"]["review"] == package.review_threshold
