"""Untrusted values a peer sends before its instance is accepted: an A-ASSOCIATE-RQ whose AE title carries a line
break (quoted by pynetdicom in the node's log) and a data set whose elements before Pixel Data are large (read to
answer the C-STORE, in every association at once, and again as the header its study's SR references)."""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import struct
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medtriage.errors import DicomError
from medtriage.serve.dicom_results import SR_HEADER_READ_BYTES, read_header
from medtriage.serve.node.cli import node_log_handler
from medtriage.serve.node.header import HEADER_READ_BYTES, read_identity
from medtriage.serve.node.scp import start_scp
from medtriage.serve.node.store import NodeStore
from tests.memory import outcome_and_peak_bytes
from tests.serve.node.peers import NODE_AET, cr_study, free_port, wait_for

RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")  # each record of the node's log starts with its time
BULK = 64 << 20  # far over what reading the identity may hold


def _item(kind: int, data: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(data)) + data


def associate_rq(calling: bytes) -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification, from the calling AE title `calling` (raw bytes, as a peer may send)."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2"))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)))
    body = struct.pack(">HH", 1, 0) + NODE_AET.encode().ljust(16) + calling.ljust(16)[:16] + bytes(32)
    body += _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user
    return struct.pack(">BBI", 1, 0, len(body)) + body


def test_an_ae_title_with_a_line_break_cannot_forge_a_line_of_the_node_log(tmp_path):
    log = io.StringIO()
    handler = node_log_handler(log)
    root = logging.getLogger()
    root.addHandler(handler)
    store = NodeStore(tmp_path / "state")
    port = free_port()
    server = start_scp(store, NODE_AET, "127.0.0.1", port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as peer:
            peer.sendall(associate_rq(b"X\n2024-01-01 00:00"))
            peer.recv(64)  # the node's answer: the request is refused
        wait_for(lambda: "Calling AE Title" in log.getvalue(), 5, "the refusal in the log")
    finally:
        root.removeHandler(handler)
        server.shutdown()
        store.close()
    lines = log.getvalue().splitlines()
    forged = [line for line in lines if line.startswith("2024-01-01")]
    assert not forged, log.getvalue()
    assert any("X\\n2024-01-01" in line for line in lines)  # the value is shown, escaped
    assert all(RECORD_START.match(line) or line.startswith(" ") for line in lines), log.getvalue()


def with_bulk_before_pixels(path: Path, nested: bool) -> Path:
    """The file at `path` with a private element of BULK bytes ahead of its identifying UIDs; `nested`: inside an item
    of a sequence of undefined length, which a reader cannot skip without parsing."""
    ds = pydicom.dcmread(path)
    block = ds.private_block(0x0009, "ACME", create=True)
    if nested:
        item = Dataset()
        item.add_new(0x00091001, "OB", b"\0" * BULK)
        block.add_new(0x02, "SQ", Sequence([item]))
        ds[0x00091002].is_undefined_length = True
    else:
        block.add_new(0x01, "OB", b"\0" * BULK)
    ds.save_as(path)
    return path


def test_a_large_element_before_the_identity_is_skipped_not_read(tmp_path):
    (path,) = cr_study(tmp_path, 1, seed=3)
    expected = read_identity(path)
    with_bulk_before_pixels(path, nested=False)
    header, peak = outcome_and_peak_bytes(lambda: read_identity(path))
    assert header == expected and peak < HEADER_READ_BYTES * 2


def test_a_large_element_in_a_sequence_before_the_identity_is_refused_not_read(tmp_path):
    (path,) = cr_study(tmp_path, 1, seed=4)
    with_bulk_before_pixels(path, nested=True)
    refused, peak = outcome_and_peak_bytes(lambda: read_identity(path, where="C-STORE from MODALITY"))
    assert isinstance(refused, DicomError) and "header" in str(refused) and peak < HEADER_READ_BYTES * 2


def test_the_identity_of_a_deflated_instance_larger_than_the_bound_is_read(tmp_path):
    """Deflated, the data set is read as it inflates, as far as the identity: the pixels after it are never inflated
    (tests/serve/test_deflate_bombs.py measures the memory)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    (path,) = cr_study(tmp_path, 1, seed=5)
    expected = read_identity(path)
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 2100  # over HEADER_READ_BYTES of pixels that deflate cannot shrink
    ds.PixelData = os.urandom(2100 * 2100)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path)
    assert path.stat().st_size > HEADER_READ_BYTES
    assert read_identity(path) == expected


def test_the_header_an_sr_references_is_read_within_the_bound_or_refused(tmp_path):
    """Before, the whole header before the pixels was read into memory to build the study's SR, a private element of
    BULK bytes with it."""
    (path,) = cr_study(tmp_path, 1, seed=6)
    assert read_header(path) == pydicom.dcmread(path, stop_before_pixels=True)  # within the bound: read whole, as before
    with_bulk_before_pixels(path, nested=False)
    refused, peak = outcome_and_peak_bytes(lambda: read_header(path))
    assert isinstance(refused, DicomError) and refused.where == str(path) and refused.hint, refused
    assert f"over {SR_HEADER_READ_BYTES} bytes" in refused.reason and "SR" in refused.reason
    assert BULK > SR_HEADER_READ_BYTES and peak < SR_HEADER_READ_BYTES
