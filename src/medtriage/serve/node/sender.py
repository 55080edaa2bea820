"""Delivers the outbox: C-STORE SCU to `--send-to` and/or STOW-RS to `--dicomweb`.

A delivery that fails is retried with exponential backoff (1 s, 2 s, 4 s ... up to `retry_max`) and
stays queued until it is delivered: nothing is dropped. A resend after a crash carries the same SOP
Instance UID, so the PACS keeps one copy; a PACS that answers it 0x0111 (Duplicate SOP Instance) holds it
already, and it is delivered. A C-STORE status is read by its class (PS3.7 C): success and every warning
(0001, 0107, 0116, Bxxx: stored, perhaps altered) are deliveries; a failure (Axxx, Cxxx, 01xx, 02xx) or an
unknown code is a failed try, recorded with the PACS's Error Comment. A vendor's failure whose comment says
"duplicate" stays a failure: free text is no status, and would count a refused result as delivered.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import pydicom
import requests
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS, code_to_category

from medtriage.errors import ConfigError, printable
from medtriage.serve.node.store import Delivery, NodeStore, StoreClosed, backoff

log = logging.getLogger(__name__)
DUPLICATE = 0x0111  # Duplicate SOP Instance: the PACS holds an instance with this SOP Instance UID already
STORED = {STATUS_SUCCESS, STATUS_WARNING}  # PS3.4 B.2.3: a warning's instance is stored (its elements may be coerced)
COMMENT_CHARS = 64  # an Error Comment is LO (64 characters): a longer one from a peer is cut
RESULT_CLASSES = [ComprehensiveSRStorage, SecondaryCaptureImageStorage]
DICOMWEB = "dicomweb"


AE_TITLE = re.compile(r"[\x20-\x5B\x5D-\x7E]{1,16}")  # PS3.5 AE: printable ASCII without backslash


def is_ae_title(text: str) -> bool:
    """Whether pynetdicom takes `text` as an AE title (a control character would fail every try, retried for ever)."""
    return bool(AE_TITLE.fullmatch(text)) and bool(text.strip())


def check_port(port: int, where: str) -> None:
    """Refuse a TCP port outside 1..65535 (`where`: the option that gave it) before a socket fails on it."""
    if not 0 < port < 65536:
        raise ConfigError(f"port {port} is out of range", where=where, hint="give a port from 1 to 65535")


@dataclass(frozen=True)
class Peer:
    """A DICOM destination, parsed from 'AET@HOST:PORT'."""

    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        match = re.fullmatch(r"([^@]{1,16})@([A-Za-z0-9.\-:\[\]]+):(\d{1,5})", text.strip())
        if not match or not is_ae_title(match.group(1)):
            raise ConfigError(
                f"cannot read the destination {text!r}",
                where="--send-to",
                hint="write it as AET@HOST:PORT, e.g. ORTHANC@pacs.example.org:4242",
            )
        check_port(int(match.group(3)), where="--send-to")
        return cls(match.group(1), match.group(2).strip("[]"), int(match.group(3)))

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


def say_held(delivery: Delivery, destination: Peer | str, answer: str) -> None:
    """Log a result `destination` answered is a duplicate of one it holds: delivered. The UID is ours, made once for
    this result, so it holds this very object: a try whose success was not recorded (a lost response, a stop before
    the commit) stored it. A first try too: `attempts` counts failed tries only, so one stored before a crash left it
    at 0."""
    log.info(
        "%s for study %s: %s already holds SOP instance %s (%s, after %d failed tries): delivered",
        delivery.kind,
        delivery.study_uid,
        destination,
        delivery.sop_uid,
        answer,
        delivery.attempts,
    )


def c_store_answer(status: pydicom.Dataset) -> str:
    """A C-STORE response as logs and a study's reason quote it: its status, what PS3.4 Annex B calls that, and the
    PACS's Error Comment (0000,0902), which often names the vendor's own reason."""
    code = status.Status
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", ""))[1]
    comment = printable(str(status.get("ErrorComment") or "").strip())[:COMMENT_CHARS]
    return f"C-STORE status 0x{code:04X}" + (f" ({meaning})" if meaning else "") + (f", comment {comment!r}" if comment else "")


def say_warned(delivery: Delivery, destination: Peer, answer: str) -> None:
    """Log a result `destination` stored with a warning: delivered, though it may hold it altered (elements coerced or
    discarded), which its log details."""
    log.warning(
        "%s for study %s: %s stored SOP instance %s with a warning (%s): delivered; its log says what it changed",
        delivery.kind,
        delivery.study_uid,
        destination,
        delivery.sop_uid,
        answer,
    )


class DimseSender:
    def __init__(self, peer: Peer, calling_aet: str, timeout: float = 30):
        self.peer, self.calling_aet, self.timeout = peer, calling_aet, timeout

    def send(self, deliveries: list[Delivery]) -> dict[int, str | None]:
        """One association for all `deliveries`: delivery id -> None (stored) or the error."""
        ae = AE(ae_title=self.calling_aet)
        for sop_class in RESULT_CLASSES:
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        # connection_timeout too: a host that drops packets would otherwise hold the sender for the system's (minutes)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout
        assoc = ae.associate(self.peer.host, self.peer.port, ae_title=self.peer.aet)
        if not assoc.is_established:
            return dict.fromkeys((d.id for d in deliveries), self._not_associated(assoc))
        outcome = {}
        try:
            for delivery in deliveries:
                outcome[delivery.id] = self._store(assoc, delivery)
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        return {d.id: outcome.get(d.id, "association lost") for d in deliveries}

    def _not_associated(self, assoc) -> str:
        """Why `assoc` was not established, and what to change: most often a setting on one side or the other."""
        answer = assoc.acceptor.primitive  # the PACS's A-ASSOCIATE answer, None when none came
        if assoc.is_rejected and answer is not None:
            hint = {
                "Called AE title not recognised": f"check the AE title {self.peer.aet!r} in --send-to against the PACS's own",
                "Calling AE title not recognised": f"declare this node's AE title {self.calling_aet!r} (--aet) among the PACS's modalities",
            }.get(answer.reason_str, "the PACS's log says why")
            return f"{self.peer} rejected the association ({answer.result_str}: {answer.reason_str}); {hint}"
        if answer is not None and not assoc.accepted_contexts:
            return (
                f"{self.peer} accepts none of the result classes (Comprehensive SR, Secondary Capture) in explicit or "
                "implicit VR little endian; enable their storage on the PACS"
            )
        return f"no association with {self.peer} (refused, closed or not answered within {self.timeout:g} s); check that the PACS runs and listens there"

    def _store(self, assoc, delivery: Delivery) -> str | None:
        try:
            status = assoc.send_c_store(pydicom.dcmread(delivery.file))
        except Exception as err:  # noqa: BLE001 -- a refused context, a dropped connection: retried
            return f"{type(err).__name__}: {err}"
        code = getattr(status, "Status", None)
        if not isinstance(code, int):
            return f"no response from {self.peer}"
        answer = c_store_answer(status)
        if code == DUPLICATE:
            say_held(delivery, self.peer, answer)
            return None
        category = code_to_category(code)
        if category == STATUS_WARNING:
            say_warned(delivery, self.peer, answer)
        if category in STORED:
            return None
        return f"{self.peer} answered {answer}; its log says why it did not store SOP instance {delivery.sop_uid}"


class _TimedSession(requests.Session):
    """requests waits for ever by default: a server that takes the request and never answers would hold the sender,
    and with it every destination's deliveries."""

    def __init__(self, timeout: float):
        super().__init__()
        self.timeout = timeout

    def request(self, *args, **kwargs):
        kwargs.setdefault("timeout", self.timeout)
        return super().request(*args, **kwargs)


