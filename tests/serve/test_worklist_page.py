"""The worklist page as a radiologist meets it: each row's picture comes from the package that scored it, and the
page's own behaviour (out-of-scope marks, keyboard, refresh failures, answers that arrive late, local times) checked
in Chromium against canned answers, so no model or server is needed for those."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from starlette.exceptions import HTTPException

from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from medtriage.serve.worklist import Worklist, page_headers, worklist_page

CT = Path(get_testdata_file("CT_small.dcm"))  # outside the chest X-ray model's scope: scored and flagged here


def served(package_dir: Path) -> Predictor:
    return Predictor(load_package(package_dir), threads=1, allow_out_of_scope=True)


@pytest.fixture
def next_version(package_dir, tmp_path) -> Path:
    """The same model published as the package's next version (another package identity)."""
    copy = Path(shutil.copytree(package_dir, tmp_path / "next"))
    meta = json.loads((copy / "model.json").read_text())
    (copy / "model.json").write_text(json.dumps({**meta, "version": meta["version"] + 1}))
    return copy


def scored_before_restart(package_dir: Path, state: Path, draw: bool) -> None:
    """One CT scored by the package (its picture drawn or not), as the service left it when it stopped."""
    first = Worklist(served(package_dir), store=state)
    assert isinstance(first.score_or_reject(CT.read_bytes(), CT.name), list)
    if draw:
        (row,) = first.rows()
        first.overlay(row["id"])
    first.store.close()


def test_after_a_restart_with_another_package_a_row_shows_no_picture_that_package_drew(package_dir, next_version, tmp_path):
    scored_before_restart(package_dir, tmp_path / "state", draw=False)
    restarted = Worklist(served(next_version), store=tmp_path / "state")
    (row,) = restarted.rows()
    assert row["version"] == load_package(package_dir).version and row["overlay"] is None
    assert f"v{row['version']}" in row["overlay_unavailable"] and f"v{row['version'] + 1}" in row["overlay_unavailable"]
    with pytest.raises(HTTPException) as refused:
        restarted.overlay(row["id"])
    assert refused.value.status_code == 409 and "scored by" in refused.value.detail["reason"]
    detail = restarted.detail(row["id"])
    assert detail["thresholds"] is None and detail["saliency"] is None  # the served package's operating points did not set it


def test_a_picture_drawn_by_the_scoring_package_is_still_shown_after_a_restart(package_dir, next_version, tmp_path):
    scored_before_restart(package_dir, tmp_path / "state", draw=True)
    restarted = Worklist(served(next_version), store=tmp_path / "state")
    (row,) = restarted.rows()
    kept = restarted.store.overlay(restarted.detail(row["id"])["sop_uid"])
    assert row["overlay"] and row["overlay_unavailable"] is None
    assert restarted.overlay(row["id"]) == kept[0] and kept[1]["package"]["version"] == row["version"]


def test_a_kept_picture_that_names_no_package_is_not_trusted(package_dir, next_version, tmp_path):
    scored_before_restart(package_dir, tmp_path / "state", draw=False)
    restarted = Worklist(served(next_version), store=tmp_path / "state")
    (row,) = restarted.rows()
    restarted.store.save_overlay(restarted.detail(row["id"])["sop_uid"], b"drawn by whichever package was served", {"grid": 7})
    with pytest.raises(HTTPException):
        restarted.overlay(row["id"])


def with_calibration(package_dir: Path, target: Path, method: str) -> Path:
    """A copy of the package whose model.json says its graph applies a fitted temperature, or not ("none")."""
    copy = Path(shutil.copytree(package_dir, target))
    meta = json.loads((copy / "model.json").read_text())
    meta["calibration"]["method"], meta["output"]["calibrated"] = method, method != "none"
    (copy / "model.json").write_text(json.dumps(meta))
    return copy


def test_a_score_is_called_calibrated_only_when_the_served_output_is(package_dir, next_version, tmp_path):
    said = {}
    for method in ("temperature", "none"):
        worklist = Worklist(served(with_calibration(package_dir, tmp_path / method, method)))
        assert isinstance(worklist.score_or_reject(CT.read_bytes(), CT.name), list)
        (row,) = worklist.rows()
        said[method] = worklist.detail(row["id"])["calibrated"]
    assert said == {"temperature": True, "none": False}
    # a row another package scored says what its score recorded; one stored before scores recorded it: not known
    scored_before_restart(with_calibration(package_dir, tmp_path / "before", "none"), tmp_path / "state", draw=False)
    restarted = Worklist(served(next_version), store=tmp_path / "state")
    (row,) = restarted.rows()
    assert restarted.detail(row["id"])["calibrated"] is False
    restarted.store._execute("UPDATE instances SET result = json_remove(result, '$[0].calibrated')")
    assert restarted.detail(row["id"])["calibrated"] is None


