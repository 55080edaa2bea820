"""Large instances at the DICOM node: they arrive on disk, not whole in memory, and a limit refuses larger ones
with a clean status (nothing spooled, the node keeps serving). A peer cannot make the node buffer an oversized PDU."""

from __future__ import annotations

import hashlib
import shutil
import socket
import struct
import subprocess
import sys
import tracemalloc

import pydicom
import pytest

from medtriage.serve.node.scp import MAX_PDU_BYTES, OUT_OF_RESOURCES, SUCCESS, start_scp
from medtriage.serve.node.store import SPOOL_DIR, NodeStore
from tests.serve.node.peers import NODE_AET, cr_study, echo, free_port, send_files, storescu


def pixel_digest(path) -> str:
    return hashlib.sha256(pydicom.dcmread(path).PixelData).hexdigest()


def send_with(sender: str, storescu_exe: str, port: int, big) -> tuple[int, str]:
    """Send one file from a peer in its own process (only the node's allocations are traced): (exit code, stderr)."""
    if sender == "dcmtk":
        sent = storescu(storescu_exe, port, [big])
        return sent.returncode, sent.stderr
    code = f"import sys; from tests.serve.node.peers import send_files; sys.exit(send_files({port}, [sys.argv[1]])[sys.argv[1]])"
    sent = subprocess.run([sys.executable, "-c", code, str(big)], capture_output=True, text=True, timeout=120)
    return sent.returncode, sent.stderr


@pytest.mark.parametrize("sender", ["dcmtk", "pynetdicom"])  # pynetdicom fills each PDU up to the node's maximum
def test_a_large_instance_is_received_through_a_file_not_held_in_memory(sender, storescu_exe, tmp_path):
    (big,) = cr_study(tmp_path / "big", 1, seed=31, size=28 * 200)  # a 5600 x 5600 chest X-ray: 31 MB of pixels
    size = big.stat().st_size
    store = NodeStore(tmp_path / "state")
    port = free_port()
    server = start_scp(store, NODE_AET, "127.0.0.1", port)
    tracemalloc.start()
    try:
        returncode, stderr = send_with(sender, storescu_exe, port, big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        server.shutdown()
    assert returncode == 0, stderr[-500:]
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


def test_instances_are_refused_out_of_resources_while_the_disk_is_short_of_the_reserve_and_taken_after(tmp_path):
    first, second = cr_study(tmp_path / "study", 2, seed=34)
    store = NodeStore(tmp_path / "state")
    free = shutil.disk_usage(tmp_path).free
    ports = free_port(), free_port()
    short = start_scp(store, NODE_AET, "127.0.0.1", ports[0], min_free_bytes=free + (1 << 40))  # more than the disk has
    try:
        assert send_files(ports[0], [first]) == {first: OUT_OF_RESOURCES}
    finally:
        short.shutdown()
    assert store.counts()["instances"] == {} and not list((tmp_path / "state" / SPOOL_DIR).iterdir())
    roomy = start_scp(store, NODE_AET, "127.0.0.1", ports[1], min_free_bytes=1 << 20)  # the sender's retry, with room
    try:
        assert send_files(ports[1], [first, second]) == {first: SUCCESS, second: SUCCESS}
    finally:
        roomy.shutdown()
    store.close()


def offer(peer: socket.socket, limit: int) -> int:
    """Stream zeros until `limit` bytes or until the node hangs up; how many bytes were sent."""
    chunk, sent = bytes(1 << 16), 0
    try:
        while sent < limit:
            peer.sendall(chunk)
            sent += len(chunk)
    except OSError:  # the node closed the connection
        pass
    return sent


def test_a_pdu_claiming_more_than_the_node_accepts_drops_the_peer_before_its_body_is_read(tmp_path):
    store = NodeStore(tmp_path / "state")
    port = free_port()
    server = start_scp(store, NODE_AET, "127.0.0.1", port)
    offered = 64 << 20
    tracemalloc.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as peer:
            peer.sendall(struct.pack(">BBL", 0x01, 0, 1 << 30))  # an A-ASSOCIATE-RQ header claiming a 1 GiB body
            sent = offer(peer, offered)
        _, peak = tracemalloc.get_traced_memory()
        still_serving = echo(port)
    finally:
        tracemalloc.stop()
        server.shutdown()
        store.close()
    assert sent < offered, "the node read a 64 MB PDU body instead of hanging up"
    assert peak < 4 * MAX_PDU_BYTES, f"the node held {peak / 1e6:.1f} MB for a refused PDU"
    assert still_serving
