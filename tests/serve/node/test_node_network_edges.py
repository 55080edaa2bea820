"""The node's network edges: what a DICOMweb server answers, a PACS that answers a result is a duplicate, with a
warning or a failure, or takes no association, a destination that never answers or stays down for days, a store that
cannot record a try, a sender that trickles, and `medtriage listen` options that cannot work."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.cli import main
from medtriage.errors import ConfigError
from medtriage.serve.node.scp import MAX_PDU_BYTES, OUT_OF_RESOURCES, SUCCESS, start_scp
from medtriage.serve.node.sender import DicomWebSender, DimseSender, Peer, Sender, backoff
from medtriage.serve.node.store import DB_FILE, MAX_INSTANCE_BYTES, Delivery, NodeStore
from medtriage.serve.tls import tls_context
from tests.serve.node.peers import NODE_AET, Listener, cr_study, echo, free_port, send_files, wait_for

SOP = "1.2.826.0.1.3680043.8.498.1"


def stow_answer(failed: bool) -> dict:
    """A PS3.18 STOW-RS answer in DICOM JSON: the instance as stored, or in the Failed SOP Sequence."""
    item = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.88.33"]}, "00081155": {"vr": "UI", "Value": [SOP]}}
    if failed:
        return {"00081198": {"vr": "SQ", "Value": [{**item, "00081197": {"vr": "US", "Value": [0xA700]}}]}}
    return {"00081199": {"vr": "SQ", "Value": [item]}}


def stow_server(status: int, answer: dict | bytes, media: str = "application/dicom+json") -> ThreadingHTTPServer:
    body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Type", media)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def delivery(tmp_path) -> Delivery:
    (file,) = cr_study(tmp_path / "out", 1, seed=41)
    return Delivery(7, "1.2.3", "sr", "dicomweb", file, SOP, 0)


@pytest.mark.parametrize(("status", "failed"), [(202, True), (200, True), (200, False)])
def test_a_stow_answer_listing_the_instance_as_failed_is_not_a_delivery(delivery, status, failed):
    server = stow_server(status, stow_answer(failed))
    try:
        outcome = DicomWebSender(f"http://127.0.0.1:{server.server_port}/dicom-web").send([delivery])
    finally:
        server.shutdown()
    if failed:
        assert outcome[7] is not None and "0xA700" in outcome[7]
    else:
        assert outcome == {7: None}


def test_a_stow_server_that_never_answers_costs_one_timeout_not_the_sender(delivery):
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts the connection; nobody ever answers
    outcome: dict = {}
    try:
        sender = DicomWebSender(f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web", timeout=1)
        thread = threading.Thread(target=lambda: outcome.update(sender.send([delivery])), daemon=True)
        thread.start()
        thread.join(timeout=20)
        assert not thread.is_alive(), "STOW-RS waited for an answer with no timeout"
    finally:
        silent.close()
    assert outcome[7] is not None and "Timeout" in outcome[7]


def accept_all(server: socket.socket, connections: list) -> None:
    """Take every connection to `server` and never answer, until it is closed."""
    try:
        while True:
            connections.append(server.accept()[0])
    except OSError:
        pass


def test_a_stow_server_that_never_answers_costs_one_timeout_per_batch_not_one_per_delivery(delivery):
    """The rest of a batch is not tried once the server did not answer: each try would wait out its timeout, and
    the sender, every other destination and a stop would wait for all of them."""
    silent = socket.create_server(("127.0.0.1", 0))
    connections: list = []
    threading.Thread(target=accept_all, args=(silent, connections), daemon=True).start()
    batch = [Delivery(i, "1.2.3", "sr", "dicomweb", delivery.file, f"{SOP}.{i}", 0) for i in range(4)]
    try:
        outcome = DicomWebSender(f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web", timeout=0.5).send(batch)
    finally:
        silent.close()
        for connection in connections:
            connection.close()
    assert len(connections) == 1
    assert set(outcome) == {0, 1, 2, 3} and all(error and "Timeout" in error for error in outcome.values())


def test_a_stow_server_that_is_down_fails_the_try_at_once(delivery):
    started = time.monotonic()
    outcome = DicomWebSender(f"http://127.0.0.1:{free_port()}/dicom-web").send([delivery])
    assert outcome[7] is not None and "ConnectionError" in outcome[7]
    assert time.monotonic() - started < 5, "the try slept in the sender thread instead of leaving the retry to its backoff"


class Down:
    def send(self, deliveries):
        return {d.id: "no association with PACS@127.0.0.1:4242" for d in deliveries}


def test_a_destination_down_for_days_is_retried_after_the_longest_wait_not_in_a_loop(tmp_path):
    assert backoff(2000, 60) == 60
    store = NodeStore(tmp_path / "state")
    store.record_instance("1.2.3.4", "1.2.3", "1.2.3.5", "1.2.840.10008.5.1.4.1.1.1", "x.dcm", {})
    assert store.close_study("1.2.3", None, "none", None, [("sr", "PACS", "sr.dcm", SOP)], seen=time.time() + 1, state="scored")
    store._execute("UPDATE deliveries SET attempts = 1100")  # some 17 hours of one-minute retries
    try:
        assert Sender(store, {"PACS": Down()}, retry_max=60).send_due()
        (row,) = store._execute("SELECT attempts, next_attempt FROM deliveries")
    finally:
        store.close()
    assert row["attempts"] == 1101 and row["next_attempt"] > time.time() + 50


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--retry-max", "0"),
        ("--port", "70000"),
        ("--metrics-port", "0"),
        ("--aet", "A-TITLE-OF-20-CHARS!"),
        ("--allow-aet", "BACK\\SLASH"),
        ("--dicomweb", "pacs:8042/dicom-web"),
    ],
)
def test_listen_names_the_option_that_cannot_work(tmp_path, capsys, option, value):
    args = ["listen", str(tmp_path / "missing-package"), "--send-to", "PACS@127.0.0.1:4242", "--state", str(tmp_path / "s")]
    assert main([*args, option, value]) == 2
    assert f"{option}" in capsys.readouterr().err.splitlines()[-1]


def test_a_port_in_use_is_a_clear_error(tmp_path):
    taken = socket.create_server(("127.0.0.1", free_port()))
    store = NodeStore(tmp_path / "state")
    try:
        with pytest.raises(ConfigError, match="--host/--port.*cannot listen on 127.0.0.1"):
            start_scp(store, NODE_AET, "127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
        store.close()


def test_a_missing_tls_certificate_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--tls-cert/--tls-key"):
        tls_context(tmp_path / "node.pem", tmp_path / "node.key")


def test_an_instance_over_the_limit_fills_no_more_disk_than_the_limit(tmp_path, monkeypatch):
    from medtriage.serve.node import scp

    (big,) = cr_study(tmp_path / "big", 1, seed=42, size=28 * 150)  # 17 MB of pixels
    (small,) = cr_study(tmp_path / "small", 1, seed=43)
    limit = 2 << 20
    on_disk: list[int] = []

    def measured(event, *args):
        on_disk.append(Path(event.dataset_path).stat().st_size)
        return handle_store(event, *args)

    handle_store = scp.handle_store
    monkeypatch.setattr(scp, "handle_store", measured)
    store = NodeStore(tmp_path / "state")
    port = free_port()
    server = start_scp(store, NODE_AET, "127.0.0.1", port, max_instance_bytes=limit)
    try:
        assert send_files(port, [big, small]) == {big: OUT_OF_RESOURCES, small: SUCCESS}
    finally:
        server.shutdown()
        store.close()
    assert on_disk[0] <= limit + 2 * MAX_PDU_BYTES < big.stat().st_size, f"{on_disk[0]} bytes on disk for a limit of {limit}"


def test_a_message_that_is_not_an_instance_is_not_gathered_in_memory_without_end():
    from medtriage.serve.node.scp import PduTooLong, bound_message

    class Fragments:  # a command (or a C-ECHO's data set) still arriving, fragment after fragment
        _data_set_file = None
        encoded_command_set, data_set = BytesIO(), BytesIO(bytes(MAX_PDU_BYTES + 1))

    Fragments.data_set.seek(0, 2)
    with pytest.raises(PduTooLong):
        bound_message(Fragments(), MAX_INSTANCE_BYTES)


def _held_while_trickling(port: int, give_up_s: float) -> float:
    """Claim a PDU of 1000 bytes and send its body a byte at a time; how long until the node closes the connection
    (`give_up_s` when it never does)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
        conn.sendall(bytes([0x01, 0]) + (1000).to_bytes(4, "big"))  # an A-ASSOCIATE-RQ's header
        while time.monotonic() - started < give_up_s:
            try:
                conn.sendall(b"\x00")
                conn.settimeout(0.1)
                if conn.recv(1) == b"":
                    break  # closed by the node
            except TimeoutError:
                continue
            except OSError:
                break  # reset by the node
    return time.monotonic() - started


