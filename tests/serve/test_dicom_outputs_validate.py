"""The DICOM objects MedTriage writes, checked against their IODs by dicom3tools' dciodvfy as a PACS vendor's
validation bench would: the per-file SR of `medtriage score --sr`, and the study SR and heatmap Secondary Capture the
node's worker sends, for a chest CR study, an axial CT whose header leaves laterality empty, and an ultrasound
whose two frames its single-frame SOP class cannot hold (references to it must name no frame)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.cli import main
from medtriage.serve.node.store import NodeStore
from medtriage.serve.node.worker import Worker
from tests.serve.node.peers import cr_study

FIELDS = {"patient_id": "P", "accession": "A", "study_date": "", "study_description": "", "modality": "OT"}
# dciodvfy reports "Error - ..." (sometimes after a tag) and, on some versions, exits 0 all the same.
ERROR = re.compile(r"\bError\b")


def _chest_cr(folder: Path) -> list[Path]:
    return cr_study(folder, 2, seed=11)


def _axial_ct(folder: Path) -> list[Path]:
    return [Path(get_testdata_file("CT_small.dcm"))]


def _frames_in_a_single_frame_class(folder: Path) -> list[Path]:
    return [Path(get_testdata_file("OBXXXX1A_2frame.dcm"))]  # Ultrasound Image Storage with Number of Frames 2


SOURCES = {"chest CR": _chest_cr, "axial CT": _axial_ct, "frames in a single-frame class": _frames_in_a_single_frame_class}


@pytest.fixture(scope="module")
def dciodvfy(need_tool) -> str:
    return need_tool("dciodvfy", "apt-get install dicom3tools")


def validation_errors(dciodvfy: str, path: Path) -> list[str]:
    """The error lines dciodvfy reports for the object at `path` (its warnings are left to the report's reader)."""
    done = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    return [line.strip() for line in (done.stdout + done.stderr).splitlines() if ERROR.search(line)]


def invalid(dciodvfy: str, paths: list[Path], kind: str) -> list[str]:
    """dciodvfy's errors for each written object of `kind`, each named by its kind."""
    assert paths, f"no {kind} was written"
    return [f"{kind}: {error}" for path in paths for error in validation_errors(dciodvfy, path)]


@pytest.mark.parametrize("source", SOURCES)
def test_the_sr_of_score_is_a_valid_comprehensive_sr(source, dciodvfy, package_dir, tmp_path):
    paths = SOURCES[source](tmp_path / "in")
    assert main(["score", str(package_dir), *map(str, paths), "--sr", str(tmp_path / "sr")]) == 0
    errors = invalid(dciodvfy, sorted((tmp_path / "sr").glob("*.SR.dcm")), "SR")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("source", SOURCES)
def test_the_nodes_study_sr_and_heatmap_are_valid(source, dciodvfy, predictor, tmp_path):
    paths = SOURCES[source](tmp_path / "in")
    store = NodeStore(tmp_path / "state")
    worker = Worker(store, predictor, ["PACS@127.0.0.1:1"], study_timeout=0, heatmaps=True)
    study_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        store.receive(path.read_bytes(), ds.SOPInstanceUID, study_uid, ds.SeriesInstanceUID, ds.SOPClassUID, FIELDS)
    time.sleep(0.01)
    assert worker.score_queued() and worker.close_quiet_studies()
    sent = store._execute("SELECT DISTINCT kind, file FROM deliveries WHERE study_uid = ? ORDER BY id", (study_uid,))
    written = {kind: [store.outbox_path(row["file"]) for row in sent if row["kind"] == kind] for kind in ("sr", "heatmap")}
    store.close()
    errors = invalid(dciodvfy, written["sr"], "study SR") + invalid(dciodvfy, written["heatmap"], "heatmap Secondary Capture")
    assert not errors, "\n".join(errors)


def _designators(dataset: pydicom.Dataset) -> set[str]:
    """Every Coding Scheme Designator in the content of `dataset`, at any depth."""
    found: set[str] = set()
    dataset.walk(lambda ds, elem: found.add(str(elem.value)) if elem.keyword == "CodingSchemeDesignator" else None)
    return found


def test_the_private_coding_scheme_an_sr_uses_is_identified_in_it(package_dir, tmp_path):
    """dciodvfy only warns of a designator outside PS3.16; PS3.3 C.12.1.1.2 says where a private one is described."""
    paths = _chest_cr(tmp_path / "in")
    assert main(["score", str(package_dir), *map(str, paths), "--sr", str(tmp_path / "sr")]) == 0
    for path in sorted((tmp_path / "sr").glob("*.SR.dcm")):
        sr = pydicom.dcmread(path)
        identified = {item.CodingSchemeDesignator: item for item in sr.get("CodingSchemeIdentificationSequence", [])}
        content = pydicom.Dataset()
        content.ContentSequence = sr.ContentSequence
        private = {designator for designator in _designators(content) if designator.startswith("99")}
        assert private and private <= set(identified), f"{sorted(private - set(identified))} not identified in {path.name}"
        assert all(identified[designator].CodingSchemeResponsibleOrganization for designator in private)
