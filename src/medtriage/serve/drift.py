"""Input drift per source: rolling windows of what was scored, compared with the package's references.

A source is whoever sends images (the calling AE title of the DICOM node, the `X-Source` header
over HTTP). For each source the monitor keeps the last `window` values of every feature the
package has references for (mean decoded intensity, OOD score, predicted probability), one value
per input (a multi-frame object's frames averaged, so that one object cannot fill a window), and their
population-stability index against the reference of the training site of that name (read as a source name), else the
pooled validation reference. A source drifts when, with at least `min_images` in its window,
the PSI of any feature passes that reference's threshold (chosen at export for a stated
false-alarm rate on unshifted windows; a site's reference, built on fewer images, has its own).
A source's count of inputs is kept apart from its window: when a quiet source's window is let go
for a new source, and the source comes back, its window starts empty but its count goes on.
An input a source sent before (a sender's retry, or the same file's SR asked for after its score) is counted once:
the door names each input by a key (over HTTP its SOP Instance UID, else the sha256 of its bytes), and the monitor
remembers the last `remembered` (source, key) pairs it counted; one it no longer remembers counts again.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from itertools import chain

from medtriage.format.references import psi

FEATURES = ("input_mean", "ood_score", "probability")
DEFAULT_SOURCE = "default"
MAX_SOURCES = 64  # a header is untrusted: a quiet source leaves when a new one would exceed this (_evictable)
MAX_COUNTED = 64 * MAX_SOURCES  # names whose count outlives their window; past this, the one seen least is forgotten
# (source, input) pairs kept to tell a resend (about 150 bytes each): a retry comes within minutes, not 16384 images later
REMEMBERED = 16384
_SOURCE_CHARS = re.compile(r"[^A-Za-z0-9._ -]")


def source_name(raw: str | None) -> str:
    """A bounded, printable source name (an AE title is at most 16 characters; a header could be anything)."""
    text = _SOURCE_CHARS.sub("_", (raw or "").strip())[:64].strip()
    return text or DEFAULT_SOURCE


def input_features(scores) -> dict[str, float]:
    """The monitored features of one input (its serve.predictor.Scores, one per frame), each the mean over
    the frames: frames of one acquisition are not independent images, and the threshold assumes such."""
    values: dict[str, list[float]] = {}
    for score in scores:
        for feature in FEATURES:
            if getattr(score, feature) is not None:
                values.setdefault(feature, []).append(float(getattr(score, feature)))
    return {feature: sum(v) / len(v) for feature, v in values.items()}


def _site_references(per_site: dict, thresholds: dict, pooled_threshold: float) -> dict[str, tuple[str, dict, float]]:
    """source name -> (training site, its references, its threshold). Keyed by source_name of the site, as sources
    arrive: a site folder named with an apostrophe or an accent would otherwise never meet its own reference. Of sites
    that come to one name, the one named so exactly wins; else none does (either could be the sender). A package
    exported before sites had thresholds of their own judges a site by the pooled one's."""
    named: dict[str, list] = {}
    for site, histograms in per_site.items():
        entry = (str(site), histograms, float(thresholds.get(str(site), pooled_threshold)))
        named.setdefault(source_name(str(site)), []).append(entry)
    exact = {name: entry for name, entries in named.items() for entry in entries if entry[0] == name}
    return {**{name: entries[0] for name, entries in named.items() if len(entries) == 1}, **exact}


@dataclass
class SourceDrift:
    source: str
    reference: str  # the training site compared with, or "all"
    threshold: float  # that reference's PSI threshold
    images: int = 0  # seen since the service started, window let go or not (DriftMonitor._count)
    psi: dict = field(default_factory=dict)  # feature -> PSI over the current window
    window: int = 0  # images in the current window

    def drifting(self, min_images: int) -> bool:
        return self.window >= min_images and any(v > self.threshold for v in self.psi.values())

    def as_dict(self, min_images: int) -> dict:
        worst = max(self.psi, key=self.psi.get) if self.psi else None
        return {
            "source": self.source,
            "reference": self.reference,
            "images": self.images,
            "window": self.window,
            "psi": {k: round(v, 4) for k, v in self.psi.items()},
            "worst_feature": worst,
            "threshold": self.threshold,
            "drifting": self.drifting(min_images),
        }


