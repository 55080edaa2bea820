"""The pool builder says each of pydicom's warnings about a site file once, naming the file, as `medtriage score` and
`medtriage ingest` do: those met decoding a file, and those met reading the identifiers of a file that failed."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

import medtriage.data.pool
from medtriage.cli import main
from tests.io.damage import replaced, with_vr

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
SOP_UID = pydicom.dcmread(CT_SMALL, stop_before_pixels=True).SOPInstanceUID
MODALITY_AS_UID = "Invalid value for VR UI: 'CT'"
SOP_UID_TOO_LONG = "The value length (48) exceeds the maximum length of 16 allowed for VR SH."


def with_sop_uid(raw: bytes, uid: str) -> bytes:
    """`raw` with its SOP Instance UID (in the file meta and the data set) replaced by `uid`, of the same length."""
    assert len(uid) == len(SOP_UID) and raw.count(SOP_UID.encode()) == 2
    return raw.replace(SOP_UID.encode(), uid.encode())


def damaged_site(sites: Path) -> tuple[Path, Path]:
    """Site a: CT_small with its Modality labelled as a UID (decodes; warned of when the header is read), and a copy
    of another SOP Instance UID, labelled SH, that claims 256 rows (fails to decode; warned of when the identifiers of
    the failed file are read)."""
    raw = CT_SMALL.read_bytes()
    site = sites / "a"
    site.mkdir(parents=True)
    decodes, fails = site / "decodes.dcm", site / "fails.dcm"
    decodes.write_bytes(with_vr(raw, 0x00080060, b"UI"))
    other_uid = SOP_UID[:-5] + "99999"
    rows_256 = replaced(raw, b"\x28\x00\x10\x00US\x02\x00\x80\x00", b"\x28\x00\x10\x00US\x02\x00\x00\x01")
    fails.write_bytes(with_vr(with_sop_uid(rows_256, other_uid), 0x00080018, b"SH"))
    (site / "labels.csv").write_text(f"sop_instance_uid,finding\n{SOP_UID},normal\n{other_uid},pneumonia\n")
    return decodes, fails


def test_build_pool_names_each_file_in_pydicoms_warnings_once(tmp_path, capsys, no_header_warnings_said):
    """Before, `medtriage build-pool` left pydicom's warnings as Python warnings naming no file, and the identifiers of
    a file that failed to decode were read after leaving the file: their warning named no file even when said."""
    decodes, fails = damaged_site(tmp_path / "sites")
    command = ["build-pool", "--sites", str(tmp_path / "sites"), "--pool", str(tmp_path / "pool"), "--workers", "1"]
    with warnings.catch_warnings(record=True) as python_warnings:
        warnings.simplefilter("always")
        assert main([*command, "--val-fraction", "0", "--test-fraction", "0"]) == 0
    err = capsys.readouterr().err.splitlines()
    for path, message in ((decodes, MODALITY_AS_UID), (fails, SOP_UID_TOO_LONG)):
        said = [line for line in err if message in line]
        assert len(said) == 1 and said[0].startswith(f"warning: {path.resolve()}: {message}"), said
        assert not [w for w in python_warnings if message in str(w.message)]


def test_worker_processes_name_each_file_too(tmp_path, capfd, monkeypatch, no_header_warnings_said):
    """Files decoded in worker processes (started afresh: they inherit no logging set-up) are named as well."""
    monkeypatch.setattr(medtriage.data.pool, "IN_PROCESS_BELOW", 1)
    decodes, fails = damaged_site(tmp_path / "sites")
    command = ["build-pool", "--sites", str(tmp_path / "sites"), "--pool", str(tmp_path / "pool"), "--workers", "2"]
    assert main([*command, "--val-fraction", "0", "--test-fraction", "0"]) == 0
    err = capfd.readouterr().err.splitlines()
    for path, message in ((decodes, MODALITY_AS_UID), (fails, SOP_UID_TOO_LONG)):
        said = [line for line in err if message in line]  # after the progress bar: a worker cannot clear it
        assert len(said) == 1 and f"warning: {path.resolve()}: {message}" in said[0], said
