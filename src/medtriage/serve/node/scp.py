"""The Storage SCP: image storage SOP classes in the transfer syntaxes medtriage.io decodes, and C-ECHO.

A C-STORE is answered with success only after the instance is in the spool and its row committed
(store.receive). A data set whose identifying UIDs cannot be read gets 0xC210 (cannot understand); one of another
SOP class than its request 0xA900; a SOP Instance UID the store holds for another study 0x0111 (duplicate); a study
the store holds for another Patient ID 0xC210 (never merged into that patient's result). A full disk or database, a
database another process holds past the busy timeout, an instance over `--max-instance-bytes` (not written past the limit), or one that arrives when the store's disk has less
than `--min-free-bytes` left, gets 0xA700 (out of resources): the sender keeps it and retries, where a disk filled to
the last byte would fail the node's results, database and logs too. Pixels are decoded later by the worker: a file
that then fails to decode becomes a recorded rejection, not a network error.

Instances arrive in a file, never whole in memory (pynetdicom's STORE_RECV_CHUNKED_DATASET): a whole-slide image
or a tomosynthesis series of several GB would otherwise be held two or three times over in RAM per association.
`medtriage listen` points that file at the store's `incoming/` folder (same disk as the spool, not a RAM-backed /tmp).

pynetdicom still reads each PDU whole into memory before handling it, so the node advertises a maximum PDU length
(MAX_PDU_BYTES: conforming peers split a data set into PDUs no longer) and drops a peer whose PDU header claims more,
before reading its body: a peer cannot make the node hold more than one bounded PDU per association. Each PDU, and
each DIMSE message, is read to a deadline (READ_GRACE_S plus its length at MIN_READ_BYTES_PER_S): a peer that trickles
one is dropped.

Each connection holds one of `--max-associations` slots from the moment it is accepted, so one that has not sent
its whole A-ASSOCIATE-RQ (its TLS handshake included) within `--associate-timeout` is closed: a port scanner, a
health check that only opens the port, or a peer that stalls cannot keep a modality out for longer than that. An
association once established keeps the network timeout between its messages.
"""

from __future__ import annotations

import logging
import shutil
import ssl
import threading
import time
from pathlib import Path

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import _STORAGE_CLASSES, Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from medtriage.errors import ConfigError, MedTriageError
from medtriage.serve.node.header import read_identity
from medtriage.serve.node.store import (
    ASSOCIATE_WITHIN_S,
    MAX_ASSOCIATIONS,
    MAX_INSTANCE_BYTES,
    MIN_FREE_BYTES,
    ConflictingInstance,
    ConflictingPatient,
    NodeStore,
)

log = logging.getLogger(__name__)
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
]
IMAGE_STORAGE = sorted(uid for name, uid in _STORAGE_CLASSES.items() if "ImageStorage" in name)
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND, PROCESSING_FAILURE = 0x0000, 0xA700, 0xC210, 0x0110
DATA_SET_MISMATCH, DUPLICATE_INSTANCE = 0xA900, 0x0111  # PS3.4 Table B.2-1; PS3.7 Annex C (Duplicate SOP Instance)
MAX_PDU_BYTES = 1 << 20  # advertised and enforced; ample for association PDUs, and 64 data PDUs per 64 MB instance
# Each PDU must arrive within READ_GRACE_S plus its length at MIN_READ_BYTES_PER_S (8 KiB/s is 64 kbit/s, below any
# link DICOM is sent over): the socket's timeout restarts at each byte, so a peer that claims a long PDU and sends a
# byte now and then would otherwise hold its association, one of the node's few, for ever.
READ_GRACE_S, MIN_READ_BYTES_PER_S = 30.0, 8 << 10


class PduTooLong(OSError):
    """A peer's PDU header claims more than the node accepts; pynetdicom closes the connection on an OSError."""


class TooSlow(OSError):
    """A peer sends a PDU slower than its deadline allows; pynetdicom closes the connection on an OSError."""


