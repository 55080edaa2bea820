"""Slide-level scoring on the real CMU-1 slide through a real ONNX Runtime session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from medtriage.errors import InputError
from medtriage.io.pathology import iter_tile_batches, prepare_slide
from medtriage.serve.package import load_package
from medtriage.serve.predictor import decision_at
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
        nodes,
        "nuclei",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["B", 3, "H", "W"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["B", 2])],
        initializers,
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
    meta["pathology"] = {
        "tile_size": 112,
        "tile_mpp": 0.5,
        "stain_normalization": "macenko",
        "min_tissue": 0.5,
        "aggregation": "top_k",
        "top_k": 3,
        **block,
    }
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
    deep = tmp_path / "rgb16.tif"  # 16-bit: read as RGB its values would wrap
    tifffile.imwrite(
        deep, np.zeros((512, 512, 3), np.uint16), tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER"
    )
    heatmaps = tmp_path / "heatmaps"
    code = main(["score", str(package), str(CMU1), str(not_slide), str(truncated), str(deep), "--json", "--heatmaps", str(heatmaps)])
    document = json.loads(capsys.readouterr().out)
    assert code == 1  # some inputs were rejected
    (scored,) = document["results"]
    assert scored["modality"] == "SM" and scored["n_tiles"] > 10 and len(scored["top_tiles"]) == 5
    assert 0.0 <= scored["probability"] <= 1.0 and scored["priority"] in {"URGENT", "review", "routine"}
    assert scored["threshold_level"] == "tile"  # a block without slide thresholds falls back to the tile ones
    # its decision states the priority against those thresholds, as an image's does (it was left empty)
    served = load_package(package)
    assert scored["decision"] == decision_at(scored["probability"], served.review_threshold, served.urgent_threshold) != ""
    assert sum(scored["probabilities"].values()) == pytest.approx(1.0)
    assert Path(scored["heatmap"]).is_file() and Path(scored["heatmap"]).parent == heatmaps
    reasons = {Path(r["file"]).name: r["reason"] for r in document["rejected"]}
    assert "not a readable" in reasons["notes.svs"] and "truncated" in reasons["truncated.svs"]
    assert "not an 8-bit RGB brightfield slide" in reasons["rgb16.tif"]


def test_cli_scores_a_dicom_whole_slide_image_once_as_its_folder(package_copy, dicom_wsi, tmp_path, capsys):
    import json

    from medtriage.cli import main

    package = with_pathology_block(package_copy)
    one_file = next(p for p in sorted(dicom_wsi.iterdir()) if p.suffix == ".dcm")
    assert main(["score", str(package), str(dicom_wsi), str(one_file), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [Path(r["file"]) for r in results] == [dicom_wsi]  # one slide, never its files one by one
    as_folder, svs = prepare_slide(dicom_wsi, 112, 0.5), prepare_slide(CMU1, 112, 0.5)
    assert results[0]["modality"] == "SM" and results[0]["n_tiles"] == len(as_folder.grid.tiles)
    # the same slide as its SVS, whose tissue mask comes from the scanner's thumbnail, not the DICOM's lowest level
    assert abs(len(as_folder.grid.tiles) - len(svs.grid.tiles)) <= 0.02 * len(svs.grid.tiles)


def test_cli_refuses_slides_for_a_package_without_tile_settings(package_copy, capsys):
    from medtriage.cli import main

    assert main(["score", str(package_copy), str(CMU1)]) == 1
    assert "not trained on slide tiles" in capsys.readouterr().out


# --- a tile model exported by export_run carries its own pathology block -------------------------


def tile_probe_net(manifest, size: int = 32):
    """A resnet10 on RGB tiles whose random features get a logistic-regression head fitted on the pool's
    training tiles: a discriminative tile model in seconds (the network path is the real one)."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from medtriage.model.networks import PreprocessSpec, build_triage_net

    torch.manual_seed(0)
    net = build_triage_net("resnet10", 2, PreprocessSpec(size=size, in_channels=3, mean=0.5, std=0.25)).eval()
    train = np.flatnonzero(manifest.rows["split"].to_numpy() == "train")
    pixels = torch.from_numpy(np.stack(list(manifest.images(train))))
    head, net.backbone.fc = net.backbone.fc, torch.nn.Identity()
    with torch.no_grad():
        features = net(pixels).numpy()
    probe = LogisticRegression(max_iter=3000).fit(features, manifest.rows["label"].to_numpy()[train])
    head.weight.data = torch.tensor(np.stack([-probe.coef_[0], probe.coef_[0]]) / 2, dtype=torch.float32)
    head.bias.data = torch.tensor([-probe.intercept_[0], probe.intercept_[0]], dtype=torch.float32) / 2
    net.backbone.fc = head
    return net


