"""Occlusion saliency through a real ONNX Runtime session: it finds the one region a model looks at."""

import io
import tracemalloc
import weakref

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medtriage.errors import InputError
from medtriage.io.dicom import read_dicom
from medtriage.serve.package import load_package
from medtriage.serve.predictor import FRAME_BATCH, Predictor
from medtriage.serve.saliency import (
    DEFAULT_GRID,
    explain_frame,
    model_input_size,
    occluded_copies,
    occlusion_saliency,
    overlay_png,
    resize_chw,
)

SIZE = 64


def patch_probe(rows: slice, cols: slice, path, gain: float = 8.0) -> ort.InferenceSession:
    """A real ONNX model whose p(positive) = sigmoid(gain * (mean of one fixed patch - 0.5)): only that patch matters."""
    from onnx import TensorProto, helper, save

    def const(name, values, dtype=TensorProto.INT64):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [len(values)], values))

    nodes = [
        const("starts", [rows.start, cols.start]),
        const("ends", [rows.stop, cols.stop]),
        const("axes", [2, 3]),
        const("half", [0.5], TensorProto.FLOAT),
        const("gain", [gain], TensorProto.FLOAT),
        const("one", [1.0], TensorProto.FLOAT),
        helper.make_node("Slice", ["pixels", "starts", "ends", "axes"], ["patch"]),
        helper.make_node("ReduceMean", ["patch"], ["mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["mean4"], ["mean"], axis=1),
        helper.make_node("Sub", ["mean", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["positive"]),
        helper.make_node("Sub", ["one", "positive"], ["negative"]),
        helper.make_node("Concat", ["negative", "positive"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "patch-probe",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def scene(rows: slice, cols: slice, seed: int) -> np.ndarray:
    """Noise around 0.5 with a bright patch where the probe looks."""
    image = np.random.default_rng(seed).uniform(0.3, 0.7, (1, SIZE, SIZE)).astype(np.float32)
    image[:, rows, cols] = 0.95
    return image


REGIONS = {"lower-left": (slice(40, 54), slice(6, 20)), "upper-right": (slice(4, 16), slice(44, 60))}


@pytest.mark.parametrize("rows, cols", REGIONS.values(), ids=REGIONS.keys())
def test_the_map_peaks_where_the_model_looks(tmp_path, rows, cols):
    session = patch_probe(rows, cols, tmp_path / "probe.onnx")
    predict = lambda batch: session.run(None, {"pixels": batch})[0]  # noqa: E731
    image = scene(rows, cols, seed=rows.start)
    result = occlusion_saliency(predict, image, positive=1, grid=8)

    assert result.map.shape == (SIZE, SIZE) and result.map.dtype == np.float32
    assert result.map.min() >= 0 and result.map.max() == pytest.approx(1.0)
    peak = np.unravel_index(np.argmax(result.map), result.map.shape)
    assert rows.start <= peak[0] < rows.stop and cols.start <= peak[1] < cols.stop
    inside = np.zeros_like(result.map, dtype=bool)
    inside[rows, cols] = True
    far = np.ones_like(inside)
    far[max(0, rows.start - 12) : rows.stop + 12, max(0, cols.start - 12) : cols.stop + 12] = False
    assert result.map[inside].mean() > 0.5 and result.map[far].max() < 0.05
    assert result.baseline == pytest.approx(float(predict(image[None])[0, 1]), abs=1e-5)


def test_a_model_that_ignores_the_image_gives_an_empty_map():
    constant = lambda batch: np.tile([[0.3, 0.7]], (len(batch), 1)).astype(np.float32)  # noqa: E731
    result = occlusion_saliency(constant, np.random.default_rng(0).random((1, 40, 30), np.float32), positive=1)
    assert result.max_drop == 0 and not result.map.any()


def test_occlusions_cover_the_image_once_and_go_through_in_runs_no_larger_than_scoring_ones():
    image = np.random.default_rng(1).random((3, 50, 71), np.float32)
    copies = occluded_copies(image, grid=7)
    changed = (copies != image[None]).any(axis=1)  # [49, H, W]: where each copy differs
    assert copies.shape == (49, 3, 50, 71) and (changed.sum(axis=0) <= 1).all()
    calls = []
    occlusion_saliency(lambda b: calls.append(len(b)) or np.full((len(b), 2), 0.5, np.float32), image, 1, grid=7)
    assert sum(calls) == 50 and max(calls) == FRAME_BATCH  # the unoccluded image and 49 occlusions, in runs of 16


def test_the_map_from_runs_of_scoring_size_is_the_map_from_one_run_of_every_copy(tmp_path):
    rows, cols = REGIONS["lower-left"]
    session = patch_probe(rows, cols, tmp_path / "probe.onnx")
    image = scene(rows, cols, seed=5)
    received = []

    def predict(batch):
        received.append(batch.copy())
        return session.run(None, {"pixels": batch})[0]

    chunked = occlusion_saliency(predict, image, positive=1, grid=8)
    every_copy = np.concatenate([image[None], occluded_copies(image, grid=8)])
    np.testing.assert_array_equal(np.concatenate(received), every_copy)  # the same images, in the same order
    at_once = iter(session.run(None, {"pixels": every_copy})[0])  # one run of all 65, handed out as asked
    unchunked = occlusion_saliency(lambda batch: np.stack([next(at_once) for _ in batch]), image, positive=1, grid=8)
    np.testing.assert_array_equal(chunked.map, unchunked.map)
    assert (chunked.baseline, chunked.max_drop) == (unchunked.baseline, unchunked.max_drop)


def test_occluded_copies_are_built_one_run_at_a_time():
    """A model with a large input: all 50 copies of a 3 x 256 x 256 image are 39 MB; one run of 16 is 13 MB."""
    image = np.random.default_rng(2).random((3, 256, 256), np.float32)
    tracemalloc.start()
    try:
        occlusion_saliency(lambda b: np.full((len(b), 2), 0.5, np.float32), image, 1, grid=7)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (FRAME_BATCH + 4) * image.nbytes


def test_the_session_never_runs_more_images_than_scoring_does(package_dir):
    predictor = Predictor(load_package(package_dir), threads=1)
    session, runs = predictor.session, []

    class Recorder:  # the session as Predictor calls it, counting the images of each run
        def run(self, outputs, feeds):
            runs.append(len(next(iter(feeds.values()))))
            return session.run(outputs, feeds)

    predictor.session = Recorder()
    explain_frame(predictor, read_dicom(get_testdata_file("CT_small.dcm")).pixels[0])
    assert sum(runs) == 1 + DEFAULT_GRID**2 and max(runs) <= FRAME_BATCH


def test_resize_holds_one_colour_plane_at_a_time(monkeypatch):
    """A PIL copy of every plane of a large colour frame at once would add a frame's worth of memory per call."""
    made, most_alive = [], []
    fromarray = Image.fromarray

    def counting(*args, **kwargs):
        most_alive.append(sum(ref() is not None for ref in made))
        plane = fromarray(*args, **kwargs)
        made.append(weakref.ref(plane))
        return plane

    monkeypatch.setattr(Image, "fromarray", counting)
    image = np.random.default_rng(3).random((3, 40, 60), np.float32)
    resized = resize_chw(image, (20, 30))
    assert resized.shape == (3, 20, 30) and resized.dtype == np.float32
    assert len(made) == 3 and max(most_alive) == 0  # each plane's copy gone before the next is made


def test_bad_input_is_a_typed_error():
    predict = lambda b: np.zeros((len(b), 2), np.float32)  # noqa: E731
    with pytest.raises(InputError, match="one image"):
        occlusion_saliency(predict, np.zeros((2, 1, 32, 32), np.float32), 1)
    with pytest.raises(InputError, match="smaller than"):
        occlusion_saliency(predict, np.zeros((1, 4, 32), np.float32), 1, grid=7)


def test_an_image_smaller_than_the_grid_is_refused_with_what_to_do():
    predict = lambda b: np.zeros((len(b), 2), np.float32)  # noqa: E731
    with pytest.raises(InputError, match="smaller than the 7x7 occlusion grid") as refused:
        occlusion_saliency(predict, np.zeros((1, 4, 32), np.float32), 1, grid=7)
    assert "score does not need" in refused.value.hint


def test_overlay_png_is_the_image_with_a_warm_heat_map():
    grey = np.full((1, 60, 80), 0.5, np.float32)
    saliency = np.zeros((60, 80), np.float32)
    saliency[10:20, 50:70] = 1.0
    picture = np.asarray(Image.open(io.BytesIO(overlay_png(grey, saliency))).convert("RGB")).astype(int)
    assert picture.shape == (60, 80, 3)
    assert (picture[40, 10] == 128).all()  # untouched grey where the model did not look
    red, green, blue = picture[15, 60]
    assert red > 170 and red - green > 80 and red - blue > 80  # red over the most salient region


def test_saliency_of_a_real_dicom_through_the_served_package(package_dir):
    predictor = Predictor(load_package(package_dir), threads=1)
    pixels = read_dicom(get_testdata_file("CT_small.dcm")).pixels[0]
    result, png = explain_frame(predictor, pixels)
    assert result.map.shape == pixels.shape[1:] and 0 <= result.map.min() and result.map.max() <= 1
    assert result.work_size == model_input_size(predictor.package.meta) == 32
    expected = predictor.probabilities(pixels[None])[0, predictor.positive]
    assert result.baseline == pytest.approx(float(expected), abs=0.05)  # the working copy is the model's own size
    assert Image.open(io.BytesIO(png)).size == (pixels.shape[2], pixels.shape[1])
