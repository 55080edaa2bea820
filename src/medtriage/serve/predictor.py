"""Scores from a model package with ONNX Runtime: DICOM -> decoded pixels -> calibrated probability -> priority."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnxruntime as ort

from medtriage.errors import ConfigError, InputError, MedTriageError
from medtriage.io.dicom import DecodedImage, read_dicom
from medtriage.serve.package import ModelPackage

log = logging.getLogger(__name__)
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as in DICOM YBR
FRAME_BATCH = 16  # frames of a multi-frame object scored per ORT call


@dataclass
class Score:
    """One scored image (one frame of a multi-frame object: `frame` counts from 1)."""

    file: str
    frame: int | None
    finding: str
    probability: float  # calibrated probability of the positive label
    priority: str  # URGENT | review | routine
    probabilities: dict
    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str
    model: str
    version: int
    sha256: str

    def as_dict(self) -> dict:
        return {"status": "scored", **asdict(self)}


@dataclass
class Rejection:
    file: str
    reason: str
    error: str  # the error type, e.g. DicomError

    def as_dict(self) -> dict:
        return {"status": "rejected", **asdict(self)}


def create_session(package: ModelPackage, provider: str = "cpu", threads: int | None = None) -> ort.InferenceSession:
    """An ORT session with full graph optimisation and an explicit provider list; no silent CPU fallback."""
    if provider not in PROVIDERS:
        raise ConfigError(f"unknown provider '{provider}'", where="--provider", hint=f"use one of {sorted(PROVIDERS)}")
    wanted = PROVIDERS[provider][0]
    if wanted not in ort.get_available_providers():
        raise ConfigError(
            f"{wanted} is not available in this onnxruntime (available: {', '.join(ort.get_available_providers())})",
            where="--provider", hint="install onnxruntime-gpu with a matching CUDA, or run with --provider cpu",
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(str(package.onnx_path), options, providers=PROVIDERS[provider])
    if session.get_providers()[0] != wanted:  # ORT falls back to CPU when the CUDA libraries fail to load
        raise ConfigError(f"{wanted} was requested but onnxruntime could not start it (it would run on {session.get_providers()[0]})",
                          where="--provider", hint="check the CUDA/cuDNN install, or run with --provider cpu")
    return session


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


class Predictor:
    """A loaded package plus its ORT session; thread-safe (ORT sessions allow concurrent `run`)."""

    def __init__(self, package: ModelPackage, provider: str = "cpu", threads: int | None = None):
        self.package = package
        self.session = create_session(package, provider, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.positive = package.label_names.index(package.positive_label)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Calibrated probabilities `[N, K]` of decoded pixels `[N, C, H, W]` (float32 in [0, 1])."""
        batch = np.ascontiguousarray(pixels, dtype=np.float32)
        return self.session.run(None, {self.input_name: batch})[0]

    def score_decoded(self, image: DecodedImage, name: str) -> list[Score]:
        """One Score per frame of a decoded image."""
        pixels = to_model_channels(image.pixels, self.package.channels, name)
        probs = np.concatenate([self.probabilities(pixels[i : i + FRAME_BATCH]) for i in range(0, len(pixels), FRAME_BATCH)])
        multi = len(probs) > 1
        return [self._score(p, name, i + 1 if multi else None, image) for i, p in enumerate(probs)]

    def score_file(self, source: str | Path | bytes | BinaryIO, name: str | None = None) -> list[Score]:
        """Decode a DICOM file (path, bytes or stream) with medtriage.io and score every frame."""
        name = name or str(source if isinstance(source, (str, Path)) else getattr(source, "name", "<upload>"))
        return self.score_decoded(read_dicom(source), name)

    def score_or_reject(self, source, name: str) -> list[Score] | Rejection:
        """Like score_file, but a file that cannot be scored becomes a Rejection with its reason."""
        try:
            return self.score_file(source, name)
        except MedTriageError as err:
            return Rejection(name, err.reason, type(err).__name__)
        except Exception as err:  # a batch goes on: one odd file must not stop the others
            log.exception("unexpected failure scoring %s", name)
            return Rejection(name, f"internal error while scoring ({type(err).__name__}: {err})", type(err).__name__)

    def _score(self, probs: np.ndarray, name: str, frame: int | None, image: DecodedImage) -> Score:
        p = float(probs[self.positive])
        package = self.package
        return Score(
            file=name, frame=frame, finding=self.finding(probs), probability=p, priority=self.priority(p),
            probabilities={label: float(v) for label, v in zip(package.label_names, probs)},
            sop_uid=image.sop_uid, study_uid=image.study_uid, series_uid=image.series_uid, modality=image.modality,
            model=package.name, version=package.version, sha256=package.sha256,
        )

    def finding(self, probs: np.ndarray) -> str:
        """The positive label at or above the review threshold, else the likeliest other label."""
        if probs[self.positive] >= self.package.review_threshold:
            return self.package.positive_label
        others = [i for i in range(len(probs)) if i != self.positive]
        return self.package.label_names[max(others, key=lambda i: probs[i])]

    def priority(self, p: float) -> str:
        urgent = self.package.urgent_threshold
        if urgent is not None and p >= urgent:
            return "URGENT"
        return "review" if p >= self.package.review_threshold else "routine"
