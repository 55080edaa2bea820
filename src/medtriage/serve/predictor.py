"""Scores from a model package with ONNX Runtime: DICOM -> decoded pixels -> probability (calibrated where the package
applies a temperature) -> priority."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from medtriage.errors import ConfigError, InputError, MedTriageError, PackageError, printable
from medtriage.format.graph import REEXPORT_HINT, check_graph
from medtriage.io.dicom import DecodedImage, read_dicom
from medtriage.serve.package import ModelPackage, scored_by
from medtriage.serve.scope import OUT_OF_SCOPE, UNUSUAL_INPUT, OutOfScopeError, UnusualInputError, check_scope, warn_if_unguarded

log = logging.getLogger(__name__)
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as in DICOM YBR
FRAME_BATCH = 16  # frames of a multi-frame object scored per ORT call
# With reduced_j2k, a JPEG 2000 image is decoded at the coarsest level still this many times the model's input
# size: the graph's antialiased resize then does the last step (scores move by ~0.02 at most on the test CRs).
J2K_SIDE_MARGIN = 8
# What ONNX Runtime raises from `run` (a graph refusing an input, a kernel or provider failure): its own classes, each
# derived from Exception alone, so they are collected by module rather than caught by a base class.
ORT_ERRORS = tuple(c for c in vars(_ort_state).values() if isinstance(c, type) and issubclass(c, Exception))


@dataclass
class Score:
    """One scored image (one frame of a multi-frame object: `frame` counts from 1)."""

    file: str
    frame: int | None
    finding: str
    probability: float  # probability of `positive_label` (calibrated where the package applies a temperature)
    priority: str  # URGENT | review | routine
    probabilities: dict
    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str
    model: str
    version: int
    sha256: str
    decision: str = ""  # the probability against the operating points, e.g. "below review threshold 0.785"
    flags: list = field(default_factory=list)  # e.g. "out_of_scope:modality", "unusual_input" (--allow-out-of-scope)
    ood_score: float | None = None  # distance from the training images' features (packages with an OOD output)
    input_mean: float | None = None  # mean decoded intensity, in model channels (drift monitoring)
    # The scoring package's positive label (its label names are the keys of `probabilities`), so that a result read
    # back after a restart with another package still says what `probability` is of; "" where it was not recorded.
    positive_label: str = ""
    calibrated: bool | None = None  # whether the scoring package calibrates `probability`; None: not recorded

    def as_dict(self) -> dict:
        return {"status": "scored", **asdict(self)}

    def scoring_package(self) -> dict:
        """The identity of the package that scored this image, in ModelPackage.identity()'s form."""
        return scored_by(vars(self))  # its fields, without as_dict's deep copy of the probabilities


@dataclass
class Rejection:
    file: str
    reason: str
    error: str  # the error type, e.g. DicomError
    code: str | None = None  # machine-readable cause where there is one: out_of_scope, unusual_input
    field: str | None = None  # the scope field that failed
    withheld: list | None = None  # scores computed but not given (unusual input): for the drift monitor only
    hint: str | None = None  # what to do about it, where the error says
    internal: bool = False  # the scorer's own error, not the file's (unexpected_failure): a retry may succeed

    @classmethod
    def of(cls, name: str, err: Exception) -> Rejection:
        return cls(
            name,
            getattr(err, "reason", str(err)),
            type(err).__name__,
            getattr(err, "code", None),
            getattr(err, "field", None),
            getattr(err, "withheld", None),
            getattr(err, "hint", None),
        )

    def as_dict(self) -> dict:
        shown = {"file": self.file, "reason": self.reason, "error": self.error, "code": self.code, "field": self.field, "hint": self.hint}
        return {"status": "rejected", **{k: v for k, v in shown.items() if v is not None or k in ("file", "reason", "error")}}


