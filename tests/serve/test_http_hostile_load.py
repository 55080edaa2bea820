"""The HTTP service under hostile input and load, on a real loopback server: form fields that would be held in memory
while a request waits, pictures drawn beyond the working slots, an SR that cannot be built, and the reduced
JPEG 2000 decode on every scoring route."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medtriage.errors import ConfigError
from medtriage.serve import worklist as worklist_module
from medtriage.serve.admission import Admission
from medtriage.serve.http import create_app
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from medtriage.serve.uploads import FORM_FIELD_BYTES
from tests.io.test_dicom import sample_file
from tests.serve.test_http_edges import LiveServer

TOKEN = "hostile-token-51c2"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CT = get_testdata_file("CT_small.dcm")


def _ct(**values) -> bytes:
    """CT_small as a new instance, with some header elements replaced (None deletes one)."""
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = generate_uid()
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def test_form_fields_beside_the_files_are_bounded_in_all(predictor):
    """Starlette bounds each non-file field (1 MB), not their sum: a request of many fields held up to its whole body
    in memory while it waited for a slot. The service reads no field, so a few KB is all a client needs."""
    fields = {"note": ["x" * 60_000] * (2 * FORM_FIELD_BYTES // 60_000 + 1)}  # each field well under Starlette's bound
    with LiveServer(create_app(predictor, token=TOKEN)) as client:
        refused = client.post("/v1/score", data=fields, files=[("files", ("a.dcm", _ct()))], headers=AUTH)
        few = client.post("/v1/score", data={"note": "chest"}, files=[("files", ("a.dcm", _ct()))], headers=AUTH)
    assert refused.status_code == 413, refused.text[:300]
    error = refused.json()["error"]
    assert "fields" in error["reason"] and "'files'" in error["hint"]
    assert few.status_code == 200  # a small field beside the files is no harm


def test_an_sr_that_cannot_be_built_says_which_file_and_what_to_do(predictor):
    """A file without a Study Instance UID scores, but no SR can reference it: the refusal names the file, the error
    type and the builder's hint, as every other refusal of /v1/sr does."""
    with LiveServer(create_app(predictor, token=TOKEN)) as client:
        files = [("files", ("no-study.dcm", _ct(StudyInstanceUID=None), "application/dicom"))]
        response = client.post("/v1/sr", files=files, headers=AUTH)
    assert response.status_code == 422, response.text[:300]
    error = response.json()["error"]
    assert "no SR could be built" in error["reason"] and error["hint"] and "header" in error["hint"]
    assert (error["file"], error["type"]) == ("no-study.dcm", "DicomError")


def test_serve_with_the_reduced_jpeg2000_decode_takes_it_for_uploads_too(package_dir):
    """`serve --reduced-j2k` decoded only /v1/sr's files reduced: /v1/score (the worklist's route) decoded every
    JPEG 2000 upload in full, at the cost the option exists to avoid."""
    reduced = Predictor(load_package(package_dir), threads=1, allow_out_of_scope=True, reduced_j2k=True)
    path = sample_file("RG1_J2KR.dcm")
    with LiveServer(create_app(reduced, token=TOKEN)) as client:
        response = client.post("/v1/score", content=open(path, "rb").read(), headers={**AUTH, "Content-Type": "application/dicom"})
    assert response.status_code == 200, response.text[:300]
    assert response.json()["results"][0]["probability"] == reduced.score_file(path)[0].probability


def test_pictures_are_drawn_in_the_working_slots_scoring_takes(predictor, monkeypatch):
    """An occlusion picture runs the model dozens of times on a decoded image, yet its requests passed admission only:
    with one working slot, every picture asked for at once was drawn at once (each in its own thread)."""
    drawing, most = [0], [0]
    lock, explain = threading.Lock(), worklist_module.explain_frame

    def counted_explain(*args, **kwargs):
        with lock:
            drawing[0] += 1
            most[0] = max(most[0], drawing[0])
        try:
            time.sleep(0.2)  # long enough for the other requests to arrive while this one draws
            return explain(*args, **kwargs)
        finally:
            with lock:
                drawing[0] -= 1

    monkeypatch.setattr(worklist_module, "explain_frame", counted_explain)
    admission = Admission(workers=1, queue=8)
    with LiveServer(create_app(predictor, token=TOKEN, admission=admission)) as client:
        for _ in range(3):  # three studies, three pictures to draw
            data = _ct(StudyInstanceUID=generate_uid())
            assert client.post("/v1/score", content=data, headers={**AUTH, "Content-Type": "application/dicom"}).status_code == 200
        rows = client.get("/v1/worklist", headers=AUTH).json()["entries"]
        with ThreadPoolExecutor(len(rows)) as pool:
            answers = list(pool.map(lambda row: client.get(row["overlay"], headers=AUTH), rows))
    assert [a.status_code for a in answers] == [200] * 3
    assert most[0] == 1, f"{most[0]} pictures drawn at once with one working slot"


@pytest.mark.parametrize("token", ["", "   ", " tok-51c2", "tok-51c2\n"])
def test_a_token_no_client_could_send_is_refused_not_served(predictor, token):
    """An empty token turned the check off without a word, and one with white space around it (a token file's stray
    space kept by $MEDTRIAGE_TOKEN) could never match what a client sends, which the header's parsing strips."""
    with pytest.raises(ConfigError) as refused:
        create_app(predictor, token=token)
    assert refused.value.where == "token" and refused.value.hint


def test_a_kept_picture_does_not_wait_for_a_working_slot(predictor, monkeypatch):
    """Only drawing takes a working slot: a picture already drawn is sent while the only slot is busy scoring."""
    scoring, release = threading.Event(), threading.Event()
    score = worklist_module.Worklist.score_or_reject

    def held_score(self, *args, **kwargs):
        scoring.set()
        release.wait(timeout=10)
        return score(self, *args, **kwargs)

    admission = Admission(workers=1, queue=8)
    raw = {**AUTH, "Content-Type": "application/dicom"}
    with LiveServer(create_app(predictor, token=TOKEN, admission=admission)) as client, ThreadPoolExecutor(1) as pool:
        assert client.post("/v1/score", content=_ct(), headers=raw).status_code == 200
        (row,) = client.get("/v1/worklist", headers=AUTH).json()["entries"]
        drawn = client.get(row["overlay"], headers=AUTH)
        monkeypatch.setattr(worklist_module.Worklist, "score_or_reject", held_score)
        busy = pool.submit(client.post, "/v1/score", content=_ct(), headers=raw)
        try:
            assert scoring.wait(timeout=10)
            kept = client.get(row["overlay"], headers=AUTH, timeout=3)
        finally:
            release.set()
        assert busy.result().status_code == 200
    assert drawn.status_code == kept.status_code == 200 and kept.content == drawn.content