def failure_reason(item: pydicom.Dataset) -> int | None:
    """A Failed SOP Sequence item's FailureReason as a number: read from an XML answer, dicomweb_client keeps its text."""
    try:
        return int(item.get("FailureReason"))
    except (TypeError, ValueError):
        return None


def stow_failure(answer: pydicom.Dataset) -> str | None:
    """The failure a STOW-RS answer lists, or None. PS3.18 10.5.3: a 202 (and some servers' 200) still carries a
    Failed SOP Sequence for the instances it did not store, which no HTTP error reports."""
    failed = answer.get("FailedSOPSequence") or []
    if not failed:
        return None
    reason = failure_reason(failed[0])
    return f"refused {failed[0].get('ReferencedSOPInstanceUID', '')}" + (f" with reason 0x{reason:04X}" if reason is not None else "")


def refused_as_duplicate(answer: pydicom.Dataset, sop_uid: str) -> bool:
    """Whether a STOW-RS answer refuses `sop_uid`, and nothing else, as a duplicate (FailureReason 0x0111)."""
    failed = answer.get("FailedSOPSequence") or []
    return bool(failed) and all(item.get("ReferencedSOPInstanceUID") == sop_uid and failure_reason(item) == DUPLICATE for item in failed)


def conflict_answer(response: requests.Response | None) -> pydicom.Dataset | None:
    """The body of a 409 answer to a STOW-RS (PS3.18 10.5.3: nothing was stored, its Failed SOP Sequence says why),
    read as dicomweb_client reads a 2xx answer's; None for another status or a body that is neither DICOM JSON nor XML."""
    if response is None or response.status_code != 409:
        return None
    media = response.headers.get("Content-Type", "").split(";")[0].strip()
    try:
        if media in ("application/dicom+json", "application/json"):
            return pydicom.Dataset.from_json(response.json())
        if media in ("application/dicom+xml", "application/xml"):
            from xml.etree.ElementTree import fromstring

            with _pydicom_deprecations_quiet():
                from dicomweb_client.web import _load_xml_dataset

            return _load_xml_dataset(fromstring(response.content))
    except Exception:  # noqa: BLE001 -- an unreadable body: the 409 stays the failed try it is
        return None
    return None


