"""Slide-level scoring on the real CMU-1 slide through a real ONNX Runtime session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtriage.errors import InputError
from medtriage.io.pathology import iter_tile_batches, prepare_slide
from medtriage.serve.slides import SlideSettings, aggregate, score_slide

ROOT = Path(__file__).resolve().parents[2]
CMU1 = ROOT / "data" / "samples" / "CMU-1-Small-Region.svs"
SETTINGS = SlideSettings(tile_size=112, tile_mpp=0.5, aggregation="top_k", top_k=3)


def nuclei_model(path: Path) -> Path:
    """An ONNX graph: p(positive) = sigmoid(12 * (0.75 - mean red)); nucleus-dense (blue) tiles score high."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceMean", ["pixels", "axes"], ["channel_mean"], keepdims=0),  # [B, 3]
        helper.make_node("MatMul", ["channel_mean", "weights"], ["logit_raw"]),  # [B, 1]
        helper.make_node("Add", ["logit_raw", "bias"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p"]),
        helper.make_node("Sub", ["one", "p"], ["q"]),
        helper.make_node("Concat", ["q", "p"], ["probabilities"], axis=1),
    ]
    initializers = [
        helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
        helper.make_tensor("weights", TensorProto.FLOAT, [3, 1], [-12.0, 0.0, 0.0]),
        helper.make_tensor("bias", TensorProto.FLOAT, [1], [9.0]),
        helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
    ]
    graph = helper.make_graph(
        nodes, "nuclei", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["B", 3, "H", "W"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["B", 2])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def predict(tmp_path_factory):
    import onnxruntime as ort

    session = ort.InferenceSession(str(nuclei_model(tmp_path_factory.mktemp("onnx") / "nuclei.onnx")), providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {"pixels": batch})[0]


def reference_probabilities(settings: SlideSettings) -> np.ndarray:
    """The same model in numpy, tile by tile."""
    prepared = prepare_slide(CMU1, settings.tile_size, settings.tile_mpp, settings.min_tissue)
    with prepared.slide:
        red = np.concatenate([batch[:, 0].mean(axis=(1, 2)) for _, batch in iter_tile_batches(prepared)])
    return 1 / (1 + np.exp(-(9.0 - 12.0 * red)))


def test_slide_score_aggregates_tile_probabilities(predict, tmp_path):
    heatmap = tmp_path / "heatmap.png"
    result = score_slide(CMU1, predict, SETTINGS, heatmap_path=heatmap, n_top=4)
    expected = reference_probabilities(SETTINGS)
    assert result.n_tiles == len(expected) and result.n_background > 0
    assert result.score == pytest.approx(np.sort(expected)[-3:].mean(), abs=1e-5)
    assert [t["probability"] for t in result.top_tiles] == pytest.approx(np.sort(expected)[::-1][:4], abs=1e-4)
    assert result.top_tiles[0]["probability"] > np.median(expected)
    assert all(0 <= t["x"] < 2220 and 0 <= t["y"] < 2967 for t in result.top_tiles)
    mean = score_slide(CMU1, predict, SlideSettings(tile_size=112, tile_mpp=0.5, aggregation="mean"))
    assert mean.score == pytest.approx(expected.mean(), abs=1e-5) and mean.score < result.score


def test_heatmap_is_drawn_over_the_thumbnail(predict, tmp_path):
    heatmap = tmp_path / "heatmap.png"
    score_slide(CMU1, predict, SETTINGS, heatmap_path=heatmap)
    image = np.asarray(Image.open(heatmap).convert("RGB"), np.int16)
    assert max(image.shape[:2]) == 1024
    coloured = np.abs(image[..., 0] - image[..., 2]) > 60  # overlay colours are far from grey
    assert 0.05 < coloured.mean() < 0.8


def test_stain_normalisation_setting_changes_what_the_model_sees(predict):
    plain = score_slide(CMU1, predict, SETTINGS)
    normalized = score_slide(CMU1, predict, SlideSettings(**{**vars(SETTINGS), "stain_normalization": "macenko"}))
    assert plain.n_tiles == normalized.n_tiles
    assert abs(plain.score - normalized.score) > 1e-3


def test_settings_come_from_the_package_block():
    settings = SlideSettings.from_meta({"tile_size": 96, "tile_mpp": 1.0, "stain_normalization": "macenko", "unknown": 1})
    assert (settings.tile_size, settings.tile_mpp, settings.stain_normalization) == (96, 1.0, "macenko")
    assert SlideSettings.from_meta(None) == SlideSettings()


def test_top_k_is_bounded_by_the_tile_count():
    probs = np.array([0.1, 0.9, 0.5])
    assert aggregate(probs, "top_k", 10) == pytest.approx(0.5)
    assert aggregate(probs, "top_k", 1) == pytest.approx(0.9)


def test_non_slide_input_is_a_typed_error(predict, tmp_path):
    path = tmp_path / "scan.tiff"
    path.write_bytes(b"II*\x00" + b"\x00" * 64)
    with pytest.raises(InputError):
        score_slide(path, predict, SETTINGS)


# --- `medtriage score` with a real exported package ----------------------------------------------


def with_pathology_block(package_copy: Path, **block) -> Path:
    import json

    meta_path = package_copy / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["pathology"] = {"tile_size": 112, "tile_mpp": 0.5, "stain_normalization": "macenko", "aggregation": "top_k", "top_k": 3, **block}
    meta_path.write_text(json.dumps(meta))
    return package_copy


def test_cli_scores_slides_and_rejects_bad_ones(package_copy, tmp_path, capsys):
    import json

    from medtriage.cli import main

    package = with_pathology_block(package_copy)
    not_slide = tmp_path / "notes.svs"
    not_slide.write_text("not a slide")
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(CMU1.read_bytes()[: CMU1.stat().st_size // 2])
    heatmaps = tmp_path / "heatmaps"
    code = main(["score", str(package), str(CMU1), str(not_slide), str(truncated), "--json", "--heatmaps", str(heatmaps)])
    document = json.loads(capsys.readouterr().out)
    assert code == 1  # some inputs were rejected
    (scored,) = document["results"]
    assert scored["modality"] == "SM" and scored["n_tiles"] > 10 and len(scored["top_tiles"]) == 5
    assert 0.0 <= scored["probability"] <= 1.0 and scored["priority"] in {"URGENT", "review", "routine"}
    assert sum(scored["probabilities"].values()) == pytest.approx(1.0)
    assert Path(scored["heatmap"]).is_file() and Path(scored["heatmap"]).parent == heatmaps
    reasons = {Path(r["file"]).name: r["reason"] for r in document["rejected"]}
    assert "not a readable" in reasons["notes.svs"] and "truncated" in reasons["truncated.svs"]


def test_cli_refuses_slides_for_a_package_without_tile_settings(package_copy, capsys):
    from medtriage.cli import main

    assert main(["score", str(package_copy), str(CMU1)]) == 1
    assert "not trained on slide tiles" in capsys.readouterr().out
