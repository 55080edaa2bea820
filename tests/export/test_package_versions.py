"""Version numbers that never go backwards or repeat, and model.json fields that must agree with each other."""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest

from medtriage.errors import PackageError
from medtriage.export.package import next_version, write_package
from medtriage.export.registry import Registration, artifact_path
from medtriage.format import META_FILE, ONNX_FILE
from medtriage.serve.package import load_package


@pytest.fixture
def package_copy(exported, tmp_path):
    """A private copy of the tests' shared tiny package that a test may change."""
    return shutil.copytree(exported[0].package_dir, tmp_path / "tiny")


@pytest.fixture
def source(exported):
    """(model.onnx, model.json as a dict) of the tests' shared tiny package."""
    package_dir = exported[0].package_dir
    return package_dir / ONNX_FILE, json.loads((package_dir / META_FILE).read_text())


def test_a_version_withdrawn_by_a_failed_export_does_not_block_the_next_export():
    """The registry never reuses a deleted version's number, and searches do not list deleted versions."""
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("registry")).info.run_id
    failed = Registration(run_id, "chest")
    assert failed() == 1
    failed.withdraw()

    version = Registration(run_id, "chest")()
    assert version > 1
    (registered,) = client.search_model_versions("name='chest'")
    assert int(registered.version) == version and registered.source.endswith(artifact_path(version, "chest"))


def test_a_package_is_never_replaced_by_the_same_or_an_earlier_version(source, tmp_path):
    """A registry that numbers from 1 while the folder holds v3 (exported before MLflow was used), or two exports
    that read the same next version, would otherwise give two different packages one name and version."""
    onnx, meta = source
    write_package(tmp_path / "tiny", onnx, {**meta, "version": 3})
    for version in (1, 3):
        with pytest.raises(PackageError, match="already holds v3") as err:
            write_package(tmp_path / "tiny", onnx, {**meta, "version": version})
        assert "move that package away" in err.value.hint
    assert load_package(tmp_path / "tiny").version == 3


def test_an_export_killed_between_the_renames_does_not_restart_the_versions_at_1(source, tmp_path):
    onnx, meta = source
    package_dir = tmp_path / "models" / "tiny"
    write_package(package_dir, onnx, {**meta, "version": 4})
    package_dir.rename(package_dir.with_name(".tiny.retired-12345"))  # what the kill left

    assert next_version(package_dir) == 5
    write_package(package_dir, onnx, {**meta, "version": 5})
    assert load_package(package_dir).version == 5
    assert sorted(p.name for p in package_dir.parent.iterdir()) == [".tiny.last-version", "tiny"]  # the kill's is gone


def test_a_number_handed_to_a_failed_export_is_not_handed_out_again(tmp_path):
    """Without the registry the models folder numbers the versions: an export that took v1 and then failed leaves no
    package, but its number may already be in its log or its MLflow run, so the next export takes v2."""
    from tests.export.test_export_refuses_what_the_package_cannot_say import export_small, small_net

    with pytest.raises(PackageError, match="would not describe its graph"):  # refused after its version was numbered
        export_small(small_net(classes=3), tmp_path, logits_width=2)
    assert not (tmp_path / "models" / "small").exists()

    assert export_small(small_net(), tmp_path).meta["version"] == 2
    assert next_version(tmp_path / "models" / "small") == 3


@pytest.mark.parametrize("record", [b"", b"three\n", b"0\n", b"\xff"])
def test_a_record_of_the_numbers_handed_out_that_cannot_be_read_is_refused(tmp_path, record):
    """Counting from the package alone could give a failed export's number again."""
    package_dir = tmp_path / "models" / "tiny"
    assert next_version(package_dir) == 1
    (tmp_path / "models" / ".tiny.last-version").write_bytes(record)
    with pytest.raises(PackageError, match="last version handed out") as err:
        next_version(package_dir)
    assert err.value.where == str(tmp_path / "models" / ".tiny.last-version")
    assert "highest version" in err.value.hint


def test_versions_count_on_from_the_package_when_it_is_ahead_of_the_numbers_handed_out(source, tmp_path):
    """A package written with a registry's number (or copied in) counts, as before any number was handed out here."""
    onnx, meta = source
    package_dir = tmp_path / "models" / "tiny"
    assert next_version(package_dir) == 1
    write_package(package_dir, onnx, {**meta, "version": 7})
    assert next_version(package_dir) == 8