@contextmanager
def _pydicom_deprecations_quiet():
    """dicomweb_client imports names pydicom 3 deprecates: pydicom would log a warning at every start of the node, in
    the hospital's journal, about code that is not the node's own."""
    quiet = logging.Filter()
    quiet.filter = lambda record: "is deprecated" not in record.getMessage()  # type: ignore[method-assign]
    logger = logging.getLogger("pydicom")
    logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.removeFilter(quiet)


class DicomWebSender:
    def __init__(self, url: str, timeout: float = 60):
        with _pydicom_deprecations_quiet():
            from dicomweb_client.api import DICOMwebClient

        self.url = url
        self.client = DICOMwebClient(url=url, session=_TimedSession(timeout))
        # Its own retries (5 tries, 2 to 16 s apart, on any error) would sleep in the sender thread, holding up every
        # other delivery and a shutdown: the Sender's backoff retries instead, and records why.
        self.client.set_http_retry_params(retry=False)

    def send(self, deliveries: list[Delivery]) -> dict[int, str | None]:
        """Each delivery in its own request: delivery id -> None (stored) or the error. Once the server could not be
        reached or did not answer, the rest are not tried (each would wait out the timeout again, holding the sender,
        every other destination and a stop): they fail with that error, and are retried with it."""
        outcome: dict[int, str | None] = {}
        for delivery in deliveries:
            try:
                outcome[delivery.id] = self._store(delivery)
            except Exception as err:  # noqa: BLE001 -- HTTP errors and refused connections alike: retried
                outcome[delivery.id] = f"STOW-RS to {self.url}: {type(err).__name__}: {str(err)[:200]}"
                if isinstance(err, (requests.ConnectionError, requests.Timeout)):
                    return {d.id: outcome.get(d.id, outcome[delivery.id]) for d in deliveries}
        return outcome

    def _store(self, delivery: Delivery) -> str | None:
        """One STOW-RS: None (stored, or held already) or the failure its answer lists; raises what the request did."""
        try:
            answer = self.client.store_instances([pydicom.dcmread(delivery.file)])
        except requests.HTTPError as err:  # a 409 whose body refuses only our result as a duplicate: held already
            answer = conflict_answer(err.response)
            if answer is None or not refused_as_duplicate(answer, delivery.sop_uid):
                raise
        if refused_as_duplicate(answer, delivery.sop_uid):
            say_held(delivery, self.url, "STOW-RS FailureReason 0x0111")
            return None
        failure = stow_failure(answer)
        return None if failure is None else f"STOW-RS to {self.url}: {failure}"