def create_session(package: ModelPackage, provider: str = "cpu", threads: int | None = None) -> ort.InferenceSession:
    """An ORT session with full graph optimisation and an explicit provider list; no silent CPU fallback."""
    if provider not in PROVIDERS:
        raise ConfigError(f"unknown provider '{provider}'", where="--provider", hint=f"use one of {sorted(PROVIDERS)}")
    wanted = PROVIDERS[provider][0]
    if wanted not in ort.get_available_providers():
        raise ConfigError(
            f"{wanted} is not available in this onnxruntime (available: {', '.join(ort.get_available_providers())})",
            where="--provider",
            hint="install onnxruntime-gpu with a matching CUDA, or run with --provider cpu",
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Inputs come in every size (the graph resizes): ORT's CPU arena would grow to the largest ever seen and
    # keep it; without it buffers are freed after each run and the process stays flat under load.
    options.enable_cpu_mem_arena = False
    # ORT's worker threads otherwise spin for a while after each run, taking the cores that the next
    # request's decoding (and every other process) needs: see the "Served path" benchmark.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = int(threads)
    session = _session(package, options, provider)
    if session.get_providers()[0] != wanted:  # ORT falls back to CPU when the CUDA libraries fail to load
        raise ConfigError(
            f"{wanted} was requested but onnxruntime could not start it (it would run on {session.get_providers()[0]})",
            where="--provider",
            hint="check the CUDA/cuDNN install, or run with --provider cpu",
        )
    return session


def _session(package: ModelPackage, options, provider: str) -> ort.InferenceSession:
    """The session, or a PackageError where ONNX Runtime cannot read or build the graph: a model.json's sha256 vouches
    only that the bytes are the ones exported, and bytes written as something else (a file copied over it before the
    export hashed it) would otherwise end the command in ONNX Runtime's traceback."""
    try:
        return ort.InferenceSession(_verified_model(package), options, providers=PROVIDERS[provider])
    except ORT_ERRORS as err:
        raise PackageError(
            f"ONNX Runtime cannot load model.onnx ({type(err).__name__}: {' '.join(str(err).split())[:300]})",
            where=package.onnx_path,
            hint=REEXPORT_HINT,
        ) from None


def _verified_model(package: ModelPackage) -> bytes:
    """model.onnx's bytes, checked again against model.json's sha256 as they are handed to ONNX Runtime: the file
    was hashed when the package loaded, and a re-export may have replaced it since (the folder is swapped whole)."""
    data = package.onnx_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != package.sha256:
        raise PackageError(
            "model.onnx changed after its package was loaded: its sha256 no longer matches model.json",
            where=package.onnx_path,
            hint="load the package again (a re-export may have replaced it)",
        )
    return data


def to_model_channels(pixels: np.ndarray, channels: int, where: str = "") -> np.ndarray:
    """`[F, C, H, W]` -> the channel count the model takes (RGB -> luminance, grayscale -> repeated)."""
    have = pixels.shape[1]
    if have == channels:
        return pixels
    if have == 3 and channels == 1:
        return np.einsum("fchw,c->fhw", pixels, LUMA_WEIGHTS, dtype=np.float32)[:, None]
    if have == 1 and channels == 3:
        return np.repeat(pixels, 3, axis=1)
    raise InputError(f"image has {have} channels, the model takes {channels}", where=where or None)


def _frame_means(image: DecodedImage, pixels: np.ndarray) -> list[float]:
    """Mean intensity of each frame in model channels: from the decoder where it took it on the way (a grayscale
    image repeated into any number of channels keeps its mean), else one more pass over the pixels."""
    if image.frame_means is not None and image.pixels.shape[1] == 1:
        return [float(m) for m in image.frame_means]
    return [float(frame.mean()) for frame in pixels]


def _require_finite(frame_means: list[float], where: str) -> None:
    """Refuse pixels with NaN or infinity (float pixel data, a broken rescale): the graph would return a NaN
    probability, which every threshold reads as routine. One such pixel makes its frame's mean non-finite."""
    if not np.isfinite(frame_means).all():
        raise InputError(
            "decoded pixels include NaN or infinite values",
            where=where,
            hint="the stored pixel values or their rescale/window attributes are invalid; export the image again from the source system",
        )


def require_finite_outputs(
    probs: np.ndarray,
    ood: np.ndarray | None,
    names: list[str],
    hint: str = "have the image read without triage, and report the file to whoever maintains the model package",
) -> None:
    """Refuse NaN or infinite graph outputs on finite pixels (a numeric overflow, e.g. in a reduced-precision
    graph), naming the first image (`names`: one per row) that has one: a NaN probability reads as routine against
    every threshold, and a NaN OOD score passes the unusual-input check, so neither may become a score."""
    finite = np.isfinite(probs).all(axis=1) & (True if ood is None else np.isfinite(ood))
    if finite.all():
        return
    first = int(np.flatnonzero(~finite)[0])
    what = "probabilities" if not np.isfinite(probs[first]).all() else "OOD score"
    raise PackageError(f"the model returned a NaN or infinite {what} for this image; it was not scored", where=names[first], hint=hint)


def session_graph(session: ort.InferenceSession) -> dict:
    """A session's inputs and outputs in graph_header's form (check_graph's `graph`)."""
    return {
        "inputs": {fed.name: {"shape": fed.shape, "type": fed.type} for fed in session.get_inputs()},
        "outputs": {output.name: output.shape for output in session.get_outputs()},
    }


def reduced_decode_side(package: ModelPackage) -> int:
    """The smallest side a reduced JPEG 2000 decode keeps: J2K_SIDE_MARGIN times the model's input side, model.json's
    preprocessing.resize.size (a side, or a list of them). Anything but whole pixels is refused: infinity would end
    the command in a traceback, and `true` (read as 1) would decode a radiograph down to a few pixels without a word."""
    resize = package.meta.get("preprocessing", {}).get("resize")
    size = resize.get("size") if isinstance(resize, dict) else None
    sides = size if isinstance(size, list) else [size]
    if sides and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in sides):
        return J2K_SIDE_MARGIN * max(sides)
    raise PackageError(
        f"--reduced-j2k needs the model's input side, and model.json's preprocessing.resize.size is {size!r}",
        where=package.directory / "model.json",
        hint=f"score without --reduced-j2k, or {REEXPORT_HINT}",
    )


