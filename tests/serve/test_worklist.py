"""The worklist: JSON endpoints (in-process app), `score --overlays`, and the page in a real browser on a real server."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.data import get_testdata_file

from medtriage.cli import main
from medtriage.serve.http import create_app
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor, Rejection
from medtriage.serve.worklist import PRIORITY_RANK

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "worklist-token-51c2"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MULTIFRAME = get_testdata_file("OBXXXX1A_2frame.dcm")


@pytest.fixture(scope="module")
def chest_files(tmp_path_factory, predictor) -> dict:
    """Simulated hospital chest X-rays (real PneumoniaMNIST images as site DICOM): scorable files by p, and a broken one."""
    from medtriage.data.simulate.sites import make_sites

    out = tmp_path_factory.mktemp("sites")
    make_sites(out_dir=out, limit=18)
    scored, broken = {}, []
    for path in sorted(out.rglob("*.dcm")):
        outcome = predictor.score_or_reject(path, str(path))
        if isinstance(outcome, Rejection):
            broken += [path] if "truncated" in outcome.reason else []
        else:
            scored[path] = outcome[0].probability
    assert len(scored) >= 6 and broken
    return {"by_p": sorted(scored, key=scored.get), "p": scored, "broken": broken[0]}


def app_client(predictor, **kwargs) -> TestClient:
    return TestClient(create_app(predictor, token=TOKEN, **kwargs))


def upload(client, *paths):
    files = [("files", (Path(p).name, Path(p).read_bytes(), "application/dicom")) for p in paths]
    return client.post("/v1/score", files=files, headers=AUTH)


def expected_order(entries: list[dict]) -> list[str]:
    return [e["id"] for e in sorted(entries, key=lambda e: (PRIORITY_RANK[e["priority"]], -e["probability"]))]


def test_studies_without_a_score_come_before_the_routine_ones_not_after():
    """Before, received and not-analysed studies came last, under every study the model called routine: read last,
    where without the model they would have been read in turn."""
    from medtriage.serve.worklist import _sort_key

    def study(entry_id: int, priority: str | None, probability: float | None = None) -> dict:
        return {"id": str(entry_id), "priority": priority, "probability": probability}

    entries = [study(1, "routine", 0.1), study(2, None), study(3, "review", 0.6), study(4, "URGENT", 0.9), study(5, None)]
    assert [e["id"] for e in sorted(entries, key=_sort_key)] == ["4", "3", "5", "2", "1"]


def test_scored_files_are_listed_most_urgent_first_with_study_fields(predictor, chest_files):
    client = app_client(predictor)
    picked = chest_files["by_p"][::3]
    response = upload(client, *picked, chest_files["broken"])
    assert response.status_code == 200 and len(response.json()["rejected"]) == 1
    body = client.get("/v1/worklist", headers=AUTH).json()
    entries = body["entries"]
    assert body["count"] == len(picked) == len(entries) and body["model"]["name"] == predictor.package.name
    assert [e["id"] for e in entries] == expected_order(entries)
    assert {e["priority"] for e in entries} == {predictor.priority(chest_files["p"][p]) for p in picked}
    for entry in entries:
        header = pydicom.dcmread(next(p for p in picked if p.name == entry["file"]), stop_before_pixels=True)
        assert entry["patient_id"] == header.PatientID and entry["accession"] == header.AccessionNumber
        assert entry["study_date"].replace("-", "") == header.StudyDate
        assert entry["probability"] == pytest.approx(chest_files["p"][next(p for p in picked if p.name == entry["file"])], abs=1e-5)


def test_a_row_has_details_and_an_overlay_drawn_once(predictor, chest_files):
    client = app_client(predictor)
    path = chest_files["by_p"][-1]
    upload(client, path)
    (entry,) = client.get("/v1/worklist", headers=AUTH).json()["entries"]
    detail = client.get(f"/v1/worklist/{entry['id']}", headers=AUTH).json()
    assert sum(detail["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert detail["thresholds"]["review"] == predictor.package.review_threshold and detail["saliency"] is None
    assert detail["sop_uid"] == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID

    png = client.get(entry["overlay"], headers=AUTH)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    rows = pydicom.dcmread(path, stop_before_pixels=True).Rows
    assert Image.open(io.BytesIO(png.content)).size == (rows, rows)  # the site images are square, below 512
    assert client.get(entry["overlay"], headers=AUTH).content == png.content
    saliency = client.get(f"/v1/worklist/{entry['id']}", headers=AUTH).json()["saliency"]
    assert saliency["grid"] == 7 and saliency["ms"] > 0


def test_a_multiframe_file_is_one_row_at_its_most_suspicious_frame(package_dir):
    # The only multi-frame sample is an ultrasound: outside a chest X-ray model's scope, so scored and flagged.
    client = app_client(Predictor(load_package(package_dir), threads=1, allow_out_of_scope=True))
    results = upload(client, MULTIFRAME).json()["results"]
    (entry,) = client.get("/v1/worklist", headers=AUTH).json()["entries"]
    top = max(results, key=lambda r: r["probability"])
    assert entry["frames"] == len(results) == 2 and entry["frame"] == top["frame"]
    assert entry["probability"] == pytest.approx(top["probability"])
    assert client.get(entry["overlay"], headers=AUTH).status_code == 200


def test_the_worklist_keeps_only_the_newest_rows(predictor, chest_files):
    client = app_client(predictor, worklist_size=2)
    first, *rest = chest_files["by_p"][:3]
    upload(client, first)
    (oldest,) = client.get("/v1/worklist", headers=AUTH).json()["entries"]
    upload(client, *rest)
    body = client.get("/v1/worklist", headers=AUTH).json()
    assert body["count"] == 2 and body["evicted"] == 1
    assert {e["file"] for e in body["entries"]} == {p.name for p in rest}
    gone = client.get(oldest["overlay"], headers=AUTH)
    assert gone.status_code == 404 and "no worklist entry" in gone.json()["error"]["reason"]


def test_the_page_is_open_and_its_data_needs_the_token(predictor):
    client = app_client(predictor)
    page = client.get("/worklist")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "MedTriage worklist" in page.text and "sessionStorage" in page.text
    for path in ("/v1/worklist", "/v1/worklist/abc", "/v1/worklist/abc/overlay.png"):
        assert client.get(path).status_code == 401
    assert client.get("/v1/worklist/abc", headers=AUTH).status_code == 404


def test_score_writes_an_overlay_per_file_and_the_sr_still(capsys, package_dir, chest_files, tmp_path):
    ct = get_testdata_file("CT_small.dcm")
    inputs = [chest_files["by_p"][-1], ct, MULTIFRAME, chest_files["broken"]]
    code = main(
        [
            "score",
            str(package_dir),
            *map(str, inputs),
            "--overlays",
            str(tmp_path / "png"),
            "--sr",
            str(tmp_path / "sr"),
            "--json",
            "--allow-out-of-scope",
        ]
    )  # the CT and the ultrasound are scored and flagged
    document = json.loads(capsys.readouterr().out)
    assert code == 1 and len(document["rejected"]) == 1  # the broken file, with its reason
    sops = {r["sop_uid"] for r in document["results"]}
    # <SOP UID>.<digest of the source>.overlay.png: one per scored file
    assert sorted(p.name.removesuffix(".overlay.png").rsplit(".", 1)[0] for p in (tmp_path / "png").iterdir()) == sorted(sops)
    assert len(list((tmp_path / "sr").glob("*.SR.dcm"))) == len(sops)
    (ct_png,) = (tmp_path / "png").glob(f"{pydicom.dcmread(ct).SOPInstanceUID}.*.overlay.png")
    ct_png = Image.open(ct_png)
    assert ct_png.size == (128, 128) and ct_png.mode == "RGB"


def test_overlays_are_drawn_without_torch(package_dir, tmp_path, run_without_training_stack):
    out = run_without_training_stack(f"""
        import sys
        from medtriage.serve.package import load_package
        from medtriage.serve.predictor import Predictor
        from medtriage.serve.saliency import write_overlay
        predictor = Predictor(load_package({str(package_dir)!r}), allow_out_of_scope=True)
        path = {get_testdata_file("CT_small.dcm")!r}
        print(write_overlay(predictor, path, predictor.score_file(path), {str(tmp_path)!r}))
        print(sorted(m for m in sys.modules if m.split(".")[0] in Blocker.blocked))
        """)
    assert out.returncode == 0, out.stderr
    written, heavy = out.stdout.strip().splitlines()[-2:]
    assert written.endswith(".overlay.png") and heavy == "[]"


# --- the page in a real browser ------------------------------------------------------------------

LIVE_WORKLIST_SIZE = 50


@pytest.fixture
def live_server(package_dir):
    import httpx

    from tests.serve.test_serve_http import _wait_until_up, free_port

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "medtriage.cli",
        "serve",
        str(package_dir),
        "--port",
        str(port),
        "--threads",
        "1",
        "--worklist-size",
        str(LIVE_WORKLIST_SIZE),
    ]
    process = subprocess.Popen(
        command, env={**os.environ, "MEDTRIAGE_TOKEN": TOKEN}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        _wait_until_up(client, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        client.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


@pytest.mark.slow
def test_a_radiologist_uploads_studies_and_opens_the_most_urgent(live_server, chromium, chest_files, predictor, tmp_path):
    by_p = chest_files["by_p"]
    uploads = [by_p[0], by_p[-1], by_p[len(by_p) // 2], chest_files["broken"]]  # not in priority order
    page = chromium.new_page(viewport={"width": 1400, "height": 720})
    page.goto(f"{live_server}/worklist")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('access token')")

    page.fill("#token", TOKEN)
    page.click("#save-token")
    page.set_input_files("#files", [str(p) for p in uploads])
    page.click("#upload")
    page.wait_for_function("() => document.querySelectorAll('#worklist tbody tr').length === 3")
    assert "3 image(s) scored, 1 file(s) rejected" in page.text_content("#status")
    assert "truncated" in page.text_content("#rejected")

    rows = page.eval_on_selector_all("#worklist tbody tr", "rows => rows.map(r => [r.dataset.priority, +r.dataset.probability])")
    assert rows == sorted(rows, key=lambda r: (PRIORITY_RANK[r[0]], -r[1]))
    assert rows[0][1] == pytest.approx(chest_files["p"][by_p[-1]], abs=1e-5)
    assert [r[0] for r in rows] == [predictor.priority(chest_files["p"][p]) for p in (by_p[-1], by_p[len(by_p) // 2], by_p[0])]

    page.click("#worklist tbody tr:first-child")
    page.wait_for_function("() => document.getElementById('overlay').complete && document.getElementById('overlay').naturalWidth > 0")
    assert by_p[-1].name in page.text_content("#detail-fields") and rows[0][0] in page.text_content("#detail-title")
    assert page.is_visible("#detail") and "calibrated" in page.text_content("#detail-fields")
    screenshot = tmp_path / "worklist.png"
    page.screenshot(path=str(screenshot))
    assert Image.open(screenshot).size == (1400, 720)
    if os.environ.get("MEDTRIAGE_UPDATE_SCREENSHOTS"):  # refresh the documentation's picture on request
        shutil.copy(screenshot, ROOT / "docs" / "images" / "worklist.png")
    assert np.asarray(Image.open(screenshot)).std() > 10  # a rendered page, not a blank one
    import httpx

    listing = httpx.get(f"{live_server}/v1/worklist", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    assert listing["capacity"] == LIVE_WORKLIST_SIZE and listing["count"] == 3  # `serve --worklist-size` reached the page