# --- the page's behaviour in Chromium, against canned answers ------------------------------------

ORIGIN = "http://worklist.test"
PAGE = worklist_page()
RECEIVED = "2026-03-01T22:45:00+00:00"  # shown to a reader in India (UTC+05:30, no daylight saving) as the next morning
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc000000301010018dd8db40000000049454e44ae426082"
)


def entry(entry_id: str, priority: str | None = "routine", probability: float | None = 0.2, **fields) -> dict:
    """A row as GET /v1/worklist lists it (and, with `detail` keys, as GET /v1/worklist/{id} returns it)."""
    row = {
        "id": entry_id,
        "received": RECEIVED,
        "state": "scored" if priority else "received",
        "reason": None,
        "study_uid": f"1.2.{entry_id}",
        "instances": 1,
        "patient_id": f"P{entry_id}",
        "accession": f"ACC{entry_id}",
        "study_date": "2026-03-01",
        "study_description": "",
        "modality": "CR",
        "file": f"{entry_id}.dcm",
        "frame": None,
        "frames": 1,
        "finding": "pneumonia" if priority else None,
        "decision": "",
        "probability": probability,
        "priority": priority,
        "overlay": f"/v1/worklist/{entry_id}/overlay.png" if priority else None,
        "overlay_unavailable": None,
        "flags": [],
        "model": "tiny",
        "version": 1,
        "sha256": "ab" * 32,
    }
    return {**row, **fields}


def detail(row: dict) -> dict:
    thresholds = {"review": 0.3, "urgent": 0.7}
    probabilities = {"normal": 0.8, "pneumonia": 0.2}
    return {**row, "probabilities": probabilities, "positive_label": "pneumonia", "thresholds": thresholds, "calibrated": True}


class CannedService:
    """Answers the page's requests from `answers` (path -> (status, JSON or bytes)); paths in `hold` wait in `held`;
    with `down`, every request but the page's is refused as by a host that no longer listens."""

    def __init__(self, rows: list[dict], **listing):
        self.answers, self.hold, self.held, self.down = {}, set(), {}, False
        self.list(rows, **listing)

    def list(self, rows: list[dict], evicted: int = 0) -> None:
        model = {"name": "tiny", "version": 1, "sha256": "ab" * 32, "label": "tiny v1", "positive_label": "pneumonia"}
        self.answers["/v1/worklist"] = (200, {"model": model, "capacity": 50, "evicted": evicted, "count": len(rows), "entries": rows})
        for row in rows:
            self.answers[f"/v1/worklist/{row['id']}"] = (200, detail(row))
            self.answers[f"/v1/worklist/{row['id']}/overlay.png"] = (200, PNG)

    def __call__(self, route) -> None:
        path = route.request.url.removeprefix(ORIGIN)
        if path == "/worklist":
            route.fulfill(status=200, body=PAGE, content_type="text/html", headers=page_headers(PAGE))
        elif self.down:
            route.abort("connectionrefused")
        elif path in self.hold:
            self.held[path] = route
        else:
            self.fulfill(route, path)

    def fulfill(self, route, path: str) -> None:
        status, body = self.answers.get(path, (404, {"error": {"reason": f"nothing at {path}"}}))
        if isinstance(body, bytes):
            route.fulfill(status=status, body=body, content_type="image/png")
        else:
            route.fulfill(status=status, body=json.dumps(body), content_type="application/json")


@pytest.fixture
def open_page(chromium):
    """open_page(service): the worklist page in a reader's browser (Indian time), its requests answered by `service`."""
    contexts = []

    def opened(service: CannedService):
        context = chromium.new_context(timezone_id="Asia/Kolkata", viewport={"width": 1400, "height": 800})
        context.set_default_timeout(10_000)
        contexts.append(context)
        page = context.new_page()
        page.route(f"{ORIGIN}/**", service)
        page.goto(f"{ORIGIN}/worklist")
        page.wait_for_function("() => document.querySelectorAll('#worklist tbody tr').length > 0")
        return page

    yield opened
    for context in contexts:
        context.close()


def detail_text(page) -> str:
    return page.text_content("#detail-fields")


