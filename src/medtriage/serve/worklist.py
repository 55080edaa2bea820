"""The radiologist's worklist: every study scored since the service started, most urgent first.

One row per scored file (its most suspicious frame). Rows live in memory, at most `capacity` of
them (the oldest leave first). The occlusion overlay of a row is drawn the first time someone
opens it; until then the row keeps a display copy of its frame (at most 512 pixels a side, 8-bit),
afterwards only the PNG.

GET  /worklist                        the page (static HTML; its data calls carry the bearer token)
GET  /v1/worklist                     rows, sorted URGENT > review > routine, then probability
GET  /v1/worklist/{id}                one row with all class probabilities and the thresholds
GET  /v1/worklist/{id}/overlay.png    the image with where the model looked
Files reach the worklist through POST /v1/score (the page uploads there too).
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import pydicom
from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from medtriage.errors import MedTriageError
from medtriage.io.dicom import DecodedImage, read_dicom
from medtriage.serve.predictor import Predictor, Rejection, Score, to_model_channels
from medtriage.serve.saliency import DISPLAY_SIDE, explain_frame, shrink

log = logging.getLogger(__name__)
DEFAULT_CAPACITY = 256
PRIORITY_RANK = {"URGENT": 0, "review": 1, "routine": 2}
STUDY_TAGS = {"patient_id": "PatientID", "accession": "AccessionNumber", "study_date": "StudyDate",
              "study_description": "StudyDescription"}
PAGE_PATH = "/worklist"


@dataclass
class Entry:
    id: str
    seq: int
    received: str
    score: Score  # the most suspicious frame
    frames: int
    study: dict
    display: np.ndarray | None  # uint8 [C, h, w] in model channels, until the overlay is drawn
    overlay: bytes | None = None
    saliency: dict = field(default_factory=dict)

    def sort_key(self) -> tuple:
        return PRIORITY_RANK.get(self.score.priority, len(PRIORITY_RANK)), -self.score.probability, self.seq

    def summary(self) -> dict:
        s = self.score
        return {"id": self.id, "received": self.received, "file": s.file, "frame": s.frame, "frames": self.frames,
                **self.study, "modality": s.modality, "finding": s.finding, "probability": s.probability,
                "priority": s.priority, "model": s.model, "version": s.version, "sha256": s.sha256,
                "overlay": f"/v1/worklist/{self.id}/overlay.png"}


class Worklist:
    """Scores uploads with the predictor and keeps the newest `capacity` rows; thread-safe."""

    def __init__(self, predictor: Predictor, capacity: int = DEFAULT_CAPACITY):
        self.predictor, self.capacity = predictor, max(1, int(capacity))
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self.evicted = 0

    def score_or_reject(self, data: bytes, name: str) -> list[Score] | Rejection:
        """Predictor.score_or_reject on one uploaded file, recording what it scored (one decode)."""
        try:
            image = read_dicom(data)
            scores = self.predictor.score_decoded(image, name)
        except MedTriageError as err:
            return Rejection(name, err.reason, type(err).__name__)
        except Exception as err:  # one odd file must not stop the others
            log.exception("unexpected failure scoring %s", name)
            return Rejection(name, f"internal error while scoring ({type(err).__name__}: {err})", type(err).__name__)
        self.add(image, scores, study_fields(data))
        return scores

    def add(self, image: DecodedImage, scores: list[Score], study: dict) -> Entry:
        top = max(range(len(scores)), key=lambda i: scores[i].probability)
        entry = Entry(id=uuid.uuid4().hex[:12], seq=next(self._seq), received=_now(), score=scores[top],
                      frames=len(scores), study=study, display=self._display_copy(image.pixels[top]))
        with self._lock:
            self._entries[entry.id] = entry
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
                self.evicted += 1
        return entry

    def _display_copy(self, frame: np.ndarray) -> np.ndarray:
        pixels = to_model_channels(shrink(frame, DISPLAY_SIDE)[None], self.predictor.package.channels)[0]
        return (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)

    def rows(self) -> list[Entry]:
        with self._lock:
            return sorted(self._entries.values(), key=Entry.sort_key)

    def get(self, entry_id: str) -> Entry:
        with self._lock:
            entry = self._entries.get(entry_id)
        if entry is None:
            raise HTTPException(404, f"no worklist entry '{entry_id}' (entries leave after {self.capacity} newer ones, "
                                     "or when the service restarts)")
        return entry

    def overlay(self, entry_id: str) -> bytes:
        """The entry's overlay PNG, drawn on first request (occlusion through the served model)."""
        entry = self.get(entry_id)
        display = entry.display
        if entry.overlay is None and display is not None:
            started = time.perf_counter()
            result, entry.overlay = explain_frame(self.predictor, display.astype(np.float32) / 255, DISPLAY_SIDE)
            entry.saliency = {**result.describe(), "ms": round(1000 * (time.perf_counter() - started), 1)}
            entry.display = None  # the PNG is all the row needs from now on
        return entry.overlay

    def detail(self, entry_id: str) -> dict:
        entry = self.get(entry_id)
        package, s = self.predictor.package, entry.score
        return {**entry.summary(), "probabilities": s.probabilities, "positive_label": package.positive_label,
                "thresholds": {"review": package.review_threshold, "urgent": package.urgent_threshold},
                "study_uid": s.study_uid, "series_uid": s.series_uid, "sop_uid": s.sop_uid,
                "saliency": entry.saliency or None}


def study_fields(data: bytes) -> dict:
    """Patient (pseudonym) ID, accession, study date and description from the header ('' when absent)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True, specific_tags=list(STUDY_TAGS.values()))
    except Exception:  # the pixels decoded, so a header quirk here only blanks these columns
        return dict.fromkeys(STUDY_TAGS, "")
    fields = {key: str(ds.get(keyword, "") or "").strip() for key, keyword in STUDY_TAGS.items()}
    fields["study_date"] = _iso_date(fields["study_date"])
    return fields


def _iso_date(value: str) -> str:
    try:
        return dt.datetime.strptime(value[:8], "%Y%m%d").date().isoformat()
    except ValueError:
        return value


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def worklist_page() -> str:
    return resources.files("medtriage.serve").joinpath("static", "worklist.html").read_text(encoding="utf-8")


def worklist_router(worklist: Worklist) -> APIRouter:
    router = APIRouter()
    page = worklist_page()

    @router.get(PAGE_PATH, response_class=HTMLResponse, include_in_schema=False)
    def worklist_html() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @router.get("/v1/worklist", summary="Studies scored since the service started, most urgent first")
    def list_rows() -> dict:
        package = worklist.predictor.package
        rows = worklist.rows()
        return {"model": {**package.identity(), "label": package.describe(), "positive_label": package.positive_label},
                "capacity": worklist.capacity, "evicted": worklist.evicted, "count": len(rows),
                "entries": [entry.summary() for entry in rows]}

    @router.get("/v1/worklist/{entry_id}", summary="One worklist row with its score details")
    def row_detail(entry_id: str) -> dict:
        return worklist.detail(entry_id)

    @router.get("/v1/worklist/{entry_id}/overlay.png", summary="The image with where the model looked (occlusion)",
                response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def row_overlay(entry_id: str) -> Response:
        png = await run_in_threadpool(worklist.overlay, entry_id)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    return router