class _DroppedRest:
    """Stands in for the file of an instance once it is over --max-instance-bytes: the rest is read off the network
    and dropped, so the disk holds no more than the limit, and handle_store still answers 0xA700 (the file is over
    the limit) when the instance ends, the association going on."""

    def __init__(self, spilled):
        spilled.close()
        self.name, self.file = spilled.name, self  # pynetdicom writes to it, then flushes `.file`

    def write(self, data) -> int:
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def bound_message(message, max_instance_bytes: int) -> None:
    """pynetdicom gathers a DIMSE message's fragments without a limit: an instance in its file, anything else in
    memory. Cap the file at the instance limit; a command, or a data set that is not an instance, past one PDU's
    worth is no conforming peer's: drop it."""
    spilled = getattr(message, "_data_set_file", None)
    if spilled is not None and not isinstance(spilled, _DroppedRest) and spilled.tell() > max_instance_bytes:
        message._data_set_file = _DroppedRest(spilled)
    held = message.encoded_command_set.tell() + (message.data_set.tell() if spilled is None else 0)
    if held > MAX_PDU_BYTES:
        raise PduTooLong(f"a DIMSE message of over {MAX_PDU_BYTES} bytes without an instance file: connection dropped")


class _BoundedPduSocket(AssociationSocket):
    """pynetdicom reads a PDU as recv(6) for its header, then recv(length) for its body: refuse the body up front,
    check the message that the PDUs so far make (bound_message) before reading the next, and read each PDU, and each
    DIMSE message, to its deadline (READ_GRACE_S, MIN_READ_BYTES_PER_S)."""

    max_instance_bytes = MAX_INSTANCE_BYTES
    grace_s, min_bytes_per_s = READ_GRACE_S, MIN_READ_BYTES_PER_S
    associate_by, associate_within_s = float("inf"), ASSOCIATE_WITHIN_S  # set per connection by _BoundedPduHandler
    # The DIMSE message being received, when its first PDU came, and the bytes read since (the class is swapped in
    # after pynetdicom builds the socket, so these start here, not in __init__).
    _message, _message_since, _message_bytes = None, 0.0, 0

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > MAX_PDU_BYTES:
            raise PduTooLong(f"a PDU of {nr_bytes} bytes exceeds the node's maximum of {MAX_PDU_BYTES}: connection dropped")
        message = getattr(self.assoc.dimse, "message", None)
        if message is not None:
            bound_message(message, self.max_instance_bytes)
        self._pace_message(message)
        deadline = time.monotonic() + self.grace_s + nr_bytes / self.min_bytes_per_s
        late = f"too slowly (under {self.min_bytes_per_s} bytes/s after {self.grace_s:g} s)"
        if self.assoc.requestor.primitive is None and self.associate_by < deadline:  # no A-ASSOCIATE-RQ yet
            deadline = self.associate_by
            late = f"(and no whole association request) within {self.associate_within_s:g} s of connecting (--associate-timeout)"
        received = self._read_by(nr_bytes, deadline, late)
        self._message_bytes += len(received)
        return received

    def _pace_message(self, message) -> None:
        """Each PDU meeting its own deadline is not enough: a peer sending a message as many tiny PDUs, each well in
        time, would hold the association as long as it liked. The message's PDUs share one deadline, by the same
        rule, from the first of them."""
        now = time.monotonic()
        if message is not self._message:
            self._message, self._message_since, self._message_bytes = message, now, 0
        elif message is not None and now > self._message_since + self.grace_s + self._message_bytes / self.min_bytes_per_s:
            raise TooSlow(
                f"the peer sent a DIMSE message of {self._message_bytes} bytes so far too slowly (under "
                f"{self.min_bytes_per_s} bytes/s after {self.grace_s:g} s): connection dropped"
            )

    def _read_by(self, nr_bytes: int, deadline: float, late: str) -> bytearray:
        """pynetdicom's read loop (fewer bytes when the peer closes), each wait cut short at `deadline`, and at the
        network timeout: an accepted socket has none of its own, and a peer silent mid-PDU would hold it for ever.
        `late` says how the peer missed the deadline."""
        timeout, previous, received = self.assoc.network_timeout, self.socket.gettimeout(), bytearray()
        try:
            while len(received) < nr_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TooSlow(f"the peer sent {len(received)} of {nr_bytes} bytes {late}: connection dropped")
                self.socket.settimeout(left if timeout is None else min(left, timeout))
                try:
                    chunk = self.socket.recv(min(4096, nr_bytes - len(received)))
                except TimeoutError:
                    if time.monotonic() < deadline:
                        raise  # the network timeout: the peer went silent
                    continue  # the deadline: said above
                if not chunk:
                    break
                received += chunk
        finally:
            self.socket.settimeout(previous)
        return received