@pytest.fixture(scope="module")
def tile_package(tmp_path_factory):
    """(package folder, tile pool): a synthetic tile pool -> checkpoint -> export_run, as training ends."""
    from dataclasses import asdict

    from medtriage.data.simulate.tiles import SyntheticTilesConfig, build_synthetic_tile_pool
    from medtriage.export.run import export_run
    from medtriage.model.checkpoint import save_checkpoint
    from medtriage.model.networks import PreprocessSpec

    root = tmp_path_factory.mktemp("tile_model")
    pool = build_synthetic_tile_pool(root / "pool", SyntheticTilesConfig(patients_per_site=10, tiles_per_slide=6, tile_size=48))
    config = {
        "model": {"name": "resnet10", "stem_stride": 2, "preprocess": asdict(PreprocessSpec(size=32, in_channels=3))},
        "data": {"pool_dir": str(pool.pool_dir), "label_names": pool.label_names},
    }
    checkpoint = save_checkpoint(root / "best.pt", model=tile_probe_net(pool).state_dict(), config=config)
    export = {
        "models_dir": str(root / "models"),
        "name": "tiles-test",
        "modality": "SM",
        "parity_images": 8,
        "log_to_mlflow": False,
        "register_model": False,
        "slide_top_k": 3,
    }
    return export_run(None, checkpoint, {**config, "export": export}), pool


