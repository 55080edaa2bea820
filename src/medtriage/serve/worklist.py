"""The radiologist's worklist: one row per study, most urgent first, read from the node's SQLite store.

Rows live in a NodeStore (serve/node/store.py): the DICOM node (`medtriage listen`) writes there, and so do
uploads to POST /v1/score. With a state folder (`serve --state DIR`, the same folder as the node's) the
list survives restarts; without one the store is in memory. A study's state is received (instances
arriving or queued), scored, delivered (its SR reached the PACS), failed (with the reason; deliveries
are retried) or not analysed (out of scope or rejected, with the reason; no SR is sent). The page
shows the newest `capacity` studies and up to `capacity` URGENT studies of the last day beyond them (the newest),
and counts the studies it leaves out. Each row names its source (the upload's `X-Source`, the node's calling AE
title: the names of the drift monitor) and says whether that source drifts now (to the drift monitor of this service, or
of the DICOM node writing the same folder). The occlusion overlay of a study's most urgent image is drawn
the first time someone opens it (from the spooled file, or an upload's display copy) and kept. A picture is only ever
shown with the score of the package that drew it (name, version and sha256): a row scored by another package than the
served one (scored before a restart with a new package, or by a DICOM node running another) keeps a picture that package
drew, and otherwise says why it has none rather than show where a different model looked.

GET  /worklist                        the page (static HTML; its data calls carry the bearer token)
GET  /v1/worklist                     rows: scored ones URGENT > review > routine, then probability; then the rest
GET  /v1/worklist/{id}                one row with all class probabilities, the thresholds and whether p is calibrated
GET  /v1/worklist/{id}/overlay.png    the image with where the model looked
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from medtriage.errors import MedTriageError, printable
from medtriage.io.dicom import DecodedImage, read_dicom
from medtriage.serve.admission import Admission
from medtriage.serve.drift import DriftMonitor, source_name
from medtriage.serve.node.header import STUDY_TAGS, read_identity
from medtriage.serve.node.store import ConflictingInstance, ConflictingPatient, NodeStore
from medtriage.serve.node.worker import PRIORITY_RANK, urgency
from medtriage.serve.package import calibrated_result, picture_refused, scored_by
from medtriage.serve.predictor import Predictor, Rejection, Score, to_model_channels, unexpected_failure
from medtriage.serve.saliency import DISPLAY_SIDE, explain_frame, shrink

log = logging.getLogger(__name__)
DEFAULT_CAPACITY = 256
PAGE_PATH = "/worklist"
UPLOAD_AET = "HTTP"  # the calling AE title recorded for uploads, to tell them from what the node received
SHOWN_STATES = {"receiving": "received", "scored": "scored", "delivered": "delivered", "failed": "failed", "not_analysed": "not analysed"}
__all__ = ["DEFAULT_CAPACITY", "PAGE_PATH", "PRIORITY_RANK", "Worklist", "WorklistWriteError", "inline_hashes", "worklist_router"]


class WorklistWriteError(MedTriageError):
    """An upload scored, but the worklist's store could not record it (a full disk, a database that refuses writes). Its
    reason and hint are meant for the client: they name no path of the service (the cause, in the log, does)."""

    def __init__(self, name: str, cause: Exception):
        self.file = name  # as sent; the message, which a traceback logs, shows it printable
        super().__init__(
            f"'{printable(name)}' was scored, but the worklist could not record it ({_failure(cause)}): "
            "no score is returned without its row",
            hint="retry later; if it persists, the service's operator should check the free space and write permission of "
            "the worklist's state folder (--state), and the service's log",
        )


def _failure(err: Exception) -> str:
    """What failed, in words without a path: an OSError's message names the database file, SQLite's code does not."""
    if isinstance(err, OSError) and err.errno:
        return f"{type(err).__name__}: {os.strerror(err.errno)}"
    return getattr(err, "sqlite_errorname", None) or type(err).__name__


class Worklist:
    """Studies in a NodeStore as worklist rows; uploads scored here are recorded there too. Thread-safe."""

    def __init__(
        self,
        predictor: Predictor,
        capacity: int = DEFAULT_CAPACITY,
        store: NodeStore | str | Path | None = None,
        drift: DriftMonitor | None = None,
    ):
        """`store`: a NodeStore, or the state folder to open one in (a DICOM node's --state), or None (memory).
        `drift`: the service's drift monitor, whose drifting sources mark their rows."""
        self.predictor, self.capacity, self.drift = predictor, max(1, int(capacity)), drift
        self.store = store if isinstance(store, NodeStore) else NodeStore(store)
        self._display: dict[str, np.ndarray] = {}  # SOP UID -> upload's display copy (no spool)
        self._forgotten = 0  # studies an in-memory store dropped once the list left them out
        self._lock = threading.Lock()

    def unlisted(self) -> dict:
        """How many studies the list leaves out (kept in a state folder, forgotten in memory), and how many of those
        it keeps are URGENT."""
        evicted, urgent = self.store.unlisted(self.capacity)
        return {"evicted": evicted + self._forgotten, "urgent_not_listed": urgent}

    def score_or_reject(self, data: bytes, name: str, source: str | None = None) -> list[Score] | Rejection:
        """Predictor.score_or_reject on one uploaded file from `source` (X-Source), recording what it scored (one decode)."""
        try:
            image = read_dicom(data, min_side=self.predictor.min_decoded_side, name=name)  # as Predictor.score_file
            scores = self.predictor.score_decoded(image, name)
        except MedTriageError as err:
            return Rejection.of(name, err)
        except Exception as err:  # one odd file must not stop the others
            return unexpected_failure(name, err)
        try:
            self.add(data, image, scores, name, source)
        except (ConflictingInstance, ConflictingPatient) as err:  # its UIDs name what the store holds for another
            return Rejection.of(name, err)
        except Exception as err:  # the store's fault, not the file's: no score is answered that the list does not show
            raise WorklistWriteError(name, err) from err
        return scores

    def add(self, data: bytes, image: DecodedImage, scores: list[Score], name: str, source: str | None = None) -> None:
        """Record an upload's scores as a scored instance of its study (a new study when it names none).
        ConflictingInstance or ConflictingPatient, and nothing recorded, when its UIDs name what the store holds for
        another study or patient."""
        try:
            header = read_identity(data, where=name)
            sop_uid, study_uid, fields = header.sop_uid, header.study_uid, header.fields
        except MedTriageError:  # scorable pixels with odd UIDs: still a row of its own
            sop_uid = study_uid = f"upload-{uuid.uuid4().hex}"
            fields = dict.fromkeys(STUDY_TAGS, "")
        top = max(range(len(scores)), key=lambda i: scores[i].probability)
        # keyed by the UID the instance is recorded under, which the row's score and picture are looked up by
        results = [{**score.as_dict(), "sop_uid": sop_uid} for score in scores]
        recorded = {
            "name": name,
            "state": "scored",
            "result": json.dumps(results),
            "calling_aet": UPLOAD_AET,
            "source": source_name(source),  # untrusted header text: bounded and printable, as the drift monitor names it
        }
        # with a state folder, spooled like a received instance (the overlay survives a restart); else a display copy
        display = self._display_copy(image.pixels[top]) if self.store.folder is None else None
        with self._lock:  # one upload at a time: the display copies kept are those of the studies as recorded
            if not self.store.receive(data, sop_uid, study_uid, image.series_uid, image.sop_class_uid, fields, **recorded):
                return  # the same instance again: one result
            if display is not None:
                self._display[sop_uid] = display
            self._close(study_uid)
            if self.store.folder is None:  # nothing else reads a memory store: what the list leaves out goes
                self._forgotten += self.store.forget_unlisted(self.capacity)
            self._drop_unneeded_display_copies()

    def _close(self, study_uid: str) -> None:
        # `seen` before the study's instances are read: an instance recorded after that read makes this close refused
        # (the later upload closes the study with every score); taken after, a concurrent upload's score was lost
        seen = time.time()
        instances = self.store.study_instances(study_uid)
        study_top = min((s for row in instances if row["state"] == "scored" for s in json.loads(row["result"])), key=urgency)
        # A study the DICOM node received stays open (with its top score shown): the node closes it once it is
        # quiet, with the SR of every instance. Closed here, the node would never send that SR.
        from_node = any(row["calling_aet"] != UPLOAD_AET for row in instances)
        self.store.close_study(study_uid, study_top, None, None, [], seen, state="receiving" if from_node else None)

    def _drop_unneeded_display_copies(self) -> None:
        """Keep the copies of the pictures still to be drawn: the top image of each shown study, no other."""
        shown = self.store.shown_top_instances(self.capacity)
        for sop_uid in [sop_uid for sop_uid in self._display if sop_uid not in shown]:
            del self._display[sop_uid]

    def _display_copy(self, frame: np.ndarray) -> np.ndarray:
        pixels = to_model_channels(shrink(frame, DISPLAY_SIDE)[None], self.predictor.package.channels)[0]
        return (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)

    def rows(self) -> list[dict]:
        drifting = self._drifting_sources()
        rows = [self._summary(study, drifting) for study in self.store.shown_studies(self.capacity)]
        return sorted(rows, key=_sort_key)

    def _drifting_sources(self) -> set[str]:
        """The sources drifting now: those of this service's uploads, and those the DICOM node writing the same
        state folder finds drifting (its monitor runs in its own process)."""
        own = set(self.drift.status()["drifting"]) if self.drift else set()
        return own if self.store.folder is None else own | self.store.drifting_sources()  # no node writes to memory

    def _study(self, entry_id: str):
        # ASCII digits that fit SQLite's 64-bit integer: int() of '²' or of 5000 digits raises, and so does a larger query
        is_row_number = entry_id.isascii() and entry_id.isdigit() and len(entry_id) <= 18
        study = self.store.study_by_id(int(entry_id), self.capacity) if is_row_number else None
        if study is None:
            reason = (
                f"no worklist entry '{entry_id[:40]}' (the list shows the newest {self.capacity} studies and up to "
                f"{self.capacity} urgent ones of the last day)"
            )
            raise HTTPException(404, {"reason": reason, "hint": "GET /v1/worklist lists the entries and their ids"})
        return study

    def _summary(self, study, drifting: set[str]) -> dict:
        """The row of a study as NodeStore.shown_studies reads it (with its top instance): no further query."""
        package = self.predictor.package
        top, scores = _top(study)
        fields = json.loads(study["fields"] or "{}")
        source = _sender(study)
        entry = {
            "id": str(study["id"]),
            "received": _iso(study["last_received"]),
            "state": SHOWN_STATES[study["state"]],
            "reason": study["reason"],
            "study_uid": study["study_uid"],
            "instances": study["instance_count"],
            "source": source,
            "source_drifting": source in drifting,
            **{key: fields.get(key, "") for key in STUDY_TAGS},
            "file": None,
            "frame": None,
            "frames": 0,
            "finding": None,
            "decision": None,
            "probability": None,
            "priority": None,
            "overlay": None,
            "overlay_unavailable": None,
            "flags": [],
            "model": package.name,
            "version": package.version,
            "sha256": package.sha256,
        }
        if top is not None:
            entry.update(
                file=study["top_name"],
                frame=top["frame"],
                frames=len(scores),
                finding=top["finding"],
                decision=top.get("decision"),
                probability=top["probability"],
                priority=top["priority"],
                modality=top["modality"] or entry["modality"],
                model=top["model"],
                version=top["version"],
                sha256=top["sha256"],
                flags=top.get("flags") or [],
            )
            missing = self._picture_missing(study, top)
            entry.update(overlay=None if missing else f"/v1/worklist/{study['id']}/overlay.png", overlay_unavailable=missing)
        return entry

    def detail(self, entry_id: str) -> dict:
        study = self._study(entry_id)
        top, _ = _top(study)
        package = self.predictor.package
        summary = self._summary(study, self._drifting_sources())
        served = top is None or scored_by(top) == package.identity()
        return {
            **summary,
            "probabilities": top and top["probabilities"],
            "positive_label": package.positive_label,
            # the operating points that set the priority: those of the scoring package, not held when another is served
            "thresholds": {"review": package.review_threshold, "urgent": package.urgent_threshold} if served else None,
            "calibrated": calibrated_result(top, package) if top else None,
            "series_uid": top and top["series_uid"],
            "sop_uid": top and top["sop_uid"],
            "decision": top and top.get("decision"),
            "flags": top and top.get("flags"),
            "saliency": _kept_saliency(study, top) if top else None,
        }

    def kept_overlay(self, entry_id: str) -> tuple[bytes | None, sqlite3.Row]:
        """The study's overlay PNG if one is kept (nothing is drawn), and the study as looked up, for `overlay` to draw
        from without running the list's query again; 404 as `overlay` when the entry is not listed."""
        study = self._study(entry_id)
        top, _ = _top(study)
        kept = self.store.overlay(top["sop_uid"]) if top is not None and _kept_saliency(study, top) else None
        return (kept[0] if kept else None), study

    def overlay(self, entry_id: str, study: sqlite3.Row | None = None) -> bytes:
        """The study's overlay PNG, drawn on first request (occlusion through the served model) and kept. `study`: the
        entry as `kept_overlay` looked it up, else it is looked up here."""
        study = self._study(entry_id) if study is None else study
        top, _ = _top(study)
        if top is None:
            raise HTTPException(
                404,
                {
                    "reason": f"study {entry_id} has no scored image ({SHOWN_STATES[study['state']]})",
                    "hint": "only a scored study has a picture; its row's state and reason say why it has none",
                },
            )
        kept = self._kept_picture(top)
        if kept:
            return kept
        missing = self._picture_missing(study, top)
        if missing:
            raise HTTPException(409, {"reason": missing, "hint": "open the study in the PACS viewer, or serve the package that scored it"})
        try:
            frame = self._frame(study, top)
            started = time.perf_counter()
            result, png = explain_frame(self.predictor, frame, DISPLAY_SIDE)
        except MedTriageError as err:  # e.g. the graph returns NaN for occluded copies, or the spooled file no longer reads
            hint = err.hint or "the score stands; open the study in the PACS viewer"
            raise HTTPException(422, {"reason": f"no picture could be drawn: {err.reason}", "hint": hint}) from err
        drawing = {**result.describe(), "ms": round(1000 * (time.perf_counter() - started), 1), "package": scored_by(top)}
        with self._lock:  # uploads forget studies under this lock: one forgotten while drawing keeps no orphan picture
            if self.store.has_instance(top["sop_uid"]):
                self.store.save_overlay(top["sop_uid"], png, drawing)
            self._display.pop(top["sop_uid"], None)  # the PNG is all the row needs from now on
        return png

    def _kept_picture(self, top: dict) -> bytes | None:
        """The top image's picture if the package that scored it drew it, looked up by its SOP UID rather than in the
        study as read: a request answered while this one waited for its slot may have drawn it since."""
        kept = self.store.overlay(top["sop_uid"])
        return kept[0] if kept and kept[1].get("package") == scored_by(top) else None

    def _picture_missing(self, study, top: dict) -> str | None:
        """Why the row can have no picture: None when the served package scored it, or drew its kept picture."""
        if _kept_saliency(study, top):
            return None
        refused = picture_refused(scored_by(top), self.predictor.package.identity())
        return refused and f"no picture: {refused}"

    def _frame(self, study, top: dict) -> np.ndarray:
        with self._lock:
            display = self._display.get(top["sop_uid"])
        if display is not None:
            return display.astype(np.float32) / 255
        spool = study["top_spool"]
        if spool and self.store.folder is not None and self.store.spooled(spool).is_file():
            image = read_dicom(self.store.spooled(spool), frame=None if top["frame"] is None else top["frame"] - 1)
            return image.pixels[0]
        raise HTTPException(
            410,
            {
                "reason": "the image of this study is no longer held (uploads without a state folder keep their pictures only while the service runs)",
                "hint": "open the study in the PACS viewer; serve with --state DIR to keep the pictures of uploads",
            },
        )


def _top(study) -> tuple[dict | None, list[dict]]:
    """The study's most urgent score and all scores of that instance (a NodeStore.shown_studies row)."""
    if not study["top_sop"] or not study["top_result"]:
        return None, []
    scores = json.loads(study["top_result"])
    return min(scores, key=urgency), scores


def _kept_saliency(study, top: dict) -> dict | None:
    """The saliency kept with the top image's picture, if the package that scored it drew it (one kept without a
    package was drawn by whichever was served then, so it is not shown)."""
    saliency = json.loads(study["top_saliency"] or "{}")
    return saliency if saliency.get("package") == scored_by(top) else None


def _sender(study) -> str | None:
    """Who sent the study's top (or first) instance, as the drift monitor names it: an upload's recorded X-Source,
    else the node's calling AE title; None for an upload recorded before uploads kept their source."""
    if study["source"] is not None:
        return study["source"]
    return None if study["calling_aet"] in (None, UPLOAD_AET) else source_name(study["calling_aet"])


# A study without a score (received, not analysed) is read as it would be without the model: before the studies the
# model calls routine, not after them; a place at the bottom is the dangerous case (docs/safety.md).
UNSCORED_RANK = PRIORITY_RANK["routine"] - 0.5


def _sort_key(entry: dict) -> tuple:
    """URGENT, then review studies, then those without a score (newest first), then routine ones; scored studies
    by probability within their priority."""
    if entry["priority"] is None:
        return UNSCORED_RANK, 0.0, -int(entry["id"])
    return PRIORITY_RANK.get(entry["priority"], len(PRIORITY_RANK)), -entry["probability"], -int(entry["id"])


def _iso(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat(timespec="seconds")


def worklist_page() -> str:
    return resources.files("medtriage.serve").joinpath("static", "worklist.html").read_text(encoding="utf-8")


def page_headers(page: str) -> dict:
    """The page is open without the token and shows PHI: it runs only its own inline script and style, talks only
    to this service, and may not be framed by another site."""
    policy = (
        f"default-src 'none'; script-src {inline_hashes(page, 'script')}; style-src {inline_hashes(page, 'style')}; "
        "connect-src 'self'; img-src blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return {
        "Cache-Control": "no-store",
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }


def inline_hashes(page: str, tag: str) -> str:
    """CSP sources for the page's inline <script> or <style> blocks: the sha256 of each one's text."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'" for block in blocks)


def worklist_router(worklist: Worklist, admission: Admission | None = None) -> APIRouter:
    """The worklist's routes; a picture is drawn in one of `admission`'s working slots (the service's, which scoring
    takes too), so that pictures asked for at once never run more models than the service runs at once."""
    router = APIRouter()
    admission = admission or Admission()
    page = worklist_page()
    headers = page_headers(page)

    @router.get(PAGE_PATH, response_class=HTMLResponse, include_in_schema=False)
    def worklist_html() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)

    @router.get("/v1/worklist", summary="Studies, most urgent first, with their state")
    def list_rows() -> dict:
        package = worklist.predictor.package
        rows = worklist.rows()
        return {
            "model": {**package.identity(), "label": package.describe(), "positive_label": package.positive_label},
            "capacity": worklist.capacity,
            **worklist.unlisted(),
            "count": len(rows),
            "entries": rows,
        }

    @router.get("/v1/worklist/{entry_id}", summary="One worklist row with its score details")
    def row_detail(entry_id: str) -> dict:
        return worklist.detail(entry_id)

    @router.get(
        "/v1/worklist/{entry_id}/overlay.png",
        summary="The image with where the model looked (occlusion)",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}},
            409: {"description": "the study was scored by a package other than the one served, which drew no picture of it"},
            410: {"description": "the study's image is no longer held"},
            422: {"description": "no picture could be drawn of the image (the reason says why; the score stands)"},
        },
    )
    async def row_overlay(entry_id: str) -> Response:
        png, study = await run_in_threadpool(worklist.kept_overlay, entry_id)
        if png is None:
            async with admission.slot():  # an occlusion map runs the model dozens of times on a decoded image
                png = await run_in_threadpool(worklist.overlay, entry_id, study)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})  # PHI

    return router