class _BoundedPduHandler(RequestHandler):
    """Runs in the connection's own thread: its TLS handshake, then its association, both to its deadline."""

    def handle(self) -> None:
        self.associate_by = time.monotonic() + self.server.associate_within_s
        if isinstance(self.request, ssl.SSLSocket) and not self._handshake():
            self.server.shutdown_request(self.request)
            return
        super().handle()

    def _handshake(self) -> bool:
        previous = self.request.gettimeout()
        try:
            self.request.settimeout(max(self.associate_by - time.monotonic(), 0.001))
            self.request.do_handshake()  # bounded as a whole, not per read
        except OSError as err:  # a timeout, a peer that is not speaking TLS
            log.warning("no TLS handshake with %s:%s: %s; connection closed", *self.client_address[:2], err)
            return False
        self.request.settimeout(previous)
        return True

    def _create_association(self):
        assoc = super()._create_association()
        # pynetdicom builds the socket inside _create_association; taking over its class adds the bound to recv
        # without copying that setup (the subclass adds only the limits).
        assoc.dul.socket.__class__ = _BoundedPduSocket
        assoc.dul.socket.max_instance_bytes = self.server.max_instance_bytes
        assoc.dul.socket.associate_by, assoc.dul.socket.associate_within_s = self.associate_by, self.server.associate_within_s
        # A silent connection reads nothing for recv to bound: pynetdicom drops it when its ACSE timeout (the ARTIM
        # timer, and its wait for the A-ASSOCIATE-RQ) runs out, here at the connection's deadline.
        assoc.acse_timeout = max(self.associate_by - time.monotonic(), 0.001)
        return assoc


class _AssociationServer(ThreadedAssociationServer):
    def get_request(self):
        """pynetdicom does the TLS handshake here, in the one thread that accepts connections, with no timeout: a peer
        that connects and sends nothing would stop the node accepting any other. _BoundedPduHandler does it."""
        conn, address = self.socket.accept()
        if self.ssl_context:
            conn = self.ssl_context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, address


def handle_store(event, store: NodeStore, max_bytes: int = MAX_INSTANCE_BYTES, min_free_bytes: int = MIN_FREE_BYTES) -> int:
    """One C-STORE: spool + record, then answer. Never raises (pynetdicom would answer 0xC211 anyway)."""
    calling = event.assoc.requestor.ae_title
    try:
        received = Path(event.dataset_path)  # the file pynetdicom wrote the data set to as it arrived
        size = received.stat().st_size
        if size > max_bytes:
            log.warning("refused an instance of %d bytes from %s: over the limit of %d (--max-instance-bytes)", size, calling, max_bytes)
            return OUT_OF_RESOURCES
        if _short_of_space(store, min_free_bytes):
            log.error(
                "refused an instance from %s: under %d bytes free on the state folder's disk (--min-free-bytes)", calling, min_free_bytes
            )
            return OUT_OF_RESOURCES
        header = read_identity(received, where=f"C-STORE from {calling}")
    except MedTriageError as err:
        log.warning("refused an instance from %s: %s", calling, err)
        return CANNOT_UNDERSTAND
    except Exception as err:  # noqa: BLE001 -- pynetdicom could not even frame the data set
        log.warning("refused an unreadable data set from %s: %s", calling, err)
        return CANNOT_UNDERSTAND
    if header.sop_uid != str(event.request.AffectedSOPInstanceUID or header.sop_uid):
        log.warning("refused %s from %s: its SOP Instance UID differs from the request's", header.sop_uid, calling)
        return CANNOT_UNDERSTAND
    if header.sop_class != str(event.request.AffectedSOPClassUID or header.sop_class):
        # e.g. a report sent in an image context: stored, it would be answered success and never analysed
        log.warning(
            "refused %s from %s: its data set is of SOP class %s, its request of %s",
            header.sop_uid,
            calling,
            header.sop_class,
            event.request.AffectedSOPClassUID,
        )
        return DATA_SET_MISMATCH
    try:
        store.receive(received, header.sop_uid, header.study_uid, header.series_uid, header.sop_class, header.fields, calling_aet=calling)
    except ConflictingInstance as err:
        log.warning("refused an instance from %s: %s", calling, err)
        return DUPLICATE_INSTANCE
    except ConflictingPatient as err:
        log.warning("refused an instance from %s: %s", calling, err)
        return CANNOT_UNDERSTAND
    except OSError as err:
        log.error("cannot spool %s: %s", header.sop_uid, err)
        return OUT_OF_RESOURCES
    except Exception:
        log.exception("cannot record %s", header.sop_uid)
        return PROCESSING_FAILURE
    return SUCCESS