def val_slide_scores(package_dir: Path, pool, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k slide scores of the pool's validation slides, recomputed here with ONNX Runtime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(package_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    rows = pool.rows[pool.rows["split"] == "val"]
    scores, labels = [], []
    for _, slide in rows.groupby("slide_id"):
        pixels = np.stack(list(pool.images(pool.rows.index.get_indexer(slide.index))))
        p = session.run(None, {session.get_inputs()[0].name: pixels})[0][:, 1]
        scores.append(np.sort(p)[-top_k:].mean())
        labels.append(int(slide["slide_label"].iloc[0]))
    return np.array(scores), np.array(labels)


@pytest.mark.slow
def test_exported_tile_package_records_how_to_tile_and_slide_thresholds(tile_package):
    import json

    from medtriage.data.simulate.tiles import read_tile_info

    package_dir, pool = tile_package
    meta = json.loads((package_dir / "model.json").read_text())
    block, info = meta["pathology"], read_tile_info(pool.pool_dir)
    assert (block["tile_size"], block["tile_mpp"], block["stain_normalization"]) == (info["tile_size"], info["tile_mpp"], None)
    assert (block["aggregation"], block["top_k"], block["min_tissue"]) == ("top_k", 3, 0.5)
    assert block["threshold_level"] == "slide"
    scores, labels = val_slide_scores(package_dir, pool, top_k=3)
    assert set(labels) == {0, 1}
    # Rule "sensitivity >= 0.95" on fewer than 20 positive slides: the lowest positive slide's score.
    review = block["slide_thresholds"]["review"]
    assert review["threshold"] == pytest.approx(scores[labels == 1].min(), abs=1e-5)
    assert review["specificity"] == pytest.approx((scores[labels == 0] < review["threshold"]).mean())
    assert block["slide_metrics"]["val"]["overall"]["n"] == len(scores)
    assert "test" in block["slide_metrics"]
    card = (package_dir / "MODEL_CARD.md").read_text()
    assert "## Whole slides" in card and f"{review['threshold']:.4f}" in card


@pytest.mark.slow
def test_medtriage_score_reads_the_exported_block_without_edits(tile_package, tmp_path, capsys):
    import json

    from medtriage.cli import main

    package_dir, _ = tile_package
    block = json.loads((package_dir / "model.json").read_text())["pathology"]
    heatmaps = tmp_path / "heatmaps"
    # Real tissue is unlike the synthetic training tiles (OOD): scored only on request, and flagged.
    assert main(["score", str(package_dir), str(CMU1), "--json", "--heatmaps", str(heatmaps), "--allow-out-of-scope"]) == 0
    (scored,) = json.loads(capsys.readouterr().out)["results"]
    assert scored["modality"] == "SM" and scored["threshold_level"] == "slide" and scored["flags"] == ["unusual_input"]
    assert scored["tile_mpp"] == block["tile_mpp"] and scored["n_tiles"] > 20
    assert scored["positive_label"] == json.loads((package_dir / "model.json").read_text())["positive_label"]
    tiles = scored["top_tiles"]
    assert len(tiles) == 5 and all(t["size"] == round(block["tile_size"] * block["tile_mpp"] / scored["slide_mpp"]) for t in tiles)
    assert scored["probability"] == pytest.approx(np.mean([t["probability"] for t in tiles[:3]]), abs=1e-3)
    review, urgent = block["slide_thresholds"]["review"]["threshold"], block["slide_thresholds"]["urgent"]["threshold"]
    expected = "URGENT" if scored["probability"] >= urgent else "review" if scored["probability"] >= review else "routine"
    assert scored["priority"] == expected
    heatmap = Path(scored["heatmap"])
    assert heatmap.parent == heatmaps and Image.open(heatmap).format == "PNG"


def test_schema_refuses_a_malformed_pathology_block(tile_package):
    import json

    from medtriage.errors import PackageError
    from medtriage.format.schema import validate_model_json

    meta = json.loads((tile_package[0] / "model.json").read_text())
    validate_model_json(meta)
    for bad in ({"aggregation": "max"}, {"tile_size": "48"}, {"stain_normalization": "reinhard"}, {"tile_mpp": 0}):
        with pytest.raises(PackageError, match="pathology"):
            validate_model_json({**meta, "pathology": {**meta["pathology"], **bad}})
    without = {k: v for k, v in meta["pathology"].items() if k != "tile_mpp"}
    with pytest.raises(PackageError, match="tile_mpp"):
        validate_model_json({**meta, "pathology": without})


def test_slide_scores_aggregate_per_slide_and_fall_back_to_tile_thresholds():
    from medtriage.config.schema import ExportConfig
    from medtriage.export.pathology import SlideLabels, TilePool, pathology_block, slide_scores

    ids = np.array(["s2", "s1", "s2", "s1", "s2"])
    slides = SlideLabels(ids, np.array([1, 0, 1, 0, 1]), np.array(["a"] * 5))
    tile_scores = np.array([0.9, 0.2, 0.1, 0.4, 0.5])
    scores, labels, _ = slide_scores(tile_scores, slides, "top_k", 2)
    assert scores == pytest.approx([0.3, 0.7]) and list(labels) == [0, 1]  # slides in sorted id order
    assert slide_scores(tile_scores, slides, "mean", 2)[0] == pytest.approx([0.3, 0.5])
    info = {"tile_size": 64, "tile_mpp": 1.0, "stain_normalization": None}
    one_class = SlideLabels(ids, np.ones(5, int), slides.sites)
    block = pathology_block(TilePool(info, one_class), ExportConfig(), positive=1, val_scores=tile_scores)
    assert block["threshold_level"] == "tile" and block["slide_thresholds"] is None and "single class" in block["note"]
    from medtriage.errors import ConfigError

    with pytest.raises(ConfigError, match="slide aggregation"):
        pathology_block(TilePool(info, slides), ExportConfig(slide_aggregation="max"), positive=1, val_scores=tile_scores)
