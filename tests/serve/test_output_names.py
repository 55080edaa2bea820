"""`medtriage score --sr/--overlays`: a hostile SOP Instance UID never chooses where a file goes, and two
files sharing a UID do not overwrite each other."""

import pydicom
from pydicom.data import get_testdata_file

from medtriage.cli import main

CT = get_testdata_file("CT_small.dcm")


def _copy_with_uid(source: str, target, uid: str, patient: str = "") -> None:
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    if patient:
        ds.PatientID = patient
    ds.save_as(target)


def test_a_path_in_the_sop_uid_stays_inside_the_output_folders(package_dir, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _copy_with_uid(CT, inputs / "hostile.dcm", "../../escaped")
    sr_dir, overlay_dir = tmp_path / "a" / "b" / "sr", tmp_path / "a" / "b" / "overlays"
    code = main(["score", str(package_dir), str(inputs / "hostile.dcm"), "--sr", str(sr_dir), "--overlays", str(overlay_dir)])
    assert code == 0, capsys.readouterr().err
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert [p for p in written if not p.startswith(("in/", "a/b/sr/", "a/b/overlays/"))] == []
    (sr,) = sr_dir.iterdir()
    (overlay,) = overlay_dir.iterdir()
    assert sr.name.startswith("escaped.") and sr.name.endswith(".SR.dcm") and overlay.name.endswith(".overlay.png")
    assert (
        pydicom.dcmread(sr)
        .CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        == "../../escaped"
    )  # the value stays data inside the SR


def test_two_files_sharing_a_uid_get_two_outputs(package_dir, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    uid = "1.2.826.0.1.3680043.8.498.1"
    _copy_with_uid(CT, inputs / "one.dcm", uid, patient="P1")
    _copy_with_uid(CT, inputs / "two.dcm", uid, patient="P2")
    code = main(["score", str(package_dir), str(inputs), "--sr", str(tmp_path / "sr"), "--overlays", str(tmp_path / "ov")])
    assert code == 0, capsys.readouterr().err
    reports = sorted((tmp_path / "sr").glob(f"{uid}.*.SR.dcm"))
    assert len(reports) == 2 and len(list((tmp_path / "ov").glob(f"{uid}.*.overlay.png"))) == 2
    assert sorted(str(pydicom.dcmread(p).PatientID) for p in reports) == ["P1", "P2"]
    main(["score", str(package_dir), str(inputs), "--sr", str(tmp_path / "sr")])  # a rerun replaces, never adds
    assert sorted((tmp_path / "sr").iterdir()) == reports
