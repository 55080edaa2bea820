"""Fixtures of the DICOM node tests: a real Orthanc (DICOMweb plugin on), `medtriage listen` as a child
process pointing its results at it, and dcmtk's storescu."""

from __future__ import annotations

import pydicom
import pytest

from medtriage.serve.node.store import NodeStore
from medtriage.serve.node.worker import Worker
from tests.serve.node.peers import DICOMWEB_PLUGIN, ORTHANC_AET, Orthanc, free_port, start_listener


@pytest.fixture(scope="module")
def orthanc_exe(need_tool) -> str:
    need_tool(str(DICOMWEB_PLUGIN), "apt-get install orthanc-dicomweb")
    return need_tool("Orthanc", "apt-get install orthanc orthanc-dicomweb")


@pytest.fixture(scope="module")
def storescu_exe(need_tool) -> str:
    return need_tool("storescu", "apt-get install dcmtk")


@pytest.fixture(scope="module")
def node_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def orthanc(orthanc_exe, node_port, tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), node_port, orthanc_exe).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def listener(package_dir, orthanc, node_port, tmp_path_factory):
    metrics_port = free_port()
    node = start_listener(
        package_dir,
        tmp_path_factory.mktemp("node") / "state",
        node_port,
        orthanc,
        "--send-to",
        f"{ORTHANC_AET}@127.0.0.1:{orthanc.dicom_port}",
        "--metrics-port",
        str(metrics_port),
    )
    node.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield node
    assert node.stop() == 0, node.log.read_text()[-3000:]


@pytest.fixture
def node_store(tmp_path):
    """The store of a node in a new state folder, tmp_path / "state", opened as the node opens it; closed after the test
    (a test may close it first, to open the folder again as a restarted node)."""
    store = NodeStore(tmp_path / "state", recover=True)
    yield store
    store.close()


@pytest.fixture
def node_worker(node_store, predictor) -> Worker:
    """A worker over `node_store` that closes a study once quiet (no wait), its results for a PACS nobody answers at."""
    return Worker(node_store, predictor, ["PACS@127.0.0.1:1"], study_timeout=0)


@pytest.fixture
def receive_file(node_store):
    """Receive a DICOM file into `node_store` as the SCP records it; returns its SOP Instance UID."""
    fields = {"patient_id": "P", "accession": "A", "study_date": "", "study_description": "", "modality": "CR"}

    def receive(path) -> str:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        node_store.receive(path.read_bytes(), ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID, fields)
        return ds.SOPInstanceUID

    return receive
