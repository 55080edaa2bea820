"""Edges of writing and loading a model package: what is already in the target folder, version numbers of a
package that cannot be read, and a package written by a newer medtriage."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from medtriage.errors import PackageError
from medtriage.export.package import next_version, write_package
from medtriage.format import META_FILE, ONNX_FILE, SCHEMA_VERSION
from medtriage.serve.package import load_package


@pytest.fixture
def source(exported):
    """(model.onnx, model.json as a dict) of the session's tiny package."""
    package_dir = exported[0].package_dir
    return package_dir / ONNX_FILE, json.loads((package_dir / META_FILE).read_text())


def test_a_folder_that_is_not_a_package_is_never_replaced(source, tmp_path):
    """`medtriage quantize PKG --out models` must not swap the whole models folder for one package."""
    onnx, meta = source
    models = tmp_path / "models"
    write_package(models / "other", onnx, {**meta, "name": "other"})
    (models / "notes.txt").write_text("site calibration notes")

    with pytest.raises(PackageError, match="not a model package") as err:
        write_package(models, onnx, meta)
    assert "choose" in err.value.hint
    assert load_package(models / "other").name == "other"
    assert (models / "notes.txt").read_text() == "site calibration notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no staging folder left behind


def test_another_models_package_is_never_replaced(source, tmp_path):
    onnx, meta = source
    write_package(tmp_path / "chest", onnx, {**meta, "name": "chest", "version": 3})
    with pytest.raises(PackageError, match="'chest'"):
        write_package(tmp_path / "chest", onnx, {**meta, "name": "tiny"})
    assert load_package(tmp_path / "chest").identity()["name"] == "chest"


def test_the_same_models_next_version_and_an_empty_folder_are_written(source, tmp_path):
    onnx, meta = source
    write_package(tmp_path / "tiny", onnx, {**meta, "version": 1})
    write_package(tmp_path / "tiny", onnx, {**meta, "version": 2})
    assert load_package(tmp_path / "tiny").version == 2
    (tmp_path / "empty").mkdir()
    write_package(tmp_path / "empty", onnx, meta)
    assert load_package(tmp_path / "empty").name == meta["name"]


def other_input_name(meta: dict) -> None:
    meta["input"] = {**meta["input"], "name": "image"}


def other_output_name(meta: dict) -> None:
    meta["output"] = {**meta["output"], "name": "probs"}


@pytest.mark.parametrize(
    "change, expected",
    [(other_input_name, "names the input 'image', which model.onnx does not take"), (other_output_name, "names the output 'probs'")],
)
def test_a_package_that_would_not_load_is_never_written(source, tmp_path, change, expected):
    """model.json and the graph it ships with disagreeing is an export error, not a package every server refuses later;
    the package already there stays."""
    onnx, meta = source
    write_package(tmp_path / "tiny", onnx, {**meta, "version": 1})
    wrong = json.loads(json.dumps({**meta, "version": 2}))
    change(wrong)
    with pytest.raises(PackageError, match=expected) as err:
        write_package(tmp_path / "tiny", onnx, wrong)
    assert "would not load" in err.value.reason and err.value.where == str(tmp_path / "tiny") and "export" in err.value.hint
    assert load_package(tmp_path / "tiny").version == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no staging folder left behind


def test_an_int8_package_without_its_quantization_block_is_never_written(source, tmp_path):
    """load_package refuses it (nothing says what its scores were checked against): refused at export instead."""
    onnx, meta = source
    with pytest.raises(PackageError, match="would not load: model.json says precision 'int8' but has no 'quantization' block"):
        write_package(tmp_path / "tiny", onnx, {**meta, "precision": "int8"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", json.dumps({"version": "four"}), json.dumps({"name": "x"})])
def test_a_package_whose_version_cannot_be_read_does_not_restart_at_1(tmp_path, content):
    """Restarting at 1 would give a second, different 'name v1'; say what is wrong instead."""
    (tmp_path / META_FILE).write_text(content)
    with pytest.raises(PackageError, match="version") as err:
        next_version(tmp_path)
    assert err.value.hint


def test_a_package_of_a_newer_schema_asks_for_a_newer_medtriage(source, tmp_path):
    onnx, meta = source
    target = tmp_path / "future"
    target.mkdir()
    shutil.copy(onnx, target / ONNX_FILE)
    future = {**meta, "schema_version": SCHEMA_VERSION + 1, "provenance": {**meta["provenance"], "medtriage_version": "9.0.0"}}
    (target / META_FILE).write_text(json.dumps(future))
    with pytest.raises(PackageError, match=f"schema version {SCHEMA_VERSION + 1}") as err:
        load_package(target)
    assert "9.0.0" in str(err.value) and "upgrade medtriage" in err.value.hint


def test_a_bundle_that_fails_midway_leaves_nothing_behind(exported, tmp_path, monkeypatch):
    """No network mid-bundle: neither the bundle folder nor its hidden half-built copy (wheels and models) remains."""
    import medtriage
    from medtriage.delivery import bundle
    from medtriage.delivery.wheelhouse import BuildError

    def offline(wheel, out_dir, python, platform):
        (out_dir / "numpy-2.0.0-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"half")
        raise BuildError("pip could not download every dependency", hint="check the index")

    monkeypatch.setattr(bundle, "download_dependencies", offline)
    wheel = tmp_path / f"medtriage-{medtriage.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:  # a wheel as far as the bundle checks before the download
        archive.writestr(f"medtriage-{medtriage.__version__}.dist-info/METADATA", "Name: medtriage\n")
    with pytest.raises(BuildError):
        bundle.build_bundle([exported[0].package_dir], tmp_path / "out", wheel=wheel)
    assert sorted(p.name for p in tmp_path.iterdir()) == [wheel.name]
