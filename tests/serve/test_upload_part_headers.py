"""An upload whose part breaks the multipart parser's own bounds is refused saying which bound, not only that the
body was malformed."""

from __future__ import annotations

from fastapi.testclient import TestClient

from medtriage.serve.http import create_app


def test_a_part_with_too_many_header_lines_is_refused_naming_the_limit(predictor):
    """Before, the answer said "Invalid multipart data" and nothing of what was wrong with it."""
    boundary = "medtriage-boundary"
    extra = "".join(f"X-Extra-{k}: {k}\r\n" for k in range(20))
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.dcm"\r\n{extra}'
        f"Content-Type: application/dicom\r\n\r\nDICM\r\n--{boundary}--\r\n"
    ).encode()
    client = TestClient(create_app(predictor))
    answer = client.post("/v1/score", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert answer.status_code == 400
    reason = answer.json()["error"]["reason"]
    assert reason.startswith("malformed multipart body") and "header" in reason.lower().split("invalid multipart data", 1)[1], reason
