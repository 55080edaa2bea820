"""The DICOM node under network trouble: a peer that drops the connection mid-instance leaves nothing behind,
and a destination that cannot even be reached gets the same backoff and record as one that refuses."""

from __future__ import annotations

import socket
import struct
import tempfile
import time

import pytest
from pynetdicom import AE

from medtriage.serve.node.scp import MAX_PDU_BYTES, start_scp
from medtriage.serve.node.sender import Sender
from medtriage.serve.node.store import INCOMING_DIR, NodeStore
from tests.serve.node.peers import NODE_AET, cr_study, echo, free_port, wait_for

FIELDS = {"patient_id": "P", "accession": "A", "study_date": "", "study_description": "", "modality": "CR"}


def drop_mid_instance(port: int, path, how: str, after_pdus: int = 2) -> None:
    """Start a C-STORE of `path`, then, after `after_pdus` P-DATA PDUs, cut the TCP connection (a modality rebooting)
    or send a PDU header over the node's maximum (the node drops the peer)."""
    ae = AE(ae_title="DROPPER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    ae.acse_timeout = ae.network_timeout = 5
    ae.dimse_timeout = 1  # no response will come
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established
    transport, send, sent = assoc.dul.socket, assoc.dul.socket.send, [0]

    def send_then_drop(data: bytes) -> None:
        if data[:1] == b"\x04":  # a P-DATA-TF PDU
            sent[0] += 1
            if sent[0] > after_pdus:
                if how == "oversized PDU":
                    send(struct.pack(">BBL", 0x04, 0, MAX_PDU_BYTES + 1))
                transport.socket.shutdown(socket.SHUT_RDWR)  # the node reads the end of the connection mid data set
                return
        send(data)

    transport.send = send_then_drop
    try:
        assoc.send_c_store(path)
    except Exception:  # noqa: BLE001 -- the SCU side of the drop
        pass
    assoc.abort()


@pytest.mark.parametrize("how", ["connection cut", "oversized PDU"])
def test_a_peer_dropping_mid_instance_leaves_no_partial_file_in_incoming(how, tmp_path, monkeypatch):
    (big,) = cr_study(tmp_path / "big", 1, seed=41, size=28 * 80)  # ~5 MB: several 1 MB PDUs
    store = NodeStore(tmp_path / "state")
    monkeypatch.setattr(tempfile, "tempdir", str(store.incoming))  # as `medtriage listen` does
    port = free_port()
    server = start_scp(store, NODE_AET, "127.0.0.1", port)
    incoming = tmp_path / "state" / INCOMING_DIR
    try:
        for _ in range(3):
            drop_mid_instance(port, big, how)
        assert echo(port)  # still serving
        leftovers = lambda: sorted(incoming.iterdir())  # noqa: E731
        wait_for(lambda: not leftovers(), 10, "the half-received instances to be removed")
    except TimeoutError:
        pytest.fail(f"half-received instances stay on disk until a restart: {[p.name for p in leftovers()]}")
    finally:
        server.shutdown()
        store.close()


class Unreachable:
    """What DimseSender.send does for a host name that does not resolve: pynetdicom's associate raises."""

    def send(self, deliveries):
        raise socket.gaierror(-2, "Name or service not known")


class Accepting:
    def __init__(self):
        self.sent = []

    def send(self, deliveries):
        self.sent += [d.id for d in deliveries]
        return dict.fromkeys((d.id for d in deliveries), None)


def _study_with_its_sr_due(tmp_path, *destinations: str) -> NodeStore:
    """A state folder holding one scored study whose SR waits for each of `destinations`."""
    store = NodeStore(tmp_path / "state")
    (path,) = cr_study(tmp_path / "in", 1, seed=42)
    store.receive(path.read_bytes(), "1.1", "5.5", "1.2", "1.2.840.10008.5.1.4.1.1.1", FIELDS)
    store.set_scored("1.1", [{"priority": "routine", "probability": 0.1}])
    sr = store.outbox_path("sr.dcm")
    sr.write_bytes(path.read_bytes())
    deliveries = [("sr", destination, sr.name, "9.9") for destination in destinations]
    assert store.close_study("5.5", {"sop_uid": "1.1", "priority": "routine", "probability": 0.1}, None, "9.9", deliveries, time.time())
    return store


def test_an_unresolvable_destination_is_retried_with_backoff_and_does_not_hold_up_the_others(tmp_path):
    store = _study_with_its_sr_due(tmp_path, "PACS@pacs.invalid:104", "http://pacs/dicom-web")
    web = Accepting()
    sender = Sender(store, {"PACS@pacs.invalid:104": Unreachable(), "http://pacs/dicom-web": web}, retry_max=60)
    before = time.time()
    sender.send_due()  # raised before: no backoff (a traceback every poll) and, by set order, the other destination unsent
    assert len(web.sent) == 1
    (failed,) = store._execute("SELECT * FROM deliveries WHERE state = 'pending'")
    assert failed["attempts"] == 1 and failed["next_attempt"] >= before + 1
    assert "Name or service not known" in failed["last_error"] and "PACS@pacs.invalid:104" == failed["destination"]
    (study,) = store._execute("SELECT state, reason FROM studies")
    assert study["state"] == "failed" and "pacs.invalid" in study["reason"] and "retrying" in study["reason"]
    assert store.due_deliveries() == []  # not tried again at the next poll
    store.close()


def test_results_waiting_for_a_destination_no_longer_configured_are_named_at_start_and_in_the_study(tmp_path, caplog):
    """Before, they were retried forever as "no destination X", with nothing at start to say why (the node's
    --send-to had changed since the results were made)."""
    store = _study_with_its_sr_due(tmp_path, "OLDPACS@old.hospital:104")
    sender = Sender(store, {"PACS@pacs.hospital:104": Accepting()}, retry_max=60)
    with caplog.at_level("WARNING", logger="medtriage.serve.node.sender"):
        sender.say_unsent_elsewhere()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("1 result(s) wait for OLDPACS@old.hospital:104") and "start it with that destination" in warning
    sender.send_due()
    (study,) = store._execute("SELECT state, reason FROM studies")
    assert study["state"] == "failed" and "not configured to send there" in study["reason"]
    store.close()