def test_a_row_without_a_picture_says_why_in_its_place(open_page):
    other = entry("1", "URGENT", 0.9, overlay=None, overlay_unavailable="no picture: scored by tiny v1 and the service now runs tiny v2")
    gone = entry("2", "review", 0.5)
    service = CannedService([other, gone])
    service.answers["/v1/worklist/1"] = (200, {**detail(other), "thresholds": None})
    service.answers["/v1/worklist/2/overlay.png"] = (410, {"error": {"reason": "the image of this study is no longer held"}})
    page = open_page(service)

    page.click("#worklist tbody tr[data-id='1']")
    page.wait_for_selector("#overlay-note:not([hidden])")
    assert page.text_content("#overlay-note") == "Picture unavailable: " + other["overlay_unavailable"]
    assert page.is_hidden("#overlay") and "not the served model's" in detail_text(page)

    page.click("#worklist tbody tr[data-id='2']")
    page.wait_for_function("() => document.getElementById('overlay-note').textContent.includes('no longer held')")
    assert page.is_hidden("#overlay")


def test_an_out_of_scope_score_is_marked_in_its_row_and_details(open_page):
    page = open_page(CannedService([entry("1", "URGENT", 0.95, flags=["out_of_scope:modality"]), entry("2")]))
    flagged, plain = page.eval_on_selector_all("#worklist tbody tr", "rows => rows.map(r => r.cells[0].textContent)")
    assert "out of scope: modality" in flagged and "out of scope" not in plain
    page.click("#worklist tbody tr[data-id='1']")
    page.wait_for_function("() => document.getElementById('detail-fields').textContent.includes('outside what the model')")


def test_rows_are_reached_and_opened_with_the_keyboard_and_keep_focus_on_refresh(open_page):
    page = open_page(CannedService([entry("1", "URGENT", 0.9), entry("2", "review", 0.4)]))
    page.focus("#refresh")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.dataset.id") == "2"
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.getElementById('detail-title').textContent.includes('ACC2')")
    assert page.get_attribute("#worklist tbody tr[data-id='2']", "aria-current") == "true"
    page.evaluate("loadWorklist()")  # the rows are rebuilt: the keyboard stays on the same study
    assert page.evaluate("() => document.activeElement.dataset.id") == "2"


def test_a_failed_refresh_marks_the_list_out_of_date_until_one_succeeds(open_page):
    service = CannedService([entry("1")])
    page = open_page(service)
    page.wait_for_function("() => document.getElementById('updated').textContent.startsWith('List as of')")
    service.answers["/v1/worklist"] = (503, {"error": {"reason": "the service is busy"}})
    page.evaluate("loadWorklist()")
    assert "may be out of date" in page.text_content("#updated") and "busy" in page.text_content("#status")
    assert "stale" in page.get_attribute("#worklist", "class")
    service.list([entry("1"), entry("2")])
    page.evaluate("loadWorklist()")
    assert page.text_content("#status") == "" and "stale" not in page.get_attribute("#worklist", "class")


def test_the_open_study_follows_the_list(open_page):
    service = CannedService([entry("1", None, None), entry("2")])
    page = open_page(service)
    page.click("#worklist tbody tr[data-id='1']")
    page.wait_for_function("() => document.getElementById('detail-title').textContent.startsWith('received')")
    service.list([entry("1", "URGENT", 0.9), entry("2")])  # scored since the page fetched it
    page.evaluate("loadWorklist()")
    page.wait_for_function("() => document.getElementById('detail-title').textContent.startsWith('URGENT')")
    service.list([entry("2")], evicted=1)  # gone from the list
    page.evaluate("loadWorklist()")
    assert page.is_hidden("#detail") and "1 older studies are not listed" in page.text_content("#more")


def test_a_late_answer_for_a_row_left_never_shows_under_the_row_chosen(open_page):
    service = CannedService([entry("1", "URGENT", 0.9), entry("2", "review", 0.4)])
    page = open_page(service)
    service.hold.add("/v1/worklist/1")
    page.click("#worklist tbody tr[data-id='1']")
    page.click("#worklist tbody tr[data-id='2']")
    page.wait_for_function("() => document.getElementById('detail-title').textContent.includes('ACC2')")
    with page.expect_response(f"{ORIGIN}/v1/worklist/1"):
        service.fulfill(service.held["/v1/worklist/1"], "/v1/worklist/1")
    page.evaluate("() => new Promise((done) => setTimeout(done, 50))")  # the late answer's handlers run
    assert "ACC2" in page.text_content("#detail-title") and "P2" in detail_text(page)


