"""`medtriage score --npz`: labels that are not classes of the package are refused (never printed as reference labels),
a split of more images than one run scores is refused from its header before its images are read, and an ONNX Runtime
failure on a batch is an error naming the npz, the split and the batch, not a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from medtriage.cli import main
from medtriage.errors import InputError, MedTriageError
from medtriage.serve import npz
from medtriage.serve.npz import score_npz
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from tests.serve.test_package_input_shape import with_input_dims


def save_split(path, images: np.ndarray, labels: np.ndarray):
    np.savez(path, test_images=images, test_labels=labels)
    return path


@pytest.mark.parametrize(
    "labels",
    [
        np.array([0, 1, 2, 1]),  # the package has two classes: 2 is none of them
        np.array([0, 1, -1, 0]),
        np.array([[0], [1], [7], [1]], np.uint8),  # the MedMNIST [N, 1] column, read as [N]
    ],
)
def test_labels_that_are_not_classes_of_the_package_are_refused(predictor, tmp_path, labels):
    path = save_split(tmp_path / "bad.npz", np.zeros((4, 28, 28), np.uint8), labels)
    with pytest.raises(InputError) as caught:
        score_npz(predictor, path, "test")
    assert caught.value.where == f"{path}#test_labels" and "index 2" in caught.value.reason
    assert "0 = 'normal', 1 = 'pneumonia'" in caught.value.hint


def test_a_label_past_int64_is_refused_showing_its_value(predictor, tmp_path):
    path = save_split(tmp_path / "bad.npz", np.zeros((4, 28, 28), np.uint8), np.array([0, 1, 2**63, 1], np.uint64))
    with pytest.raises(InputError) as caught:
        score_npz(predictor, path, "test")
    assert caught.value.where == f"{path}#test_labels" and "index 2" in caught.value.reason
    assert str(2**63) in caught.value.reason  # not the negative number it wraps to as int64


def test_labels_that_are_not_integers_stay_refused(predictor, tmp_path):
    path = save_split(tmp_path / "float.npz", np.zeros((4, 28, 28), np.uint8), np.array([0.0, 1.0, 0.5, 1.0]))
    with pytest.raises(InputError) as caught:
        score_npz(predictor, path, "test")
    assert str(path) in caught.value.where and "'test_labels'" in caught.value.reason


def test_the_cli_prints_no_scores_for_labels_outside_the_classes(capsys, package_dir, tmp_path):
    path = save_split(tmp_path / "bad.npz", np.zeros((4, 28, 28), np.uint8), np.array([0, 1, 5, 1]))
    code = main(["score", str(package_dir), "--npz", str(path), "--split", "test", "--json"])
    out = capsys.readouterr()
    assert code == 2 and out.out == "" and "bad.npz#test_labels" in out.err and "pneumonia" in out.err


def test_a_split_of_exactly_the_bound_is_scored(predictor, tmp_path, monkeypatch):
    monkeypatch.setattr(npz, "MAX_IMAGES", 3)
    path = save_split(tmp_path / "three.npz", np.zeros((3, 8, 8), np.uint8), np.array([0, 1, 1]))
    scores, labels = score_npz(predictor, path, "test")
    assert len(scores) == len(labels) == 3


def test_a_split_over_the_bound_is_refused_before_its_images_are_read(predictor, tmp_path, monkeypatch):
    """The count comes from the npy header: the images (here 11 x 512 x 512, 2.75 MiB) are never allocated."""
    monkeypatch.setattr(npz, "MAX_IMAGES", 10)
    images = np.random.default_rng(0).integers(0, 256, (11, 512, 512), dtype=np.uint8)
    path = save_split(tmp_path / "many.npz", images, np.zeros(11, np.int64))
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as caught:
            score_npz(predictor, path, "test")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "11 images" in caught.value.reason and caught.value.where == f"{path}#test_images"
    assert peak < images.nbytes // 8


def channels_mismatched(package_copy, tmp_path):
    """The package with its graph's channel dimension left free and model.json stating 3 input channels (a fixed one
    that disagrees is refused at load): the npz's grayscale images are repeated into 3 channels, which ONNX Runtime
    refuses when it runs the graph."""
    package = with_input_dims(package_copy, tmp_path / "free_channels", {1: "channels"})
    meta = json.loads((package / "model.json").read_text())
    meta["input"]["channels"] = 3
    (package / "model.json").write_text(json.dumps(meta))
    return package


def test_an_onnx_runtime_failure_names_the_npz_split_and_batch(package_copy, tmp_path, monkeypatch):
    scorer = Predictor(load_package(channels_mismatched(package_copy, tmp_path)), threads=1)
    path = save_split(tmp_path / "gray.npz", np.zeros((5, 28, 28), np.uint8), np.zeros(5, np.int64))
    monkeypatch.setattr(npz, "BATCH", 2)
    with pytest.raises(MedTriageError) as caught:
        score_npz(scorer, path, "test")
    assert caught.value.where == f"{path}#test_images[0:2]" and "ONNX Runtime" in caught.value.reason
    assert "Input channels C is not equal to kernel channels" in caught.value.reason and "model.json" in caught.value.hint
    assert isinstance(caught.value.__cause__, Exception)


def test_the_cli_reports_an_onnx_runtime_failure_without_a_traceback(package_copy, tmp_path):
    package = channels_mismatched(package_copy, tmp_path)
    path = save_split(tmp_path / "gray.npz", np.zeros((5, 28, 28), np.uint8), np.zeros(5, np.int64))
    command = [sys.executable, "-m", "medtriage.cli", "score", str(package), "--npz", str(path), "--split", "test"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr and f"error: {path}#test_images[0:5]" in done.stderr
