"""`medtriage score` outputs: the CSV carries a score's flags, an npz split whose graph returns NaN is an error (never
NaN in the JSON), an npz split is made float one batch at a time, and a reader that stops early gets no traceback."""

import csv
import io
import json
import subprocess
import sys
import tracemalloc

import numpy as np
import onnx
import pytest

from medtriage.cli import main
from medtriage.serve.npz import score_npz
from tests.export.tiny_package import NPZ
from tests.serve.test_non_finite_outputs import with_nan_output


def score(capsys, *args) -> tuple[int, str, str]:
    code = main(["score", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_csv_carries_the_flags_the_json_gives(capsys, safe_package_dir):
    _, out, _ = score(capsys, safe_package_dir, "--npz", NPZ, "--split", "test", "--json")
    flagged = {r["file"]: "; ".join(r["flags"]) for r in json.loads(out)["results"] if r["flags"]}
    code, out, _ = score(capsys, safe_package_dir, "--npz", NPZ, "--split", "test", "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert flagged and code == 0  # the safe package flags some test images as unusual
    assert {r["file"]: r["flags"] for r in rows if r["flags"]} == flagged
    assert set(flagged.values()) == {"unusual_input"}


@pytest.mark.parametrize("which", ["probabilities", "OOD score"])
def test_an_npz_split_with_a_nan_output_is_an_error_not_nan_json(capsys, safe_package_dir, tmp_path, which):
    meta = json.loads((safe_package_dir / "model.json").read_text())
    output = onnx.load(safe_package_dir / "model.onnx").graph.output[0].name if which == "probabilities" else meta["ood"]["output"]
    broken = with_nan_output(safe_package_dir, tmp_path / "nan", output)
    code, out, err = score(capsys, broken, "--npz", NPZ, "--split", "test", "--json")
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"NaN or infinite {which}" in err and "test_images[0]" in err


def scored_with_peak(predictor, images: np.ndarray, path) -> tuple[list, dict, int]:
    """`score_npz` of `images` saved as the test split at `path`: its scores, labels and peak of traced memory."""
    np.savez(path, test_images=images, test_labels=np.zeros(len(images), np.int64))
    tracemalloc.start()
    try:
        scores, labels = score_npz(predictor, path, "test")
        return scores, labels, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_npz_split_is_made_float_one_batch_at_a_time(predictor, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (2048, 128, 128), dtype=np.uint8)
    split_as_float = images.size * 4
    scores, labels, peak = scored_with_peak(predictor, images, tmp_path / "big.npz")
    assert len(scores) == len(labels) == len(images)
    assert peak < split_as_float


def test_a_reader_that_stops_early_gets_no_traceback(package_dir):
    """`medtriage score ... --csv | head`: the CSV outgrows the pipe's buffer, and the reader closes it after one line."""
    command = [sys.executable, "-m", "medtriage.cli", "score", str(package_dir), "--npz", str(NPZ), "--split", "test", "--csv"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        assert child.stdout.readline().startswith("status,file,")
        child.stdout.close()
        err = child.stderr.read()
    assert "Traceback" not in err and "BrokenPipeError" not in err and "624 image(s)" in err
    assert child.returncode == 0