def _short_of_space(store: NodeStore, min_free_bytes: int) -> bool:
    """Whether the disk of the store's folder holds less than `min_free_bytes` free (the instance already on it)."""
    return store.folder is not None and shutil.disk_usage(store.folder).free < min_free_bytes


def discard_partial_instance(event) -> None:
    """When a connection ends, remove the file of an instance it was still sending. pynetdicom creates that file with
    delete=False and unlinks it only after a complete C-STORE: a peer that drops mid-instance (a modality rebooting,
    a network cut, a PDU over MAX_PDU_BYTES) would otherwise leave up to one instance on disk per association."""
    message = getattr(getattr(event.assoc, "dimse", None), "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return
    try:
        partial.close()
        Path(partial.name).unlink(missing_ok=True)
    except OSError as err:
        log.warning("cannot remove a half-received instance %s: %s; delete it by hand, or restart the node", partial.name, err)


def build_ae(aet: str, allowed_callers: list[str] | None = None, max_associations: int = MAX_ASSOCIATIONS) -> AE:
    ae = AE(ae_title=aet)
    for sop_class in IMAGE_STORAGE:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.require_calling_aet = list(allowed_callers or [])
    ae.maximum_pdu_size = MAX_PDU_BYTES  # what callers may send per PDU (enforced by _BoundedPduSocket)
    ae.network_timeout = ae.dimse_timeout = 60
    ae.maximum_associations = max_associations
    return ae


def start_scp(
    store: NodeStore,
    aet: str,
    host: str,
    port: int,
    allowed_callers: list[str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    max_instance_bytes: int = MAX_INSTANCE_BYTES,
    min_free_bytes: int = MIN_FREE_BYTES,
    max_associations: int = MAX_ASSOCIATIONS,
    associate_within_s: float = ASSOCIATE_WITHIN_S,
):
    """Start listening (in pynetdicom's threads); returns the server (call `.shutdown()` to stop)."""
    _config.STORE_RECV_CHUNKED_DATASET = True  # each arriving data set goes to a file (module docstring)
    ae = build_ae(aet, allowed_callers, max_associations)
    handlers = [
        (evt.EVT_C_STORE, handle_store, [store, max_instance_bytes, min_free_bytes]),
        (evt.EVT_CONN_CLOSE, discard_partial_instance),
    ]
    # AE.start_server(block=False), with the bounded request handler it offers no argument for
    try:
        server = ae.make_server(
            (host, port),
            ssl_context=ssl_context,
            evt_handlers=handlers,
            server_class=_AssociationServer,
            request_handler=_BoundedPduHandler,
        )
    except OSError as err:  # the port taken, or an address this machine does not have
        raise ConfigError(
            f"cannot listen on {host}:{port}: {err.strerror or err}",
            where="--host/--port",
            hint="choose a free --port, or stop the process that uses it; --host must be an address of this machine",
        ) from err
    server.max_instance_bytes = max_instance_bytes  # read by _BoundedPduHandler for each association
    server.associate_within_s = associate_within_s
    threading.Thread(target=make_target(server.serve_forever), name="AcceptorServer", daemon=True).start()
    ae._servers.append(server)
    return server
