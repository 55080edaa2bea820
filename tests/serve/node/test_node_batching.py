"""Dynamic batching in the DICOM node: instances received together are decoded side by side and their
inference calls share ORT calls through the same batcher as `serve` (serve/batching.py). Files arrive
over real associations; every result must equal unbatched scoring of the same file."""

from __future__ import annotations

import json

import httpx
import pydicom
import pytest

from medtriage.serve.batching import enable_batching
from medtriage.serve.node.scp import start_scp
from medtriage.serve.node.store import NodeStore
from medtriage.serve.node.worker import Worker
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor, Rejection
from tests.serve.node.peers import (
    NODE_AET,
    ORTHANC_AET,
    cr_study,
    free_port,
    referenced_sops,
    send_files,
    start_listener,
    storescu,
    wait_for,
    wait_for_srs,
)

VERDICT = ("priority", "decision", "finding")


def mixed_arrivals(folder) -> tuple[list, object]:
    """Two studies of different image sizes (28 and 56 px: never stacked together), then a file whose pixel
    data is cut short (refused when decoded). Returns (files in sending order, the cut file)."""
    files = cr_study(folder / "small", 5, seed=21) + cr_study(folder / "large", 3, seed=22, size=56)
    (cut,) = cr_study(folder / "cut", 1, seed=23)
    cut.write_bytes(cut.read_bytes()[:-300])
    return [*files, cut], cut


def assert_same_as_unbatched(store: NodeStore, files, cut, package_dir) -> int:
    """Every file's stored outcome equals scoring it alone here (probabilities to float rounding); returns
    the number of images scored."""
    alone = Predictor(load_package(package_dir), threads=1)
    scored = 0
    for path in files:
        row = store.instance(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        expected = alone.score_or_reject(path, str(path))
        if path == cut:
            assert isinstance(expected, Rejection) and row["state"] == "rejected" and "truncated" in row["reason"]
            continue
        got = json.loads(row["result"])
        assert row["state"] == "scored" and len(got) == len(expected), path.name
        for mine, reference in zip(got, (s.as_dict() for s in expected)):
            assert mine["probability"] == pytest.approx(reference["probability"], abs=1e-5), path.name
            assert [mine[k] for k in VERDICT] == [reference[k] for k in VERDICT], path.name
        scored += len(got)
    return scored


def test_instances_received_together_share_inference_calls_and_score_as_alone(package_dir, tmp_path):
    files, cut = mixed_arrivals(tmp_path)
    store = NodeStore(tmp_path / "state")
    port = free_port()
    server = start_scp(store, NODE_AET, "127.0.0.1", port)
    try:
        assert set(send_files(port, files).values()) == {0x0000}  # one pynetdicom association
    finally:
        server.shutdown()
    predictor = Predictor(load_package(package_dir), threads=1)
    batcher = enable_batching(predictor, max_batch=4, wait_ms=500)
    worker = Worker(store, predictor, ["NOWHERE@127.0.0.1:1"], study_timeout=60, at_once=4)
    try:
        assert worker.score_queued()
    finally:
        worker.close()
        batcher.close()
    assert assert_same_as_unbatched(store, files, cut, package_dir) == 8
    # Arrival order, 4 at a time: [28 px x4] -> one call; [28 px, 56 px x3] -> one call per size; [cut] -> no call.
    assert (batcher.stats.calls, batcher.stats.images) == (3, 8)
    store.close()


@pytest.mark.slow
def test_listen_with_max_batch_batches_storescu_arrivals(package_dir, orthanc, storescu_exe, tmp_path):
    files, cut = mixed_arrivals(tmp_path / "files")
    metrics_port, port = free_port(), free_port()
    node = start_listener(
        package_dir,
        tmp_path / "state",
        port,
        orthanc,
        "--send-to",
        f"{ORTHANC_AET}@127.0.0.1:{orthanc.dicom_port}",
        "--metrics-port",
        str(metrics_port),
        "--max-batch",
        "8",
        "--batch-wait-ms",
        "200",
    )
    try:
        sent = storescu(storescu_exe, port, files[:-1])  # one association, files back to back
        assert sent.returncode == 0, sent.stderr[-500:]
        assert send_files(port, [cut]) == {cut: 0x0000}  # storescu will not send a cut file; pynetdicom does
        wait_for(lambda: (c := node.counts()["instances"]).get("received", 0) == 0 and sum(c.values()) == len(files), 60, "all scored")
        store = NodeStore(node.state)
        try:
            scored = assert_same_as_unbatched(store, files, cut, package_dir)
        finally:
            store.close()
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("medtriage_batch_")}
        assert values["medtriage_batch_images_total"] == scored
        assert values["medtriage_batch_calls_total"] < scored  # some instances shared a call
        studies: dict[str, list[str]] = {}
        for path in files[:-1]:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            studies.setdefault(header.StudyInstanceUID, []).append(header.SOPInstanceUID)
        for study_uid, srs in wait_for_srs(orthanc, list(studies)).items():
            (sr,) = srs  # one SR per study, referencing every instance scored in a shared call
            assert sorted(referenced_sops(sr)) == sorted(studies[study_uid])
    finally:
        assert node.stop() == 0, node.log.read_text()[-3000:]
