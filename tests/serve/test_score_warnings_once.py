"""`medtriage score` says each of pydicom's warnings about a file once, naming the file: pydicom says it twice (a log
record and a Python warning) and the check for whole-slide images reads every header before the file is scored."""

import warnings

from pydicom.data import get_testdata_file

from medtriage.cli import main

IMPLICIT_VR_IN_EXPLICIT = get_testdata_file("SC_rgb_jpeg.dcm")  # pydicom: "Expected explicit VR, but found implicit VR"
SAID = "Expected explicit VR, but found implicit VR - using implicit VR for reading"


def test_a_header_warning_is_said_once_per_file_naming_it(package_dir, capsys, no_header_warnings_said):
    with warnings.catch_warnings(record=True) as python_warnings:
        warnings.simplefilter("always")
        assert main(["score", str(package_dir), IMPLICIT_VR_IN_EXPLICIT, IMPLICIT_VR_IN_EXPLICIT]) == 0
    out, err = capsys.readouterr()
    assert "SC_rgb_jpeg.dcm" in out  # scored
    assert [line for line in err.splitlines() if "explicit VR" in line] == [f"warning: {IMPLICIT_VR_IN_EXPLICIT}: {SAID}"]
    assert not [w for w in python_warnings if "explicit VR" in str(w.message)]


def test_an_uploads_warning_names_the_upload_and_escapes_its_control_characters(package_dir, capsys, no_header_warnings_said):
    from fastapi.testclient import TestClient

    from medtriage.io.header_warnings import say_header_warnings
    from medtriage.serve.http import create_app
    from medtriage.serve.package import load_package
    from medtriage.serve.predictor import Predictor

    say_header_warnings()  # as `medtriage serve` does
    client = TestClient(create_app(Predictor(load_package(package_dir), threads=1)))
    with open(IMPLICIT_VR_IN_EXPLICIT, "rb") as file:
        data = file.read()
    upload = [("files", ("ward 3\x1b[2J.dcm", data, "application/dicom"))]
    (result,) = client.post("/v1/score", files=upload).json()["results"]
    assert result["probability"] >= 0  # scored
    said = [line for line in capsys.readouterr().err.splitlines() if "explicit VR" in line]
    assert said == [f"warning: ward 3\\x1b[2J.dcm: {SAID}"]