_NOT_CONFIGURED = (
    "this node is not configured to send there (its --send-to or --dicomweb changed since); start it with that "
    "destination as well to deliver them"
)


class Sender:
    """Sends due deliveries, grouped by destination; failures are rescheduled with backoff."""

    def __init__(self, store: NodeStore, senders: dict, retry_max: float = 60.0, poll_seconds: float = 0.2):
        self.store, self.senders, self.retry_max, self.poll_seconds = store, senders, retry_max, poll_seconds

    def say_unsent_elsewhere(self) -> None:
        """Warn of results waiting for a destination this node no longer sends to (its --send-to or --dicomweb
        changed since they were made): they stay pending, each study shown failed, until a node sends there again."""
        for destination, count in sorted(self.store.pending_destinations().items()):
            if destination not in self.senders:
                log.warning("%d result(s) wait for %s: %s", count, destination, _NOT_CONFIGURED)

    def run(self, stop: threading.Event) -> None:
        failed_steps = 0  # in a row: the store cannot record outcomes (a full disk, a read-only or locked database)
        while not stop.is_set():
            try:
                sent, failed_steps = self.send_due(), 0
            except StoreClosed as err:  # a stop that outwaited a slow destination: its answer is not recorded
                log.warning("%s; the results being sent stay pending and are sent again at the next start", err)
                return
            except Exception as err:  # noqa: BLE001 -- logged, and the step tried again
                # with backoff, not at the next poll: each step sends its due results again, their outcome unrecorded
                wait = backoff(failed_steps, self.retry_max)
                failed_steps += 1
                log.exception(
                    "delivering results failed (%s: %s); trying again in %.0f s: check the disk and database of the state folder %s",
                    type(err).__name__,
                    err,
                    wait,
                    self.store.folder,
                )
                stop.wait(wait)
                continue
            if not sent:
                stop.wait(self.poll_seconds)

    def send_due(self) -> bool:
        rescheduled = self.store.reschedule_past(self.retry_max)
        if rescheduled:
            log.warning("the clock was set back: %d result(s) due later than --retry-max from now are tried now", rescheduled)
        due = self.store.due_deliveries()
        for destination in {d.destination for d in due}:
            batch = [d for d in due if d.destination == destination]
            sender = self.senders.get(destination)
            try:
                results = sender.send(batch) if sender else dict.fromkeys((d.id for d in batch), _NOT_CONFIGURED)
            except Exception as err:  # noqa: BLE001 -- e.g. a host name that does not resolve: pynetdicom raises
                # a failed try like any other (backoff, the study's reason), and the other destinations still go
                error = f"cannot reach {destination} ({type(err).__name__}: {err}); check the host name and the network"
                results = dict.fromkeys((d.id for d in batch), error)
            for delivery in batch:
                error = results[delivery.id]
                if error is None:
                    self.store.set_delivered(delivery.id)
                else:
                    wait = backoff(delivery.attempts, self.retry_max)
                    log.warning("%s for study %s not delivered (%s); retry in %.0f s", delivery.kind, delivery.study_uid, error, wait)
                    self.store.set_attempt_failed(delivery, error, time.time() + wait)
        return bool(due)
