"""Score a split of a MedMNIST-layout npz through a model package (numpy + ONNX Runtime only).

MedMNIST ships no DICOM files; this path feeds the same decoded pixels training used (uint8 / 255,
channel first) to the package's ONNX session, so benchmark figures can be reproduced from the
served model. Each image is named `<npz file>#<split>_images[<i>]`, as in the training pool. Every image is scored:
one that the package's OOD score would withhold is flagged `unusual_input` instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medtriage.errors import InputError, PackageError
from medtriage.io.dicom import DecodedImage
from medtriage.io.npz import SPLITS, array_shape, read_npz, require_pixels
from medtriage.serve.predictor import ORT_ERRORS, Predictor, Score, require_finite_outputs
from medtriage.serve.scope import UNUSUAL_INPUT

BATCH = 256
# Float pixels of one batch, in model channels: 256 images of the largest MedMNIST+ size (224 px RGB) take 154 MB.
# Larger images come fewer to a batch, so a batch never holds more than this whatever size the npz states.
BATCH_BYTES = 256 << 20
# Every image's score is held until the report is written, and the byte limit on an array alone would allow billions
# of 1-pixel images: six times the largest MedMNIST split (TissueMNIST train, 165,466 images).
MAX_IMAGES = 1_000_000
# A split with an image the graph returns NaN for is not scored at all: figures without it would not cover the split.
NOT_FINITE_HINT = "no image of the split was scored; report it to whoever maintains the model package"


def read_npz_split(npz_path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 pixels `[N, C, H, W]` in [0, 1], int64 labels `[N]`) of one split."""
    images, labels = _read_split(npz_path, split)
    return _unit_pixels(images), labels


def _read_split(npz_path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images `[N, H, W]` or `[N, H, W, 3]`, int64 labels `[N]`) of one split."""
    if split not in SPLITS:
        raise InputError(f"unknown split '{split}'", where="--split", hint=f"use one of {SPLITS}")
    _require_countable(npz_path, split)
    images, labels = read_npz(npz_path, (split,))[split]
    require_pixels(images, split, f"{npz_path}#{split}_images")
    return images, labels


def _require_countable(npz_path: str | Path, split: str) -> None:
    """Refuse a split of more than MAX_IMAGES from its npy header: reading the split first would already hold all of
    it in memory, which is what the bound is there to prevent."""
    shape = array_shape(npz_path, f"{split}_images")
    if shape and shape[0] > MAX_IMAGES:  # a 0-d array is left to read_npz's layout check
        raise InputError(
            f"{shape[0]} images, more than the {MAX_IMAGES} one run scores",
            where=f"{npz_path}#{split}_images",
            hint="score the split in parts: save slices of it as separate npz files",
        )


def _require_class_labels(labels: np.ndarray, label_names: list[str], npz_path: str | Path, split: str) -> None:
    """Reference labels are indices into the package's classes: any other value would be printed and counted as a
    class the model does not have (or, negative, as one counted from the end)."""
    outside = np.flatnonzero((labels < 0) | (labels >= len(label_names)))
    if len(outside):
        first = int(outside[0])
        # quoted: model.json is outside the package's digest, and a name with an escape sequence would reach the terminal
        classes = ", ".join(f"{i} = {name!r}" for i, name in enumerate(label_names))
        raise InputError(
            f"{len(outside)} label(s) are not classes of the package, the first at index {first}: {int(labels[first])}",
            where=f"{npz_path}#{split}_labels",
            hint=f"the package's classes are {classes}; give an npz of the data set this model was trained for",
        )


def _unit_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images as float32 `[N, C, H, W]` in [0, 1]: one float copy, divided in place (4 bytes a pixel, not 8)."""
    pixels = (images[:, None] if images.ndim == 3 else np.moveaxis(images, -1, 1)).astype(np.float32)
    pixels /= 255.0
    return pixels


def _decoded(pixels: np.ndarray, name: str) -> DecodedImage:
    _, h, w = pixels.shape
    return DecodedImage(
        pixels=pixels[None],
        sop_uid=name,
        study_uid=name,
        series_uid=name,
        patient_id="",
        modality="",
        sop_class_uid="",
        photometric="MONOCHROME2" if pixels.shape[0] == 1 else "RGB",
        rows=h,
        columns=w,
        frames=1,
        bits_stored=8,
        transfer_syntax="",
    )


def score_npz(predictor: Predictor, npz_path: str | Path, split: str) -> tuple[list[Score], dict[str, int]]:
    """Scores of every image of `split` (batched ORT calls) and {image name: reference label}. The split stays uint8
    in memory; each batch is made float on its own (the whole split as float32 would take four times the npz)."""
    images, labels = _read_split(npz_path, split)
    _require_class_labels(labels, predictor.package.label_names, npz_path, split)
    names = [f"{Path(npz_path).name}#{split}_images[{i}]" for i in range(len(labels))]
    return list(_scores(predictor, images, names, f"{npz_path}#{split}_images")), dict(zip(names, map(int, labels)))


def _scores(predictor: Predictor, images: np.ndarray, names: list[str], where: str) -> Iterator[Score]:
    from medtriage.progress import progress
    from medtriage.serve.predictor import to_model_channels

    step = _batch_size(images, predictor.package.channels)
    starts = range(0, len(names), step)
    for start in progress(starts, len(starts), "scoring npz", "batch", "batches", disable=len(names) <= step):
        batch = to_model_channels(_unit_pixels(images[start : start + step]), predictor.package.channels)
        probs, ood = _outputs(predictor, batch, f"{where}[{start}:{start + len(batch)}]")
        require_finite_outputs(probs, ood, names[start : start + step], hint=NOT_FINITE_HINT)
        for i, (name, image, p) in enumerate(zip(names[start : start + step], batch, probs)):
            score = None if ood is None else float(ood[i])
            yield predictor.score_from_outputs(
                p, name, None, _decoded(image, name), _unusual_flag(predictor, score), score, float(image.mean())
            )


def _outputs(predictor: Predictor, batch: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The graph's outputs for one batch; an ONNX Runtime failure becomes an error naming the batch. The npz has passed
    its layout checks by now, so what the graph refuses is most likely the package's own mismatch."""
    try:
        return predictor.outputs(batch)
    except ORT_ERRORS as err:
        raise PackageError(
            f"ONNX Runtime could not score this batch of {list(batch.shape)} float32 pixels; nothing was scored "
            f"({type(err).__name__}: {' '.join(str(err).split())})",  # ORT's message spans lines
            where=where,
            hint=f"check that {predictor.package.onnx_path} takes what model.json's 'input' states (re-export the "
            "package if not), or run with --provider cpu if the accelerator failed",
        ) from err


def _batch_size(images: np.ndarray, model_channels: int) -> int:
    """Images per batch: BATCH, or fewer where their float pixels would pass BATCH_BYTES (at least one). A grayscale
    image fed to an RGB model is repeated into three channels, so the larger channel count is what a batch holds."""
    channels = max(3 if images.ndim == 4 else 1, model_channels)
    per_image = images.shape[1] * images.shape[2] * channels * 4
    return max(1, min(BATCH, BATCH_BYTES // per_image))


def _unusual_flag(predictor: Predictor, ood: float | None) -> list[str]:
    """Every image of the split is scored (the figures must cover it whole); one the package's OOD score would have
    withheld from a radiologist is flagged, so how often that happens on a split can be counted."""
    threshold = predictor.package.ood_threshold
    return [UNUSUAL_INPUT] if ood is not None and threshold is not None and ood > threshold else []
