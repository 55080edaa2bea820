"""`medtriage score --npz`: a split whose images have no pixels is refused with a typed error (never a raw ONNX Runtime
failure), and a batch of large images is made float within a byte budget, not 256 images at a time whatever their size."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medtriage.cli import main
from medtriage.errors import InputError
from medtriage.serve import npz
from medtriage.serve.npz import score_npz
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from medtriage.serve.report import format_table
from tests.export.tiny_package import NPZ
from tests.serve.test_score_outputs import scored_with_peak


@pytest.mark.parametrize("shape", [(2, 0, 0), (2, 28, 0), (2, 0, 28, 3)])
def test_a_split_of_images_without_pixels_is_an_input_error(predictor, tmp_path, shape):
    np.savez(tmp_path / "empty.npz", test_images=np.zeros(shape, np.uint8), test_labels=np.zeros(shape[0], np.int64))
    with pytest.raises(InputError) as caught:
        score_npz(predictor, tmp_path / "empty.npz", "test")
    assert "test_images" in caught.value.where and "no pixels" in caught.value.reason and caught.value.hint


def test_the_cli_says_what_is_wrong_with_images_without_pixels(capsys, package_dir, tmp_path):
    np.savez(tmp_path / "empty.npz", test_images=np.zeros((2, 28, 0), np.uint8), test_labels=np.zeros(2, np.int64))
    code = main(["score", str(package_dir), "--npz", str(tmp_path / "empty.npz"), "--split", "test"])
    out = capsys.readouterr()
    assert code == 2 and out.out == "" and "no pixels" in out.err and "Traceback" not in out.err


def test_a_batch_of_large_images_stays_within_its_byte_budget(predictor, tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (32, 256, 256), dtype=np.uint8)
    one_as_float = images[0].size * 4
    monkeypatch.setattr(npz, "BATCH_BYTES", 2 * one_as_float, raising=False)
    scores, labels, peak = scored_with_peak(predictor, images, tmp_path / "large.npz")
    assert len(scores) == len(labels) == len(images)
    # reading the uint8 split takes about 3x its size at its peak; one float batch of all 32 images would add 4x more
    assert peak < 4 * images.nbytes


def test_batches_cut_by_bytes_give_the_same_scores(predictor, tmp_path, monkeypatch):
    images = np.random.default_rng(1).integers(0, 256, (5, 64, 64), dtype=np.uint8)
    np.savez(tmp_path / "five.npz", test_images=images, test_labels=np.arange(5) % 2)
    whole, _ = score_npz(predictor, tmp_path / "five.npz", "test")
    monkeypatch.setattr(npz, "BATCH_BYTES", 2 * images[0].size * 4, raising=False)
    cut, labels = score_npz(predictor, tmp_path / "five.npz", "test")
    assert [s.file for s in cut] == [s.file for s in whole] == list(labels)
    assert np.allclose([s.probability for s in cut], [s.probability for s in whole], atol=1e-6)


def test_a_label_with_control_characters_reaches_the_table_header_escaped(package_copy):
    """model.json is not covered by the package's digest: a label carrying an escape sequence must not rewrite the
    terminal the table is printed on, in the header as in the rows."""
    meta = json.loads((package_copy / "model.json").read_text())
    label = "pneu\x1b[2Jmonia"
    meta["label_names"] = [label if name == meta["positive_label"] else name for name in meta["label_names"]]
    meta["positive_label"] = label
    (package_copy / "model.json").write_text(json.dumps(meta))
    scorer = Predictor(load_package(package_copy), threads=1)
    scores, _ = score_npz(scorer, NPZ, "test")
    table = format_table(scorer, scores[:3], [])
    assert "\x1b" not in table and "p(pneu\\x1b[2Jmonia)" in table.splitlines()[0]


def test_a_split_of_more_images_than_one_run_scores_is_refused_before_scoring(predictor, tmp_path, monkeypatch):
    """The byte limit on an array allows billions of 1-pixel images, and every image's score is held until the report
    is written: the count is bounded too (here lowered, so that the test stays small)."""
    monkeypatch.setattr(npz, "MAX_IMAGES", 10, raising=False)
    np.savez(tmp_path / "many.npz", test_images=np.zeros((11, 1, 1), np.uint8), test_labels=np.zeros(11, np.int64))
    with pytest.raises(InputError) as caught:
        score_npz(predictor, tmp_path / "many.npz", "test")
    assert "11 images" in caught.value.reason and "test_images" in caught.value.where and caught.value.hint
