"""Served scores on real DICOM equal the PyTorch pipeline's; every kind of input is scored or rejected with a reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medtriage.errors import ConfigError, PackageError
from medtriage.io.dicom import read_dicom
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor, Rejection, to_model_channels

PARITY_FILES = ["CT_small.dcm", "MR_small.dcm", "RG1_UNCI.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"]
ENCODINGS = {  # file -> what it exercises
    "SC_rgb_jpeg_dcmtk.dcm": "JPEG baseline, RGB",
    "JPEG2000.dcm": "JPEG 2000",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS",
    "MR_small_RLE.dcm": "RLE",
    "RG1_J2KI.dcm": "MONOCHROME1, JPEG 2000, 15-bit CR",
    "JPGExtended.dcm": "JPEG extended 12-bit",
    "JPGLosslessP14SV1_1s_1f_8b.dcm": "JPEG lossless",
    "CT_small.dcm": "16-bit signed CT",
    "SC_rgb.dcm": "RGB uncompressed",
}


def dicom_file(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not available (pydicom-data not installed)")
    return path


def torch_probability(model, path) -> np.ndarray:
    import torch

    pixels = to_model_channels(read_dicom(path).pixels, 1)
    with torch.no_grad():
        return model(torch.from_numpy(pixels)).numpy()[:, 1]


@pytest.mark.parametrize("name", PARITY_FILES)
def test_served_equals_pytorch_on_pydicom_files(predictor, exported, name):
    path = dicom_file(name)
    served = np.array([s.probability for s in predictor.score_file(path)])
    expected = torch_probability(exported[1], path)
    assert np.abs(served - expected).max() < 1e-4


def test_served_equals_pytorch_on_site_pool_files(predictor, exported, tmp_path):
    from medtriage.data.simulate.sites import make_sites

    make_sites(out_dir=tmp_path / "sites", limit=9)
    images = [p for p in sorted((tmp_path / "sites").rglob("*.dcm")) if not isinstance(predictor.score_or_reject(p, p.name), Rejection)]
    assert len(images) >= 6  # the simulator plants a few broken files; the rest are images from three sites
    for path in images:
        served = np.array([s.probability for s in predictor.score_file(path)])
        assert np.abs(served - torch_probability(exported[1], path)).max() < 1e-4, path


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_each_encoding_gets_a_calibrated_score(predictor, name):
    (score,) = predictor.score_file(dicom_file(name))
    assert 0.0 <= score.probability <= 1.0
    assert sum(score.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert score.priority in {"URGENT", "review", "routine"}
    assert score.finding in {"normal", "pneumonia"} and score.sop_uid


def test_multi_frame_scores_every_frame(predictor):
    path = dicom_file("emri_small.dcm")
    scores = predictor.score_file(path)
    assert [s.frame for s in scores] == list(range(1, 11))
    frames = read_dicom(path).pixels
    assert [s.probability for s in scores] == pytest.approx(predictor.probabilities(frames)[:, 1].tolist(), abs=1e-6)


def test_priority_and_finding_follow_the_package_thresholds(predictor):
    package = predictor.package
    review, urgent = package.review_threshold, package.urgent_threshold
    assert predictor.priority(urgent) == "URGENT"
    assert predictor.priority((review + urgent) / 2) == "review" if urgent > review else True
    assert predictor.priority(np.nextafter(review, 0)) == "routine"
    assert predictor.finding(np.array([1 - review, review])) == "pneumonia"
    assert predictor.finding(np.array([0.9, 0.1])) == "normal" if review > 0.1 else True


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda tmp: dicom_file("rtplan.dcm"), "without pixel data: RT Plan"),
        (lambda tmp: dicom_file("reportsi.dcm"), "without pixel data"),
        (lambda tmp: _write(tmp / "garbage.dcm", b"this is not dicom" * 20), "not a DICOM file"),
        (lambda tmp: _write(tmp / "empty.dcm", b""), ""),
        (lambda tmp: _write(tmp / "cut.dcm", open(dicom_file("CT_small.dcm"), "rb").read()[:20000]), "truncated"),
    ],
)
def test_unusable_files_are_rejected_with_a_reason(predictor, tmp_path, make, reason):
    outcome = predictor.score_or_reject(make(tmp_path), "input")
    assert isinstance(outcome, Rejection)
    assert reason in outcome.reason and outcome.reason
    assert outcome.error in {"DicomError", "NotAnImageError"}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the damaged values it reads
@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_a_damaged_file_is_a_typed_rejection_and_its_sr_a_typed_error(predictor, name):
    """Every encoding's decoder meets cut files and overwritten bytes: each becomes a score or a rejection whose error
    type says what is wrong (the catch-all 'internal error' would tell a radiologist nothing). A damaged header can
    still score: its SR then builds, or fails as a DicomError that the CLI, the HTTP API and the node report."""
    import io

    from medtriage.errors import DicomError
    from medtriage.serve.dicom_results import sr_bytes
    from tests.io.damage import mutations

    internal, untyped = [], []
    for data in mutations(open(dicom_file(name), "rb").read(), 40):
        outcome = predictor.score_or_reject(io.BytesIO(data), name)
        if isinstance(outcome, Rejection):
            internal += [outcome.reason] if outcome.reason.startswith("internal error") else []
            continue
        try:
            sr_bytes(data, outcome, predictor.package)
        except DicomError:
            pass
        except Exception as err:
            untyped.append(f"{type(err).__name__}: {err}")
    assert internal == [] and untyped == []


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_rgb_becomes_luminance_and_gray_is_repeated():
    rgb = np.zeros((1, 3, 2, 2), np.float32)
    rgb[:, 0], rgb[:, 1], rgb[:, 2] = 1.0, 0.5, 0.0
    assert to_model_channels(rgb, 1)[0, 0, 0, 0] == pytest.approx(0.299 + 0.587 * 0.5)
    assert to_model_channels(rgb[:, :1], 3).shape == (1, 3, 2, 2)


def test_cuda_asked_but_missing_is_a_loud_error(package_dir):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ConfigError, match="CUDAExecutionProvider is not available"):
        Predictor(load_package(package_dir), provider="cuda")


@pytest.mark.gpu
def test_cuda_provider_is_used_and_agrees_with_cpu(package_dir):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():  # a CUDA torch beside a CPU-only onnxruntime
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu serves on CUDA)")
    package = load_package(package_dir)
    gpu, cpu = Predictor(package, provider="cuda"), Predictor(package)
    assert gpu.provider == "CUDAExecutionProvider"
    path = dicom_file("CT_small.dcm")
    assert gpu.score_file(path)[0].probability == pytest.approx(cpu.score_file(path)[0].probability, abs=1e-4)


@pytest.mark.parametrize("size", [float("inf"), True, [32, float("inf")], "32", 0, None], ids=repr)
def test_reduced_decoding_refuses_an_input_side_that_is_no_whole_number_of_pixels(package_copy, size):
    """Infinity ended `score --reduced-j2k` in a traceback; `true` (read as 1 pixel) decoded radiographs to a few pixels."""
    import json

    meta = json.loads((package_copy / "model.json").read_text())
    meta["preprocessing"]["resize"]["size"] = size
    (package_copy / "model.json").write_text(json.dumps(meta))
    package = load_package(package_copy)
    with pytest.raises(PackageError, match=r"--reduced-j2k needs the model's input side.*resize\.size is") as err:
        Predictor(package, threads=1, reduced_j2k=True)
    assert err.value.where == str(package_copy / "model.json") and "without --reduced-j2k" in err.value.hint
    assert Predictor(package, threads=1).min_decoded_side is None  # without the option the size is not used


def test_reduced_decoding_takes_the_larger_side_of_a_listed_size(package_copy):
    import json

    from medtriage.serve.predictor import J2K_SIDE_MARGIN

    meta = json.loads((package_copy / "model.json").read_text())
    meta["preprocessing"]["resize"]["size"] = [32, 48]
    (package_copy / "model.json").write_text(json.dumps(meta))
    assert Predictor(load_package(package_copy), threads=1, reduced_j2k=True).min_decoded_side == J2K_SIDE_MARGIN * 48


@pytest.mark.parametrize("through", ["score", "upload to the worklist"])
def test_an_unexpected_failure_logs_the_file_name_on_one_line(predictor, monkeypatch, caplog, through):
    """An upload's file name is the client's text: before, a line break in it started a log line of its own (a
    record that was never logged)."""
    from medtriage.serve.worklist import Worklist

    def failing(*args, **kwargs):
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(predictor, "score_decoded", failing)
    name = "chest.dcm\n2026-12-04 12:00:00 INFO medtriage: all studies delivered"
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    with caplog.at_level("ERROR"):
        if through == "score":
            outcome = predictor.score_or_reject(data, name)
        else:
            outcome = Worklist(predictor).score_or_reject(data, name)
    assert isinstance(outcome, Rejection) and "(RuntimeError)" in outcome.reason and "unforeseen" not in outcome.reason
    (record,) = [r for r in caplog.records if "unexpected failure" in r.getMessage()]
    assert "\n" not in record.getMessage() and "chest.dcm" in record.getMessage()
    assert str(record.exc_info[1]) == "unforeseen"  # the message is the log's, with its traceback
