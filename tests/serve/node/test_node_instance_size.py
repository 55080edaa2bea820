"""Large instances at the DICOM node: they arrive on disk, not whole in memory, and a limit refuses larger ones
with a clean status (nothing spooled, the node keeps serving)."""

from __future__ import annotations

import hashlib
import tracemalloc

import pydicom

from medtriage.serve.node.scp import OUT_OF_RESOURCES, SUCCESS, start_scp
from medtriage.serve.node.store import SPOOL_DIR, NodeStore
from tests.serve.node.peers import NODE_AET, cr_study, free_port, send_files, storescu


def pixel_digest(path) -> str:
    return hashlib.sha256(pydicom.dcmread(path).PixelData).hexdigest()


def test_a_large_instance_is_received_through_a_file_not_held_in_memory(storescu_exe, tmp_path):
    (big,) = cr_study(tmp_path / "big", 1, seed=31, size=28 * 200)  # a 5600 x 5600 chest X-ray: 31 MB of pixels
    size = big.stat().st_size
    store = NodeStore(tmp_path / "state")
    port = free_port()
    server = start_scp(store, NODE_AET, "127.0.0.1", port)
    tracemalloc.start()
    try:
        sent = storescu(storescu_exe, port, [big])  # dcmtk in its own process: only the node's allocations are traced
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        server.shutdown()
    assert sent.returncode == 0, sent.stderr[-500:]
    row = store.instance(str(pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID))
    assert row["state"] == "received" and pixel_digest(store.spooled(row["spool"])) == pixel_digest(big)
    assert peak < size / 4, f"the node held {peak / 1e6:.1f} MB in memory for a {size / 1e6:.1f} MB instance"
    store.close()


def test_an_instance_over_the_limit_is_refused_out_of_resources_and_nothing_is_spooled(tmp_path):
    small, big = cr_study(tmp_path / "small", 1, seed=32)[0], cr_study(tmp_path / "big", 1, seed=33, size=28 * 40)[0]
    store = NodeStore(tmp_path / "state")
    port = free_port()
    server = start_scp(store, NODE_AET, "127.0.0.1", port, max_instance_bytes=big.stat().st_size // 2)
    try:
        assert send_files(port, [big, small]) == {big: OUT_OF_RESOURCES, small: SUCCESS}  # the association goes on
    finally:
        server.shutdown()
    assert store.counts()["instances"] == {"received": 1}
    assert [p.name for p in (tmp_path / "state" / SPOOL_DIR).iterdir()] == [
        store.spool_path(str(pydicom.dcmread(small).SOPInstanceUID)).name
    ]
    store.close()