def test_a_study_chosen_never_shows_the_details_of_the_one_open_before(open_page):
    service = CannedService([entry("1", "URGENT", 0.9), entry("2", "review", 0.4)])
    page = open_page(service)
    page.click("#worklist tbody tr[data-id='1']")
    page.wait_for_function("() => document.getElementById('detail-title').textContent.includes('ACC1')")
    service.hold.add("/v1/worklist/2")
    page.click("#worklist tbody tr[data-id='2']")  # while its details are on their way, study 1's are not shown
    assert page.is_hidden("#detail")
    service.held["/v1/worklist/2"].fulfill(status=503, body=json.dumps({"error": {"reason": "the service is busy"}}))
    page.wait_for_function("() => document.getElementById('status').textContent.includes('busy')")
    assert page.is_hidden("#detail") and "ACC2" in page.text_content("#status")
    service.hold.clear()
    page.evaluate("loadWorklist()")  # the next list tries again
    page.wait_for_function("() => document.getElementById('detail-title').textContent.includes('ACC2')")
    assert page.text_content("#status") == ""


def test_an_unreachable_service_or_a_refused_token_says_what_to_do(open_page):
    service = CannedService([entry("1")])
    page = open_page(service)
    service.down = True
    page.evaluate("loadWorklist()")
    status = page.text_content("#status")
    assert "could not be reached" in status and ORIGIN in status and "may be out of date" in page.text_content("#updated")
    service.down = False
    service.answers["/v1/worklist"] = (401, {"error": {"reason": "missing or wrong bearer token"}})
    page.fill("#token", "expired")
    page.click("#save-token")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('refused the access token')")


def test_times_are_shown_in_the_readers_zone_with_its_offset(open_page):
    page = open_page(CannedService([entry("1")]))
    expected = "2026-03-02 04:15 (UTC+05:30)"
    assert expected in page.eval_on_selector_all("#worklist tbody td", "cells => cells.map(c => c.textContent)")
    page.click("#worklist tbody tr[data-id='1']")
    page.wait_for_function(f"() => document.getElementById('detail-fields').textContent.includes({expected!r})")


def test_the_probability_is_called_calibrated_only_when_it_is(open_page):
    rows = [entry("1", "URGENT", 0.9), entry("2", "review", 0.4), entry("3", "review", 0.5, version=2)]
    service = CannedService(rows)
    for row, calibrated in zip(rows, (True, False, None)):
        service.answers[f"/v1/worklist/{row['id']}"] = (200, {**detail(row), "calibrated": calibrated})
    page = open_page(service)
    said = {}
    for row in rows:
        page.click(f"#worklist tbody tr[data-id='{row['id']}']")
        page.wait_for_function(f"() => document.getElementById('detail-title').textContent.includes('ACC{row['id']}')")
        said[row["id"]] = page.evaluate("""() => [...document.querySelectorAll('#detail-fields dt')]
            .find((dt) => dt.textContent === 'p(pneumonia)').nextElementSibling.textContent""")
    assert said == {"1": "0.900 (calibrated)", "2": "0.400 (score, not calibrated)", "3": "0.500 (calibration of tiny v2 not known)"}


READS_LEFT_TO_RIGHT = """(text) => {  // whether `text`, where the page shows it, runs left to right on the screen
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const at = node.data.indexOf(text);
    if (at < 0) continue;
    const left = (i) => { const r = document.createRange(); r.setStart(node, i); r.setEnd(node, i + 1); return r.getBoundingClientRect().left; };
    return left(at) < left(at + text.length - 1);
  }
  return null;
}"""


def test_a_name_with_direction_marks_does_not_turn_the_words_after_it_around(open_page):
    """A file name or accession carrying a right-to-left override (U+202E) reversed everything after it on its line:
    the reason a file was refused, or what to do when a study's details could not be fetched, read back to front."""
    service = CannedService([entry("1", "URGENT", 0.9, accession="\u202eACC1")])
    refusal = "not a DICOM file (no preamble)"
    rejected = [{"file": "\u202eevil.dcm", "reason": refusal, "error": "DicomError"}]
    service.answers["/v1/score"] = (422, {"error": {"reason": "no file could be scored"}, "results": [], "rejected": rejected})
    service.answers["/v1/worklist/1"] = (503, {"error": {"reason": "the service is busy", "hint": "retry in a minute"}})
    page = open_page(service)
    page.set_input_files("#files", {"name": "evil.dcm", "mimeType": "application/dicom", "buffer": b"DICM"})
    page.click("#upload")
    page.wait_for_function("() => document.getElementById('rejected').textContent.includes('no preamble')")
    assert page.evaluate(READS_LEFT_TO_RIGHT, refusal) is True
    page.click("#worklist tbody tr[data-id='1']")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('busy')")
    assert page.evaluate(READS_LEFT_TO_RIGHT, "retry in a minute") is True