def _held_while_fragmenting(port: int, give_up_s: float) -> float:
    """Associate, then send a C-ECHO command one byte per P-DATA PDU, each PDU whole and at once, a PDU every 50 ms:
    how long until the node drops the association (`give_up_s` when it never does)."""
    from pynetdicom import AE
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    started = time.monotonic()
    try:
        while assoc.is_established and time.monotonic() - started < give_up_s:
            fragment = P_DATA()
            fragment.presentation_data_value_list = [[context_id, b"\x01\x00"]]  # a command fragment, not the last
            assoc.dul.socket.send(P_DATA_TF(fragment).encode())
            time.sleep(0.05)
    finally:
        if assoc.is_established:
            assoc.abort()
    return time.monotonic() - started


def test_a_sender_that_splits_a_message_into_tiny_pdus_is_dropped_at_the_messages_deadline(tmp_path, monkeypatch):
    from medtriage.serve.node.scp import _BoundedPduSocket

    monkeypatch.setattr(_BoundedPduSocket, "grace_s", 0.5)  # every 1-byte PDU meets its own deadline at once
    monkeypatch.setattr(_BoundedPduSocket, "min_bytes_per_s", 1 << 20)
    store = NodeStore(tmp_path / "state")
    port = free_port()
    server = start_scp(store, NODE_AET, "127.0.0.1", port)
    try:
        assert _held_while_fragmenting(port, give_up_s=6) < 3  # without the message's deadline: until the peer gives up
        (path,) = cr_study(tmp_path / "in", 1, seed=45)
        assert send_files(port, [path]) == {path: SUCCESS}  # a sender at network speed meets every deadline
    finally:
        server.shutdown()
        store.close()