def unexpected_failure(name: str, err: Exception) -> Rejection:
    """A file that failed by an error of the scorer itself, not the file's: logged with its traceback, and refused by
    the error's type only (its message may name the service's paths or data, and the rejection may go to a client)."""
    log.exception("unexpected failure scoring %s", printable(name))  # an upload's name: one log line
    kind = type(err).__name__
    return Rejection(name, f"internal error while scoring ({kind}); its details are in the log", kind, internal=True)


class Predictor:
    """A loaded package plus its ORT session; thread-safe (ORT sessions allow concurrent `run`)."""

    def __init__(
        self,
        package: ModelPackage,
        provider: str = "cpu",
        threads: int | None = None,
        allow_out_of_scope: bool = False,
        reduced_j2k: bool = False,
    ):
        self.package = package
        self.session = create_session(package, provider, threads)
        self.input_name = package.input_name
        self.positive = package.label_names.index(package.positive_label)
        # Out-of-scope and unusual inputs are refused unless this is set; then they are scored and flagged.
        self.allow_out_of_scope = allow_out_of_scope
        warn_if_unguarded(package.meta, package.describe(with_sha=False))
        # load_package checked model.onnx's header; this is the graph as ONNX Runtime runs it, for packages built in
        # memory (export's int8 parity) that no load_package checked. The same checks, on the session already built.
        check_graph(package.meta, session_graph(self.session), where=package.directory)
        # by name: a graph may list another output (raw scores) first
        self.output_names = [package.output_name] + ([package.ood_output] if package.ood_output else [])
        # Opt-in: JPEG 2000 files decoded only to the resolution the model needs (much faster; scores not bit-identical).
        self.min_decoded_side = reduced_decode_side(package) if reduced_j2k else None

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def outputs(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated probabilities `[N, K]` and, when the graph has one, the OOD score `[N]` of decoded pixels."""
        batch = np.ascontiguousarray(pixels, dtype=np.float32)
        results = self.session.run(self.output_names, {self.input_name: batch})
        probs, ood = results[0], (results[1].reshape(-1) if len(results) > 1 else None)
        self._check_rows(probs, ood, len(batch))
        return probs, ood

    def _check_rows(self, probs: np.ndarray, ood: np.ndarray | None, images: int) -> None:
        """One row of every class per image, one OOD score per image: anything else would pair images with other
        images' scores (a batch cut short) or read one row as another class."""
        classes = len(self.package.label_names)
        if probs.shape != (images, classes) or (ood is not None and len(ood) != images):
            raise PackageError(
                f"the model returned probabilities of shape {list(probs.shape)}"
                + ("" if ood is None else f" and {len(ood)} OOD scores")
                + f" for {images} images of {classes} classes; nothing was scored",
                where=self.package.onnx_path,
                hint="the graph does not match its model.json: export the package again",
            )

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Calibrated probabilities `[N, K]` of decoded pixels `[N, C, H, W]` (float32 in [0, 1])."""
        return self.outputs(pixels)[0]

    def score_decoded(self, image: DecodedImage, name: str) -> list[Score]:
        """One Score per frame of a decoded image; out-of-scope images are refused before inference and
        unusual ones after it (OutOfScopeError, UnusualInputError), unless allow_out_of_scope marks them instead."""
        flags = self._scope_flags(image, name)
        pixels = to_model_channels(image.pixels, self.package.channels, name)
        means = _frame_means(image, pixels)
        _require_finite(means, name)
        chunks = [self._image_outputs(pixels[i : i + FRAME_BATCH], name) for i in range(0, len(pixels), FRAME_BATCH)]
        probs = np.concatenate([c[0] for c in chunks])
        ood = np.concatenate([c[1] for c in chunks]) if chunks[0][1] is not None else None
        require_finite_outputs(probs, ood, [name] * len(probs))
        multi = len(probs) > 1
        scores = [
            self.score_from_outputs(p, name, i + 1 if multi else None, image, flags, None if ood is None else float(ood[i]), means[i])
            for i, p in enumerate(probs)
        ]
        return self._screen_content(scores, ood, name)

    def _image_outputs(self, pixels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """`outputs` of frames of the image `name`. The pixels are what model.json's `input` states by now, so a graph
        that refuses them (e.g. its channels, where it leaves them free) is the package's mismatch, not an internal error."""
        try:
            return self.outputs(pixels)
        except ORT_ERRORS as err:
            raise PackageError(
                f"ONNX Runtime could not score this image's {list(pixels.shape)} float32 pixels "
                f"(model.json declares {self.package.channels} channel(s); {type(err).__name__}: {' '.join(str(err).split())})",
                where=name,
                # the package by name, not by its path on this machine: the hint may go to an HTTP client
                hint=f"check that the graph of {self.package.describe()} takes what its model.json's 'input' states "
                "(re-export the package if not), or run with --provider cpu if the accelerator failed",
            ) from err

    def _scope_flags(self, image: DecodedImage, name: str) -> list[str]:
        try:
            check_scope(self.package.scope, image, name)
        except OutOfScopeError as err:
            if not self.allow_out_of_scope:
                raise
            return [f"{OUT_OF_SCOPE}:{err.field}"]
        return []

    def _screen_content(self, scores: list[Score], ood: np.ndarray | None, name: str) -> list[Score]:
        """Withhold the scores of an image whose OOD score passes the threshold (any frame), or flag them."""
        threshold = self.package.ood_threshold
        if ood is None or threshold is None or not ood.max() > threshold:
            return scores
        if not self.allow_out_of_scope:  # the withheld scores still feed the drift monitor, never a result
            raise UnusualInputError(float(ood.max()), threshold, where=name, withheld=scores)
        for score in scores:
            score.flags.append(UNUSUAL_INPUT)
        return scores

    def score_file(self, source: str | Path | bytes | BinaryIO, name: str | None = None) -> list[Score]:
        """Decode a DICOM file (path, bytes or stream) with medtriage.io and score every frame."""
        name = name or str(source if isinstance(source, (str, Path)) else getattr(source, "name", "<upload>"))
        return self.score_decoded(read_dicom(source, min_side=self.min_decoded_side, name=name), name)

    def score_or_reject(self, source, name: str) -> list[Score] | Rejection:
        """Like score_file, but a file that cannot be scored becomes a Rejection with its reason."""
        try:
            return self.score_file(source, name)
        except MedTriageError as err:
            return Rejection.of(name, err)
        except Exception as err:  # a batch goes on: one odd file must not stop the others
            return unexpected_failure(name, err)

    def score_from_outputs(
        self, probs: np.ndarray, name: str, frame: int | None, image: DecodedImage, flags: list[str], ood: float | None, input_mean: float
    ) -> Score:
        """One frame's Score from the graph's outputs (its probabilities and OOD score), with its decision and priority."""
        p = float(probs[self.positive])
        package = self.package
        return Score(
            file=name,
            frame=frame,
            finding=self.finding(probs),
            probability=p,
            priority=self.priority(p),
            probabilities={label: float(v) for label, v in zip(package.label_names, probs)},
            sop_uid=image.sop_uid,
            study_uid=image.study_uid,
            series_uid=image.series_uid,
            modality=image.modality,
            model=package.name,
            version=package.version,
            sha256=package.sha256,
            decision=self.decision(p),
            flags=list(flags),
            ood_score=ood,
            input_mean=input_mean,
            positive_label=package.positive_label,
            calibrated=package.calibrated,
        )

    def finding(self, probs: np.ndarray) -> str:
        return finding_at(probs, self.positive, self.package.label_names, self.package.review_threshold)

    def decision(self, p: float) -> str:
        return decision_at(p, self.package.review_threshold, self.package.urgent_threshold)

    def priority(self, p: float) -> str:
        return priority_at(p, self.package.review_threshold, self.package.urgent_threshold)


def finding_at(probs: np.ndarray, positive: int, label_names: list[str], review: float) -> str:
    """The positive label at or above the review threshold, else the likeliest other label."""
    if probs[positive] >= review:
        return label_names[positive]
    return label_names[max((i for i in range(len(probs)) if i != positive), key=lambda i: probs[i])]


def priority_at(p: float, review: float, urgent: float | None) -> str:
    """URGENT, review or routine: where `p` stands against the operating points."""
    if urgent is not None and p >= urgent:
        return "URGENT"
    return "review" if p >= review else "routine"


def decision_at(p: float, review: float, urgent: float | None) -> str:
    """Why the priority is what it is, in the operating points' terms: 'below review threshold 0.785'."""
    if urgent is not None and p >= urgent:
        return f"at or above urgent threshold {urgent:.3f}"
    if p >= review:
        return f"at or above review threshold {review:.3f}"
    return f"below review threshold {review:.3f}"
