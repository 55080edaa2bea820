"""`medtriage score` says each of pydicom's warnings about a file once: the check for whole-slide images reads every
header before the file is read to be scored, and would say them a second time."""

import warnings

from pydicom.data import get_testdata_file

from medtriage.cli import main

IMPLICIT_VR_IN_EXPLICIT = get_testdata_file("SC_rgb_jpeg.dcm")  # pydicom: "Expected explicit VR, but found implicit VR"


def test_a_header_warning_is_said_once_per_file(package_dir, capsys):
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert main(["score", str(package_dir), IMPLICIT_VR_IN_EXPLICIT]) == 0
    assert [str(w.message) for w in said if "explicit VR" in str(w.message)] == [
        "Expected explicit VR, but found implicit VR - using implicit VR for reading"
    ]
    assert "SC_rgb_jpeg.dcm" in capsys.readouterr().out  # scored