@pytest.mark.parametrize(
    "change, complaint",
    [
        (lambda m: m.update(positive_label="covid"), "positive_label"),
        (lambda m: m.update(label_names=["normal", "normal"], positive_label="normal"), "repeats"),
        (lambda m: m["output"].update(classes=3), "output.classes"),
    ],
)
def test_a_package_whose_labels_disagree_is_refused_when_loaded(package_copy, change, complaint):
    """Otherwise it loads and serving fails later with a traceback, or names probabilities after the wrong labels."""
    meta = json.loads((package_copy / META_FILE).read_text())
    change(meta)
    (package_copy / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(PackageError, match=complaint) as err:
        load_package(package_copy)
    assert str(package_copy / META_FILE) in str(err.value) and "re-export" in err.value.hint


@pytest.mark.parametrize(
    "histogram, complaint",
    [
        ({"edges": [0.2, 0.5], "proportions": [0.5, 0.5]}, "one more proportion"),
        ({"edges": [0.5, 0.2], "proportions": [0.3, 0.3, 0.4]}, "increasing"),
        ({"edges": [0.2, 0.5], "proportions": [0.3, 1.5, 0.4]}, "maximum"),
    ],
)
@pytest.mark.parametrize("site", ["all", "site-a"])
def test_drift_references_that_serving_cannot_compare_with_are_refused(package_copy, histogram, complaint, site):
    """Serving bins live values with the edges and compares shares with the proportions, on every scored image."""
    meta = json.loads((package_copy / META_FILE).read_text())
    good = {"edges": [0.2, 0.5], "proportions": [0.3, 0.3, 0.4]}
    histograms = {"brightness": good, "contrast": histogram}
    reference = {"split": "val", "all": histograms if site == "all" else {"brightness": good, "contrast": good}, "per_site": {}}
    if site != "all":
        reference["per_site"][site] = histograms
    meta["drift"] = {
        "features": ["brightness", "contrast"],
        "window": 200,
        "min_images": 100,
        "psi_threshold": 0.25,
        "reference": reference,
    }
    (package_copy / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(PackageError, match=complaint):
        load_package(package_copy)
    histograms["contrast"] = good
    (package_copy / META_FILE).write_text(json.dumps(meta))
    assert load_package(package_copy).meta["drift"]["reference"]["all"]["contrast"] == good


def test_a_name_with_a_trailing_newline_is_refused_before_any_folder_is_made(source, tmp_path):
    """A YAML block scalar (`name: |`) ends in a newline; Python's `$` alone would accept it."""
    onnx, meta = source
    with pytest.raises(PackageError, match="name"):
        write_package(tmp_path / "tiny\n", onnx, {**meta, "name": "tiny\n"})
    assert list(tmp_path.iterdir()) == []


def test_quantising_on_no_calibration_images_says_so(exported, tmp_path):
    from medtriage.errors import ConfigError
    from medtriage.export.quantize import quantize_package
    from tests.export.tiny_package import NPZ

    with pytest.raises(ConfigError, match="calibration images") as err:
        quantize_package(exported[0].package_dir, NPZ, tmp_path / "tiny-int8", limit=0)
    assert err.value.where == "--images"
    assert not (tmp_path / "tiny-int8").exists()


def test_a_model_json_nested_too_deep_to_parse_is_a_package_error(package_copy):
    (package_copy / META_FILE).write_text("[" * 100_000)
    with pytest.raises(PackageError, match="not valid JSON") as err:
        load_package(package_copy)
    assert err.value.hint and "re-export" in err.value.hint


def test_two_models_exported_from_one_run_keep_apart_in_its_artifacts(exported, tmp_path):
    """One run exported under two names (e.g. with and without test-time views) gives each a version 1: were both
    logged to the same folder of the run, the second would overwrite the first's files under the first's registered
    version, which would then serve the other model's graph."""
    from medtriage.export.registry import log_package

    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment("two-names", artifact_location=str(tmp_path / "artifacts"))).info
    result = exported[0]
    first = Registration(run.run_id, result.meta["name"])
    assert first() == Registration(run.run_id, "other-model")() == result.meta["version"] == 1
    log_package(run.run_id, result)

    (mine,) = client.search_model_versions(f"name='{result.meta['name']}'")
    (other,) = client.search_model_versions("name='other-model'")
    assert mine.source != other.source
    logged = {a.path for a in client.list_artifacts(run.run_id, mine.source.removeprefix(f"{run.artifact_uri}/"))}
    assert {path.rsplit("/", 1)[-1] for path in logged} == {"model.onnx", "model.json", "MODEL_CARD.md"}
