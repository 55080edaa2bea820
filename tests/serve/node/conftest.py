"""Fixtures of the DICOM node tests: a real Orthanc (DICOMweb plugin on), `medtriage listen` as a child
process pointing its results at it, and dcmtk's storescu."""

from __future__ import annotations

import pytest

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
