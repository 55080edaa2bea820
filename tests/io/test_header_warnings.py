"""pydicom's warnings about a header name the file they are about, whichever thread reads it and however late pydicom
converts the value, and each (file, warning) is said once (within a minute)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.cli import main as cli_main
from medtriage.io.header_warnings import HeaderWarnings, reading, say_header_warnings
from medtriage.serve.node.header import read_identity
from tests.io.damage import replaced, with_vr

TOO_LONG = "The value length (100) exceeds the maximum length of 64 allowed for VR LO."


@pytest.fixture
def said(capsys):
    """`said()`: the lines a HeaderWarnings handler (remembering 3 pairs), alone on the pydicom logger, printed."""
    logging.getLogger("pydicom").handlers = [HeaderWarnings(remember=3)]  # conftest puts the logger back
    return lambda: capsys.readouterr().err.splitlines()


def test_a_warning_names_the_file_being_read_and_is_said_once_per_file(said):
    log = logging.getLogger("pydicom")
    with reading("a.dcm"):
        log.warning("odd header")
        log.warning("odd header")
    with reading("b.dcm"), reading("inner.dcm"):
        log.warning("odd header")
    log.warning("odd header")
    assert said() == ["a.dcm: odd header", "inner.dcm: odd header", "odd header"]


def test_only_the_latest_pairs_are_remembered(said):
    log = logging.getLogger("pydicom")
    for name in ("a", "b", "c", "d", "a"):
        with reading(name):
            log.warning("x")
    assert said() == ["a: x", "b: x", "c: x", "d: x", "a: x"]  # remember=3: 'a' was forgotten when 'd' came


def test_a_file_read_again_after_the_window_is_said_again(said):
    logger = logging.getLogger("pydicom")
    logger.handlers = [HeaderWarnings(window=0.0)]  # conftest puts the logger back
    for _ in range(2):
        with reading("image.dcm"):
            logger.warning("odd header")
    assert said() == ["image.dcm: odd header"] * 2


def test_each_thread_names_its_own_file(said):
    log = logging.getLogger("pydicom")
    both_inside = threading.Barrier(2)

    def read(name: str) -> None:
        with reading(name):
            both_inside.wait(timeout=10)  # each thread logs while the other is inside its own file
            log.warning("odd header")

    threads = [threading.Thread(target=read, args=(name,)) for name in ("left.dcm", "right.dcm")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(said()) == ["left.dcm: odd header", "right.dcm: odd header"]


def test_a_value_pydicom_converts_after_the_read_is_still_named(tmp_path, capsys, no_header_warnings_said):
    """read_identity reads the study fields after dcmread returns: pydicom warns of a too-long value only then."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with pytest.warns(UserWarning, match="exceeds the maximum length"):
        ds["StudyDescription"] = pydicom.DataElement(0x00081030, "LO", "x" * 100)
    path = tmp_path / "long description.dcm"
    ds.save_as(path)
    say_header_warnings()
    read_identity(path, where=str(path))
    read_identity(path, where=str(path))
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "exceeds" in line] == [f"warning: {path}: {TOO_LONG}"]


def test_control_characters_of_a_name_or_a_quoted_value_are_shown_as_escapes(said):
    with reading("ward\x1b[2J.dcm"):
        logging.getLogger("pydicom").warning("Invalid value for VR CS: 'a\nb'")
    assert said() == ["ward\\x1b[2J.dcm: Invalid value for VR CS: 'a\\nb'"]


def test_ingest_names_each_file_in_pydicoms_warnings_once(tmp_path, capsys, no_header_warnings_said):
    """A Modality labelled as a UID is warned of when de-identification reads it, after the header is read. Before,
    `medtriage ingest` left pydicom's warnings as Python warnings (one raw line per message and place in pydicom, naming
    no file: the second file's went unsaid), and read every file as 'ingest'."""
    site = tmp_path / "site"
    site.mkdir()
    damaged = with_vr(Path(get_testdata_file("CT_small.dcm")).read_bytes(), 0x00080060, b"UI")  # Modality 'CT'
    (site / "a.dcm").write_bytes(damaged)
    (site / "b.dcm").write_bytes(replaced(damaged, b"CompressedSamples^CT1", b"CompressedSamples^CT2"))
    key = tmp_path / "site.key"
    key.write_text("e" * 64)
    key.chmod(0o600)
    assert cli_main(["ingest", str(site), "--site", "a", "--into", str(tmp_path / "pool"), "--secret-file", str(key)]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "Invalid value for VR UI: 'CT'" in line]  # a bar's \r too
    assert [line.split(": Invalid")[0] for line in said] == [f"warning: {site.resolve() / name}" for name in ("a.dcm", "b.dcm")]
