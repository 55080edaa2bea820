import json
import shutil
from pathlib import Path

import pytest

from medtriage.errors import PackageError
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor


def test_a_valid_package_loads(package_dir, exported):
    package = load_package(package_dir)
    assert package.name == "tiny-pneumonia" and package.version == exported[0].meta["version"]
    assert package.channels == 1 and package.positive_label == "pneumonia"
    assert package.urgent_threshold >= package.review_threshold
    assert package.describe().startswith(f"tiny-pneumonia v{package.version} (sha256 {package.sha256[:4]}")


def test_a_tampered_model_onnx_is_refused_with_what_to_do(package_copy):
    onnx_path = package_copy / "model.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(PackageError) as err:
        load_package(package_copy)
    message = str(err.value)
    assert "does not match its recorded sha256" in message and "refusing" in message
    assert "re-export" in message and "scripts/export.py" in message


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda d: (d / "model.json").unlink(), "model.json is missing"),
        (lambda d: (d / "model.onnx").unlink(), "model.onnx is missing"),
        (lambda d: (d / "model.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "model.json").write_text(json.dumps({"name": "x"})), "missing .*'sha256'"),
    ],
)
def test_incomplete_packages_are_refused(package_copy, damage, expected):
    damage(package_copy)
    with pytest.raises(PackageError, match=expected):
        load_package(package_copy)


def test_a_missing_folder_says_what_to_pass(tmp_path):
    with pytest.raises(PackageError, match="folder that holds model.onnx"):
        load_package(tmp_path / "nope")


def test_a_model_replaced_after_its_package_loaded_is_not_served(package_copy, safe_package_dir):
    package = load_package(package_copy)
    shutil.copy(safe_package_dir / "model.onnx", package_copy / "model.onnx")  # a valid graph, not the one hashed
    with pytest.raises(PackageError, match="changed after its package was loaded"):
        Predictor(package, threads=1)


def test_a_model_onnx_that_onnx_runtime_cannot_read_is_a_package_error_even_with_its_sha256(package_copy):
    """model.json's sha256 vouches for the bytes exported, not that they are a graph: bytes recorded as they are (text
    copied over model.onnx before it was hashed) are refused by name, not with ONNX Runtime's traceback."""
    from tests.export.tiny_package import write_unreadable_graph

    onnx_path = write_unreadable_graph(package_copy)
    with pytest.raises(PackageError, match="ONNX Runtime cannot load model.onnx") as err:
        Predictor(load_package(package_copy))
    assert err.value.where == str(onnx_path) and "re-export" in str(err.value)


def edited(package_dir, change) -> dict:
    """model.json of `package_dir` with `change(meta)` applied (the digest covers model.onnx only)."""
    meta = json.loads((package_dir / "model.json").read_text())
    change(meta)
    (package_dir / "model.json").write_text(json.dumps(meta))
    return meta


def test_an_urgent_threshold_below_the_review_one_is_refused_at_load(package_copy):
    """Served, p = 0.5 would be URGENT with the negative label as its finding (review 0.9, urgent 0.2)."""

    def swap(meta):
        meta["thresholds"]["review"]["threshold"], meta["thresholds"]["urgent"]["threshold"] = 0.9, 0.2

    edited(package_copy, swap)
    with pytest.raises(PackageError, match=r"thresholds\.urgent\.threshold 0\.2 is below thresholds\.review\.threshold 0\.9") as err:
        load_package(package_copy)
    assert err.value.where.endswith("model.json") and "re-export" in err.value.hint


def test_a_drift_window_shorter_than_its_minimum_is_refused_at_load(safe_package_dir, tmp_path):
    copy = Path(shutil.copytree(safe_package_dir, tmp_path / "safe"))
    edited(copy, lambda meta: meta["drift"].update(window=50, min_images=100))
    with pytest.raises(PackageError, match="drift.min_images 100 is more than drift.window 50: no source could ever raise"):
        load_package(copy)


def test_a_site_reference_that_is_not_histograms_is_refused_at_load(safe_package_dir, tmp_path):
    copy = Path(shutil.copytree(safe_package_dir, tmp_path / "safe"))
    edited(copy, lambda meta: meta["drift"]["reference"]["per_site"].update({"site-a": ["not", "histograms"]}))
    with pytest.raises(PackageError, match=r"drift\.reference\.per_site\.site-a is a list"):
        load_package(copy)


@pytest.mark.parametrize("key, values", [("bits_stored", [16, 8]), ("pixel_spacing_mm", [0.4, 0.1])])
def test_a_scope_range_listed_high_end_first_is_refused_at_load(package_copy, key, values):
    """Served, every image would be refused as out of scope, each with a message naming a range that holds nothing."""
    edited(package_copy, lambda meta: meta.update(scope={"modalities": ["CR", "DX"], key: values}))
    with pytest.raises(PackageError, match=rf"scope\.{key} .* is no range"):
        load_package(package_copy)


def test_an_urgent_threshold_equal_to_the_review_one_loads(package_copy):
    """Export clamps an urgent rule that falls below the review threshold to it: equal thresholds are valid."""

    def clamp(meta):
        meta["thresholds"]["urgent"]["threshold"] = meta["thresholds"]["review"]["threshold"]

    meta = edited(package_copy, clamp)
    package = load_package(package_copy)
    assert package.urgent_threshold == package.review_threshold == pytest.approx(meta["thresholds"]["review"]["threshold"])


def test_a_calibrated_flag_written_as_text_is_refused_at_load(package_copy):
    """Read as a truth value, "false" would label raw probabilities calibrated in every result, SR and worklist row."""
    edited(package_copy, lambda meta: meta["output"].update(calibrated="false"))
    with pytest.raises(PackageError, match=r"\$\.output\.calibrated: expected boolean, got str") as err:
        load_package(package_copy)
    assert err.value.where.endswith("model.json") and "re-export" in err.value.hint


QUANTIZATION = {
    "method": "onnxruntime static quantisation",
    "source": {"name": "tiny-pneumonia", "version": 1, "sha256": "0" * 64},
    "calibration": "val split, 8 images",
    "parity": {"images": 8, "max_abs_diff": 0.01, "priority_changes": 0},
}


def test_an_int8_package_without_its_quantization_block_is_refused_at_load(package_copy):
    """Its fp32 source and its parity with it are what let a reader trust int8 scores; without them it is unaccounted for."""
    edited(package_copy, lambda meta: meta.update(precision="int8"))
    with pytest.raises(PackageError, match="model.json says precision 'int8' but has no 'quantization' block") as err:
        load_package(package_copy)
    assert err.value.where.endswith("model.json") and "medtriage quantize" in err.value.hint


def test_an_int8_package_with_its_quantization_block_loads(package_copy):
    edited(package_copy, lambda meta: meta.update(precision="int8", quantization=QUANTIZATION))
    assert load_package(package_copy).meta["quantization"]["source"]["name"] == "tiny-pneumonia"


@pytest.mark.parametrize("precision", [{"precision": "fp32"}, {}])
def test_a_quantization_block_on_an_fp32_package_is_refused_at_load(package_copy, precision):
    """Only quantisation writes the block, always with precision int8: an fp32 package holding one would be taken for a
    quantised model's source, its model card would speak of a source graph it does not have, and quantize would make an
    int8 package of it."""
    edited(package_copy, lambda meta: meta.update(quantization=QUANTIZATION, **precision))
    with pytest.raises(PackageError, match="model.json has a 'quantization' block but says precision 'fp32'") as err:
        load_package(package_copy)
    assert err.value.where.endswith("model.json") and "int8" in err.value.hint