class DriftMonitor:
    """Rolling windows and PSI per source; thread-safe. A package without references monitors nothing."""

    def __init__(self, drift_meta: dict | None, remembered: int = REMEMBERED):
        drift_meta = drift_meta or {}
        self.enabled = bool(drift_meta.get("reference"))
        self.window = int(drift_meta.get("window", 200))
        self.min_images = int(drift_meta.get("min_images", 100))
        self.threshold = float(drift_meta.get("psi_threshold", 0.25))
        reference = drift_meta.get("reference") or {}
        self.pooled = reference.get("all") or {}
        self.sites = _site_references(reference.get("per_site") or {}, drift_meta.get("site_psi_thresholds") or {}, self.threshold)
        self._windows: OrderedDict[str, dict[str, deque]] = OrderedDict()
        self._state: dict[str, SourceDrift] = {}
        self._seen: OrderedDict[str, int] = OrderedDict()  # source -> inputs since the service started
        self._counted: OrderedDict[bytes, None] = OrderedDict()  # digests of (source, key), least recently seen first
        self.remembered = max(1, int(remembered))
        self._lock = threading.Lock()

    def observe(self, source: str | None, features: dict[str, float], key: str | None = None) -> SourceDrift | None:
        """Add one scored image of `source`, named by `key` (None: an input that always counts); returns that source's
        drift state, or None when not monitoring or when `source` sent this input before (nothing changes)."""
        if not self.enabled:
            return None
        source = source_name(source)
        reference_name, reference, threshold = self.sites.get(source, ("all", self.pooled, self.threshold))
        with self._lock:
            if key is not None and self._resent(source, key):
                return None
            windows = self._windows_of(source)
            state = self._state.setdefault(source, SourceDrift(source, reference_name, threshold))
            state.images = self._count(source)
            for feature, value in features.items():
                if feature in reference:
                    windows.setdefault(feature, deque(maxlen=self.window)).append(value)
            state.window = max((len(w) for w in windows.values()), default=0)
            state.psi = {f: psi(reference[f], list(w)) for f, w in windows.items()}
            return state

    def _resent(self, source: str, key: str) -> bool:
        """Whether `source` sent the input `key` among the last inputs remembered; remembers it either way. Kept as a
        digest: a key is the sender's text (a UID) of any length, and the memory must stay bounded."""
        digest = hashlib.sha256(f"{source}\0{key}".encode(errors="surrogatepass")).digest()[:16]
        seen = digest in self._counted
        self._counted[digest] = None
        self._counted.move_to_end(digest)  # a sender that keeps retrying keeps its input remembered
        if len(self._counted) > self.remembered:
            self._counted.popitem(last=False)
        return seen

    def _windows_of(self, source: str) -> dict[str, deque]:
        if source in self._windows:
            self._windows.move_to_end(source)
            return self._windows[source]
        while len(self._windows) >= MAX_SOURCES:
            gone = self._evictable()
            del self._windows[gone]
            self._state.pop(gone, None)
        return self._windows.setdefault(source, {})

    def _count(self, source: str) -> int:
        """One more input of `source`: its count of every input so far, which outlives its window (a count that went
        back to one when a window was let go would misstate what the source sent)."""
        seen = self._seen.pop(source, 0) + 1
        if len(self._seen) >= MAX_COUNTED:  # a header is untrusted: one-off names must not grow this for ever
            # The name seen least (the least recently seen of equals), never one with a window: its count is shown.
            del self._seen[min((s for s in self._seen if s not in self._windows), key=self._seen.get)]
        self._seen[source] = seen
        return seen

    def _evictable(self) -> str:
        """Of the sources whose window is too short to alert, the one with the fewest inputs (the least recently seen
        of those); else the least recently seen that does not drift, else the least recently seen. A new name must not
        push out a source that drifts (and with it, its alert) while another can go, even when every window is long
        enough to alert; nor one on its way to alerting, when one-off names (a request id in X-Source) come faster."""
        short = [s for s in self._windows if self._state[s].window < self.min_images]
        if short:  # min keeps the first of equals: the least recently seen
            return min(short, key=lambda s: self._state[s].window)
        steady = (s for s in self._windows if not self._state[s].drifting(self.min_images))
        return next(chain(steady, self._windows))

    def status(self) -> dict:
        """What the worklist banner and /v1/drift show: every source, and which drift past the threshold."""
        with self._lock:
            sources = [s.as_dict(self.min_images) for s in self._state.values()]
        return {
            "monitoring": self.enabled,
            "threshold": self.threshold,
            "window": self.window,
            "min_images": self.min_images,
            "sources": sources,
            "drifting": [s["source"] for s in sources if s["drifting"]],
        }

    def sources(self) -> set[str]:
        with self._lock:
            return set(self._state)

    def drifting(self, source: str) -> bool:
        with self._lock:
            state = self._state.get(source_name(source))
            return bool(state and state.drifting(self.min_images))
