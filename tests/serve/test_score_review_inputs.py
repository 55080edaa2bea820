"""`medtriage score` on what hospitals hand it: a file named twice is scored once, and the table tells apart files
of one name in different folders (every series of a CD holds an IM000001)."""

import json
import pathlib
import shutil

import pydicom
from pydicom.data import get_testdata_file

from medtriage.cli import main
from medtriage.io.safe_output import output_path

CT, MR = (get_testdata_file(n) for n in ("CT_small.dcm", "MR_small.dcm"))


def score(capsys, *args) -> tuple[int, str, str]:
    code = main(["score", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_file_named_twice_is_scored_once(capsys, package_dir, tmp_path):
    """Before, a file given by itself and in its folder, or through a link, was scored, counted and listed once per
    name: "3 input(s): 1 file(s) scored (3 image(s))" for one image."""
    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(CT, study / "ct.dcm")
    (study / "link.dcm").symlink_to("ct.dcm")
    sr_dir = tmp_path / "sr"
    code, out, err = score(capsys, package_dir, study / "ct.dcm", study, f"{study}/./ct.dcm", "--json", "--sr", sr_dir)
    document = json.loads(out)
    assert code == 0 and [r["file"] for r in document["results"]] == [str(study / "ct.dcm")]
    assert document["rejected"] == [] and document["not_written"] == []
    assert "1 input(s): 1 file(s) scored (1 image(s)), 0 rejected" in err
    assert len(list(sr_dir.glob("*.SR.dcm"))) == 1


def test_the_table_tells_apart_files_of_one_name_in_two_folders(capsys, package_dir, tmp_path):
    """Before, each row named its file's last part only: two IM000000 rows with different scores, and which series
    was urgent could not be told from the table."""
    cd = tmp_path / "cd"
    for series, image in (("SE0", CT), ("SE1", MR)):
        (cd / series).mkdir(parents=True)
        shutil.copy(image, cd / series / "IM000000")
    (cd / "SE1" / "README").write_text("not an image")
    sr_dir = tmp_path / "sr"
    first = cd / "SE0" / "IM000000"
    output_path(sr_dir, pydicom.dcmread(CT).SOPInstanceUID, ".SR.dcm", source=first.resolve()).mkdir(parents=True)  # its SR fails
    code, out, _ = score(capsys, package_dir, cd, "--sr", sr_dir)
    lines = out.splitlines()
    assert code == 1
    assert lines[1].startswith(f"{first}  ") and lines[2].startswith(f"{cd / 'SE1' / 'IM000000'}  ")
    assert lines[3].startswith("README  ")  # a name no other file has stays short
    assert lines[-1].startswith(f"{first}: no SR written: ")
    assert pathlib.Path(lines[-1].split(": ")[0]) == first