def test_a_sender_that_trickles_a_pdu_is_dropped_at_its_deadline_and_others_are_served(tmp_path, monkeypatch):
    from medtriage.serve.node.scp import _BoundedPduSocket

    monkeypatch.setattr(_BoundedPduSocket, "grace_s", 0.5)  # a 1000-byte PDU's deadline: 0.5 s + 1 ms
    monkeypatch.setattr(_BoundedPduSocket, "min_bytes_per_s", 1 << 20)
    store = NodeStore(tmp_path / "state")
    port = free_port()
    server = start_scp(store, NODE_AET, "127.0.0.1", port)
    try:
        assert _held_while_trickling(port, give_up_s=6) < 3  # without the deadline: until the peer gives up
        (path,) = cr_study(tmp_path / "in", 1, seed=44)
        assert send_files(port, [path]) == {path: SUCCESS}  # a sender at network speed meets every deadline
    finally:
        server.shutdown()
        store.close()


def test_an_instance_arriving_while_another_process_holds_the_database_is_answered_out_of_resources(tmp_path):
    """Before, 0x0110 (processing failure), which modalities do not retry; out of resources (0xA700), the sender
    keeps the instance and sends it again."""
    (image,) = cr_study(tmp_path / "in", 1, seed=44)
    store = NodeStore(tmp_path / "state")
    store._db.execute("PRAGMA busy_timeout = 100")  # not the 30 s a node waits for its database
    holder = sqlite3.connect(tmp_path / "state" / DB_FILE, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a writer of another process (a worklist, a backup tool)
    port = free_port()
    server = start_scp(store, NODE_AET, "127.0.0.1", port)
    try:
        assert send_files(port, [image]) == {image: OUT_OF_RESOURCES}
        holder.execute("COMMIT")
        assert send_files(port, [image]) == {image: SUCCESS}
    finally:
        server.shutdown()
        store.close()
        holder.close()


def storage_scp(port: int, status: int):
    """A pynetdicom Storage SCP on loopback that answers every C-STORE of a result with `status`."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

    ae = AE(ae_title="PACS")
    for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
        ae.add_supported_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: status)])


@pytest.mark.parametrize(
    ("status", "attempts", "delivered"),
    [(0x0111, 0, True), (0x0111, 3, True), (0xA700, 3, False)],
    ids=["duplicate at the first try", "duplicate at a resend", "out of resources"],
)
def test_a_pacs_answering_duplicate_already_holds_the_result_and_it_is_delivered(tmp_path, caplog, status, attempts, delivered):
    """Before, 0x0111 was a failed try, retried for ever: the PACS had stored the result at a try whose success was
    not recorded (a crash before the commit, at the first try or a later one), and refused each resend of it."""
    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))  # a Comprehensive SR, as the node sends
    store = NodeStore(tmp_path / "state")
    store.record_instance("1.2.3.4", "1.2.3", "1.2.3.5", "1.2.840.10008.5.1.4.1.1.1", "x.dcm", {})
    sr.save_as(store.outbox_path("sr.dcm"))
    assert store.close_study(
        "1.2.3", None, None, sr.SOPInstanceUID, [("sr", "PACS", "sr.dcm", sr.SOPInstanceUID)], time.time() + 1, "scored"
    )
    store._execute("UPDATE deliveries SET attempts = ?", (attempts,))
    port = free_port()
    server = storage_scp(port, status)
    try:
        with caplog.at_level("INFO", logger="medtriage.serve.node.sender"):
            Sender(store, {"PACS": DimseSender(Peer("PACS", "127.0.0.1", port), NODE_AET)}, retry_max=60).send_due()
        (row,) = store._execute("SELECT state, attempts, last_error FROM deliveries")
        (study,) = store._execute("SELECT state FROM studies")
    finally:
        server.shutdown()
        store.close()
    if delivered:
        assert (row["state"], row["attempts"], study["state"]) == ("delivered", attempts, "delivered")
        (said,) = [r.getMessage() for r in caplog.records if "already holds" in r.getMessage()]
        assert sr.SOPInstanceUID in said and "0x0111" in said and "PACS@127.0.0.1" in said
    else:
        assert (row["state"], row["attempts"], study["state"]) == ("pending", attempts + 1, "failed") and "0xA700" in row["last_error"]


def queued_sr(store: NodeStore) -> pydicom.Dataset:
    """A Comprehensive SR, as the node sends, queued in `store` for the destination "PACS"."""
    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    store.record_instance("1.2.3.4", "1.2.3", "1.2.3.5", "1.2.840.10008.5.1.4.1.1.1", "x.dcm", {})
    sr.save_as(store.outbox_path("sr.dcm"))
    assert store.close_study(
        "1.2.3", None, None, sr.SOPInstanceUID, [("sr", "PACS", "sr.dcm", sr.SOPInstanceUID)], time.time() + 1, "scored"
    )
    return sr


class Steps(threading.Event):
    """A stop event for Sender.run that stops it at its `steps`-th wait, and keeps how long each wait was to be."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps, self.waits = steps, []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        if len(self.waits) >= self.steps:
            self.set()
        return self.is_set()


def test_a_sender_that_cannot_record_an_outcome_backs_off_instead_of_resending_at_every_poll(tmp_path, caplog):
    """Before, a step that raised (the store's database locked, full or read-only once the PACS had stored the result)
    was tried again at the next poll, 0.2 s later: the results sent again five times a second, a traceback each."""
    store = NodeStore(tmp_path / "state")
    queued_sr(store)
    store._db.execute("PRAGMA busy_timeout = 100")  # not the 30 s a node waits for its database
    holder = sqlite3.connect(tmp_path / "state" / DB_FILE, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a writer of another process: the store cannot record the delivery
    port = free_port()
    server = storage_scp(port, 0x0000)
    sender = Sender(store, {"PACS": DimseSender(Peer("PACS", "127.0.0.1", port), NODE_AET)}, retry_max=60)
    try:
        with caplog.at_level("ERROR", logger="medtriage.serve.node.sender"):
            sender.run(locked := Steps(3))
        holder.execute("COMMIT")
        sender.run(Steps(1))
        (row,) = store._execute("SELECT state FROM deliveries")
    finally:
        server.shutdown()
        store.close()
        holder.close()
    assert locked.waits == [1, 2, 4] and row["state"] == "delivered"
    said = caplog.records[0].getMessage()
    assert "database is locked" in said and str(tmp_path / "state") in said


@pytest.mark.parametrize(
    ("pacs", "said"),
    [
        ("checks the called AE title", ["Called AE title not recognised", "'OTHER' in --send-to"]),
        ("knows other callers only", ["Calling AE title not recognised", f"{NODE_AET!r} (--aet)"]),
        ("stores CT only", ["none of the result classes", "enable their storage"]),
        ("is not listening", ["no association", "runs and listens"]),
    ],
)
def test_a_destination_that_takes_no_association_is_a_failed_try_that_says_why_and_what_to_change(tmp_path, pacs, said):
    """Before, each was recorded as "no association with ...": a PACS that rejects the node's AE title looked like one
    that is down, and neither said what to change."""
    from pynetdicom import AE
    from pynetdicom.sop_class import ComprehensiveSRStorage, CTImageStorage

    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage if pacs == "stores CT only" else ComprehensiveSRStorage)
    ae.require_called_aet = True
    ae.require_calling_aet = ["ORTHANC"] if pacs == "knows other callers only" else []
    port = free_port()
    server = None if pacs == "is not listening" else ae.start_server(("127.0.0.1", port), block=False)
    store = NodeStore(tmp_path / "state")
    queued_sr(store)
    called = "OTHER" if pacs == "checks the called AE title" else "PACS"
    try:
        Sender(store, {"PACS": DimseSender(Peer(called, "127.0.0.1", port), NODE_AET, timeout=5)}, retry_max=60).send_due()
        (row,) = store._execute("SELECT state, last_error FROM deliveries")
    finally:
        if server is not None:
            server.shutdown()
        store.close()
    assert row["state"] == "pending" and f"{called}@127.0.0.1:{port}" in row["last_error"]
    assert all(part in row["last_error"] for part in said), row["last_error"]


def c_store_status(code: int, comment: str = "") -> pydicom.Dataset:
    """A C-STORE response's status, with an Error Comment (0000,0902) when `comment` is given."""
    status = pydicom.Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment
    return status


@pytest.mark.parametrize(
    ("code", "comment", "delivered"),
    [
        (0xB000, "", True),
        (0xB00A, "Patient name coerced", True),
        (0x0001, "", True),
        (0x0107, "", True),
        (0x0116, "Value out of range", True),
        (0xA700, "Instance already exists", False),
        (0xA900, "", False),
        (0xC000, "Duplicate SOP instance", False),
        (0x0122, "", False),
        (0xD123, "", False),
    ],
    ids=lambda value: f"0x{value:04X}" if isinstance(value, int) and not isinstance(value, bool) else None,
)
def test_a_c_store_status_is_read_by_its_class_and_a_refusal_is_recorded_with_its_comment(tmp_path, caplog, code, comment, delivered):
    """Before, only 0x0000, 0xB000, 0xB006 and 0xB007 were deliveries: a PACS's other warnings (0001, 0107, 0116, Bxxx,
    each meaning stored, PS3.7 C) made a stored result a failed try, sent again every minute for ever; and a refusal
    was recorded without the Error Comment saying why. A failure stays a failure whatever its comment says."""
    store = NodeStore(tmp_path / "state")
    sr = queued_sr(store)
    port = free_port()
    server = storage_scp(port, c_store_status(code, comment))
    try:
        with caplog.at_level("INFO", logger="medtriage.serve.node.sender"):
            Sender(store, {"PACS": DimseSender(Peer("PACS", "127.0.0.1", port), NODE_AET)}, retry_max=60).send_due()
        (row,) = store._execute("SELECT state, attempts, last_error FROM deliveries")
        (study,) = store._execute("SELECT state, reason FROM studies")
    finally:
        server.shutdown()
        store.close()
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"0x{code:04X}" in said and comment in said
    if delivered:
        assert (row["state"], row["attempts"], study["state"]) == ("delivered", 0, "delivered")
        assert "with a warning" in said
    else:
        assert (row["state"], row["attempts"], study["state"]) == ("pending", 1, "failed")
        for recorded in (row["last_error"], study["reason"]):
            assert f"0x{code:04X}" in recorded and comment in recorded and "PACS@127.0.0.1" in recorded and sr.SOPInstanceUID in recorded


def duplicate_answer(sop_uid: str, reason: int = 0x0111) -> dict:
    """A STOW-RS answer in DICOM JSON listing `sop_uid` in its Failed SOP Sequence with `reason`."""
    item = {"00081155": {"vr": "UI", "Value": [sop_uid]}, "00081197": {"vr": "US", "Value": [reason]}}
    return {"00081198": {"vr": "SQ", "Value": [item]}}


def duplicate_answer_xml(sop_uid: str) -> bytes:
    """The same answer in DICOM XML (PS3.19), as a server answering XML by default sends it."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?><NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
        '<DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence"><Item number="1">'
        f'<DicomAttribute tag="00081155" vr="UI" keyword="ReferencedSOPInstanceUID"><Value number="1">{sop_uid}</Value></DicomAttribute>'
        '<DicomAttribute tag="00081197" vr="US" keyword="FailureReason"><Value number="1">273</Value></DicomAttribute>'
        "</Item></DicomAttribute></NativeDicomModel>"
    ).encode()


@pytest.mark.parametrize(
    ("status", "answer", "delivered"),
    [
        (202, "duplicate", True),
        (409, "duplicate", True),
        (409, "duplicate in XML", True),
        (202, "another instance's duplicate", False),
        (409, "out of resources", False),
    ],
)
def test_a_stow_answer_refusing_our_result_as_a_duplicate_is_a_delivery(tmp_path, caplog, status, answer, delivered):
    """Before, a Failed SOP Sequence item of 0x0111 for the SR (in a 202, or the 409 of a request that stored
    nothing) was a failed try, retried for ever, as 0x0111 to a C-STORE was."""
    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    bodies = {
        "duplicate": (duplicate_answer(sr.SOPInstanceUID), "application/dicom+json"),
        "duplicate in XML": (duplicate_answer_xml(sr.SOPInstanceUID), "application/dicom+xml; charset=utf-8"),
        "another instance's duplicate": (duplicate_answer(f"{sr.SOPInstanceUID}.9"), "application/dicom+json"),
        "out of resources": (duplicate_answer(sr.SOPInstanceUID, 0xA700), "application/dicom+json"),
    }
    store = NodeStore(tmp_path / "state")
    store.record_instance("1.2.3.4", "1.2.3", "1.2.3.5", "1.2.840.10008.5.1.4.1.1.1", "x.dcm", {})
    sr.save_as(store.outbox_path("sr.dcm"))
    assert store.close_study(
        "1.2.3", None, None, sr.SOPInstanceUID, [("sr", "dicomweb", "sr.dcm", sr.SOPInstanceUID)], time.time() + 1, "scored"
    )
    server = stow_server(status, *bodies[answer])
    url = f"http://127.0.0.1:{server.server_port}/dicom-web"
    try:
        with caplog.at_level("INFO", logger="medtriage.serve.node.sender"):
            Sender(store, {"dicomweb": DicomWebSender(url)}, retry_max=60).send_due()
        (row,) = store._execute("SELECT state, attempts, last_error FROM deliveries")
        (study,) = store._execute("SELECT state FROM studies")
    finally:
        server.shutdown()
        store.close()
    said = [r.getMessage() for r in caplog.records if "already holds" in r.getMessage()]
    if delivered:
        assert (row["state"], row["attempts"], study["state"]) == ("delivered", 0, "delivered")
        assert len(said) == 1 and sr.SOPInstanceUID in said[0] and "0x0111" in said[0] and url in said[0]
    else:
        assert (row["state"], row["attempts"], study["state"]) == ("pending", 1, "failed") and not said
        assert ("0x0111" if status == 202 else "409") in row["last_error"]


def _closed_by_the_node(conn: socket.socket) -> bool:
    """Whether the node has closed `conn`."""
    conn.settimeout(0.1)
    try:
        while conn.recv(4096):
            pass  # what the node sent before closing (an A-ABORT)
    except TimeoutError:
        return False
    except OSError:
        pass  # reset by the node
    return True


def _stored(port: int, paths: list[Path], client=None, pause_s: float = 0) -> dict[Path, int | None]:
    """C-STORE `paths` on one association (over TLS with the `client` context), `pause_s` between them: each one's
    status (None: no response came)."""
    from pynetdicom import AE

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")  # CR in Explicit VR LE, as cr_study
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET, tls_args=(client, "localhost") if client else None)
    statuses: dict[Path, int | None] = dict.fromkeys(paths)
    if not assoc.is_established:
        return statuses
    try:
        for k, path in enumerate(paths):
            time.sleep(pause_s if k else 0)
            statuses[path] = getattr(assoc.send_c_store(path), "Status", None)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def _tls_pair(cert: Path, key: Path):
    """The node's TLS context over a self-signed certificate for localhost, and a client context trusting it."""
    import ssl

    return tls_context(cert, key), ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_connections_that_send_no_whole_association_request_are_dropped_and_free_their_slots(tmp_path, self_signed_tls, tls):
    """Before, each held one of the node's association slots for 30 s (pynetdicom's ACSE timeout, the PDU read
    deadline), and over TLS one silent connection stopped the node accepting any other: its handshake ran in the
    accepting thread, without a timeout. A silent peer, one that sends part of an A-ASSOCIATE-RQ and one that sends a
    byte of it fill every slot; the node drops them after `associate_within_s`, a sender then gets through, and an
    association that pauses between its C-STOREs for longer than that bound is not dropped."""
    context, client = _tls_pair(*self_signed_tls) if tls else (None, None)
    paths = cr_study(tmp_path / "in", 3, seed=46)
    store = NodeStore(tmp_path / "state")
    port = free_port()
    server = start_scp(store, NODE_AET, "127.0.0.1", port, ssl_context=context, max_associations=3, associate_within_s=1)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        if tls:  # the first stays silent before its handshake, the others after it
            idle[1:] = [client.wrap_socket(conn, server_hostname="localhost") for conn in idle[1:]]
        idle[1].sendall(bytes([0x01, 0]) + (1000).to_bytes(4, "big") + bytes(100))
        idle[2].sendall(b"\x01")
        wait_for(lambda: all(_closed_by_the_node(conn) for conn in idle), 30, "the node to drop the idle connections")
        wait_for(lambda: _stored(port, paths[:1], client) == {paths[0]: SUCCESS}, 30, "a C-STORE to get through")
        assert _stored(port, paths[1:], client, pause_s=2) == dict.fromkeys(paths[1:], SUCCESS)
    finally:
        for conn in idle:
            conn.close()
        server.shutdown()
        store.close()


def test_listen_serves_max_associations_at_once_and_closes_a_stalled_request_at_the_associate_timeout(package_dir, tmp_path):
    """`medtriage listen --max-associations 1 --associate-timeout 1`: with one association open a second is refused,
    and a connection that stops in its association request is closed, the log naming the option."""
    from pynetdicom import AE

    port = free_port()
    options = ("--send-to", "PACS@127.0.0.1:1", "--max-associations", "1", "--associate-timeout", "1")
    node = Listener(package_dir, tmp_path / "state", port, *options).start()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10

    def associated():  # once the start's C-ECHO has left its slot
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
        return assoc if assoc.is_established else None

    held = None
    try:
        held = wait_for(associated, 30, "an association")
        time.sleep(1.5)  # past the associate timeout: an open association is not closed by it
        assert held.is_established and not echo(port)  # its one slot is taken
        held.release()
        wait_for(lambda: echo(port), 30, "the node to serve another association")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as stalled:
            stalled.sendall(b"\x01")  # the first byte of an A-ASSOCIATE-RQ
            wait_for(lambda: _closed_by_the_node(stalled), 30, "the node to close the stalled connection")
        said = "within 1 s of connecting (--associate-timeout)"
        wait_for(lambda: said in node.log.read_text(), 30, "the log to say why the connection was closed")
    finally:
        if held is not None and held.is_established:
            held.abort()
        assert node.stop() == 0
