"""The 3-site simulator: real DICOM files with per-site quirks, PHI, labels.csv defects, deterministic."""

from __future__ import annotations

import csv
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medtriage.cli import main as cli_main
from medtriage.data.simulate.sites import SITES, make_sites
from medtriage.data.sources.medmnist import read_npz
from medtriage.errors import InputError
from medtriage.io.dicom import read_dicom

ROOT = Path(__file__).resolve().parents[3]
NPZ = ROOT / "data" / "samples" / "pneumoniamnist_28.npz"
LIMIT = 60


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    out = tmp_path_factory.mktemp("sites")
    return out, make_sites(NPZ, out, seed=3, limit=LIMIT)


def image_files(out: Path, results) -> dict[str, list[Path]]:
    strays = {name for r in results for name in r.stray_files}
    return {r.site: sorted(p for p in (out / r.site).glob("*.dcm") if p.name not in strays) for r in results}


def test_every_image_written_once_across_sites(sites):
    out, results = sites
    files = image_files(out, results)
    assert sum(len(v) for v in files.values()) == LIMIT == sum(r.images for r in results)
    assert [r.site for r in results] == [s.name for s in SITES]
    assert all(len(v) > 0 for v in files.values())


@pytest.mark.parametrize("profile", SITES, ids=[s.name for s in SITES])
def test_site_quirks_are_in_the_headers(sites, profile):
    out, results = sites
    for path in image_files(out, results)[profile.name]:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == profile.transfer_syntax
        assert (ds.Manufacturer, ds.ManufacturerModelName, ds.Modality) == (profile.manufacturer, profile.model, profile.modality)
        assert (ds.BitsStored, ds.PhotometricInterpretation, ds.Rows) == (profile.bits_stored, profile.photometric, profile.matrix)
        assert float(ds.PixelSpacing[0]) == profile.pixel_spacing
        assert ("WindowCenter" in ds) == (profile.voi == "window")
        assert ("VOILUTSequence" in ds) == (profile.voi == "lut")
        assert ("RescaleSlope" in ds) == (profile.rescale is not None)
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPClassUID.name in ("Computed Radiography Image Storage", "Digital X-Ray Image Storage - For Presentation")


def test_headers_carry_phi_to_remove(sites):
    out, results = sites
    path = image_files(out, results)["st_marys"][0]
    ds = pydicom.dcmread(path)
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "InstitutionName",
        "InstitutionAddress",
        "ReferringPhysicianName",
        "StudyDate",
        "StudyTime",
        "StationName",
    ):
        assert str(ds.get(keyword) or "").strip(), keyword
    private = [e for e in ds if e.tag.is_private and e.VR == "PN"]
    assert private and str(private[0].value) == str(ds.OperatorsName)


def test_decoded_pixels_are_the_source_xrays(sites):
    out, results = sites
    originals = np.concatenate([x for x, _ in read_npz(NPZ).values()]).reshape(-1, 28 * 28).astype(np.float32) / 255
    originals -= originals.mean(1, keepdims=True)
    originals /= np.linalg.norm(originals, axis=1, keepdims=True)
    for site, paths in image_files(out, results).items():
        for path in paths[:8]:
            pixels = read_dicom(path).pixels[0, 0]
            small = np.asarray(Image.fromarray(pixels, mode="F").resize((28, 28), Image.BILINEAR)).ravel()
            small = (small - small.mean()) / np.linalg.norm(small - small.mean())
            assert (originals @ small).max() > 0.95, f"{site}: {path.name} matches no source image"


def test_patients_have_one_to_four_studies_with_consistent_demographics(sites):
    out, results = sites
    studies = defaultdict(set)
    demographics = defaultdict(set)
    for site, paths in image_files(out, results).items():
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            studies[(site, ds.PatientID)].add(ds.StudyInstanceUID)
            demographics[(site, ds.PatientID)].add((str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex))
    counts = [len(s) for s in studies.values()]
    assert min(counts) >= 1 and max(counts) <= 4 and any(c >= 2 for c in counts)
    assert all(len(d) == 1 for d in demographics.values())
    assert sum(counts) == LIMIT  # one image per study


def test_labels_csv_has_the_planted_defects(sites):
    out, results = sites
    for result, profile in zip(results, SITES):
        with open(out / result.site / "labels.csv", newline="") as f:
            header, *rows = list(csv.reader(f))
        assert tuple(header) == profile.label_header
        findings = [finding for _, finding in rows]
        assert len(rows) == result.label_rows
        assert findings.count("") == result.planted["empty_finding"] == 1
        assert set(findings) <= {"normal", "pneumonia", "", "see report"}
        expected = result.images + result.planted["unknown_id"] + result.planted.get("truncated", 0) - result.planted.get("no_label_row", 0)
        assert len(rows) == expected


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    def snapshot(folder):
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    make_sites(NPZ, tmp_path / "a", seed=7, limit=9)
    make_sites(NPZ, tmp_path / "b", seed=7, limit=9)
    make_sites(NPZ, tmp_path / "c", seed=8, limit=9)
    first = snapshot(tmp_path / "a")
    assert first == snapshot(tmp_path / "b")
    assert first.keys() != snapshot(tmp_path / "c").keys()
    keys = {p: first[p] for p in first if p.parts[0] == ".keys"}  # the simulated sites' secrets repeat too
    assert sorted(p.name for p in keys) == sorted(f"{s.name}.key" for s in SITES)
    assert keys != {p: v for p, v in snapshot(tmp_path / "c").items() if p.parts[0] == ".keys"}


def test_dcmtk_reads_every_image(need_tool, sites):
    need_tool("dcmdump", "apt-get install dcmtk")
    out, results = sites
    paths = [str(p) for paths in image_files(out, results).values() for p in paths]
    paths += [str(out / "st_marys" / name) for name in results[0].stray_files]  # the SR is valid DICOM too
    done = subprocess.run(["dcmdump", "-q", *paths], capture_output=True, text=True, errors="replace", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "E:" not in done.stderr


def test_command_line(tmp_path, capsys):
    assert cli_main(["make-sites", "--npz", str(NPZ), "--out", str(tmp_path), "--limit", "6", "--seed", "1"]) == 0
    assert "st_marys" in capsys.readouterr().out
    assert len(list(tmp_path.glob("*/labels.csv"))) == 3


def test_a_folder_given_for_the_npz_is_named_a_folder_not_a_missing_file(tmp_path, capsys):
    out = tmp_path / "sites"
    assert cli_main(["make-sites", "--npz", str(tmp_path), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path}: this is a folder, not an npz file" in error and "not found" not in error
    assert "e.g. data/samples/pneumoniamnist_28.npz" in error
    assert not out.exists()  # refused before anything is written


def test_a_folder_holding_an_npz_is_refused_with_that_file_as_the_example(tmp_path):
    (tmp_path / "pneumoniamnist_64.npz").write_bytes(NPZ.read_bytes())
    with pytest.raises(InputError, match="this is a folder, not an npz file") as refused:
        make_sites(tmp_path, tmp_path / "sites", limit=3)
    assert refused.value.hint == f"give the .npz file itself, e.g. {tmp_path / 'pneumoniamnist_64.npz'}"
