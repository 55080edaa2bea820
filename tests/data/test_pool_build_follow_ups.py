"""Building a pool from site folders: what is read (hidden folders are not), a build that would hold no image, and
reuse of a pool only while its files are the ones the build wrote."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from medtriage.data.manifest import LABELS_FILE, MANIFEST_FILE, REJECTS_FILE, load_manifest
from medtriage.data.pool import build_sites_pool
from medtriage.errors import DataNotFoundError
from medtriage.io.site_folder import read_site_folder
from tests.data.test_pool_and_manifest_edges import edit_manifest, set_cell, write_dicom


def one_site(sites: Path, finding: str = "normal") -> Path:
    write_dicom(sites / "a" / "1.dcm", "p1", "A1")
    (sites / "a" / "labels.csv").write_text(f"accession_number,finding\nA1,{finding}\n")
    return sites


def build(sites: Path, pool_dir: Path, verbose: bool = False):
    return build_sites_pool(sites, pool_dir, val_fraction=0.0, test_fraction=0.0, workers=1, verbose=verbose)


def test_files_inside_hidden_folders_are_not_site_data(tmp_path, capsys):
    sites = one_site(tmp_path / "sites")
    checkpoint = sites / "a" / ".ipynb_checkpoints" / "1-checkpoint.dcm"  # a notebook's copy of the same image
    checkpoint.parent.mkdir()
    shutil.copyfile(sites / "a" / "1.dcm", checkpoint)
    write_dicom(sites / "a" / ".Trash-1000" / "files" / "old.dcm", "p9", "A1")  # deleted, yet its identifier still has a row
    manifest = build(sites, tmp_path / "pool", verbose=True)
    assert list(manifest.rows["path"]) == ["a/1.dcm"]
    assert len(manifest.rejects) == 0
    out = capsys.readouterr().out
    assert "a/.ipynb_checkpoints" in out and "a/.Trash-1000" in out  # left out, and said so


def test_a_build_in_which_every_image_is_rejected_is_refused_naming_the_rejects(tmp_path):
    sites = one_site(tmp_path / "sites", finding="maybe")
    pool_dir = tmp_path / "pool"
    for _attempt in range(2):  # the refusal is not cached into a pool that a second build would reuse
        with pytest.raises(DataNotFoundError, match="no image") as err:
            build(sites, pool_dir)
        assert str(sites.resolve()) in str(err.value) and str(pool_dir.resolve() / REJECTS_FILE) in str(err.value)
    assert "unknown finding" in (pool_dir / REJECTS_FILE).read_text()  # what to read to see why
    with pytest.raises(DataNotFoundError, match="no pooled manifest"):
        load_manifest(pool_dir)  # no 0-image pool left for training to pick up


def test_a_site_folder_without_files_gets_its_own_line(tmp_path, capsys):
    sites = one_site(tmp_path / "sites")
    (sites / "b").mkdir()
    build(sites, tmp_path / "pool", verbose=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if "no image files" in line]
    assert len(lines) == 1 and "b" in lines[0] and str(sites.resolve() / "b") in lines[0]


@pytest.mark.parametrize(
    ("file", "edit"),
    [
        (MANIFEST_FILE, lambda pool_dir: edit_manifest(pool_dir, set_cell("label", "1", row=0))),
        (LABELS_FILE, lambda pool_dir: (pool_dir / LABELS_FILE).write_text('["pneumonia", "normal"]')),
    ],
)
def test_a_pool_edited_by_hand_is_built_again_not_reused(tmp_path, capsys, file, edit):
    sites = one_site(tmp_path / "sites")
    first = build(sites, tmp_path / "pool")
    assert first.rows["label"].tolist() == [0] and first.label_names[0] == "normal"
    edit(first.pool_dir)
    again = build(sites, tmp_path / "pool", verbose=True)
    assert again.rows["label"].tolist() == [0] and again.label_names[0] == "normal"
    assert again.fingerprint == first.fingerprint
    assert f"{file} differs from what the build wrote" in capsys.readouterr().out
    assert build(sites, tmp_path / "pool", verbose=True).fingerprint == first.fingerprint
    assert "reusing pool" in capsys.readouterr().out  # restored, then reused as before


def test_a_site_folder_lists_its_inputs_and_the_outermost_hidden_names_it_leaves_out(tmp_path):
    sites = one_site(tmp_path / "sites")
    for hidden in (".DS_Store", ".Trash-1000/files/old.dcm", "sub/.~lock.dcm"):
        write_dicom(sites / "a" / hidden, "p9", "A9")
    write_dicom(sites / "a" / "sub" / "2.dcm", "p2", "A2")
    contents = read_site_folder(sites / "a")
    assert [p.relative_to(sites / "a").as_posix() for p in contents.inputs] == ["1.dcm", "sub/2.dcm"]
    assert [p.as_posix() for p in contents.hidden_roots()] == [".DS_Store", ".Trash-1000", "sub/.~lock.dcm"]
    assert len(contents.hidden) == 3
