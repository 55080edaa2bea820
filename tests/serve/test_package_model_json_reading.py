"""How model.json is read: a file far larger than any package's metadata is refused before it is read, and a
whole-number float where the schema says integer (JSON Schema's integer, which other tools may write) serves as an int."""

from __future__ import annotations

import shutil
import tracemalloc

import pytest

from medtriage.errors import PackageError
from medtriage.format import MAX_META_BYTES
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from medtriage.serve.slides import SlideScore, score_slide_file
from tests.serve.test_serve_package import edited
from tests.serve.test_slides import CMU1, with_pathology_block


def test_an_export_into_a_folder_holding_an_oversized_model_json_reads_none_of_it(tmp_path):
    """The export's own looks at what a package folder holds (which version, whether it is its own) are bounded too."""
    from medtriage.export.package import _holds
    from medtriage.export.run import _held

    with open(tmp_path / "model.json", "wb") as file:
        file.truncate(MAX_META_BYTES + 1)
    tracemalloc.start()
    try:
        said, held = _held(tmp_path), _holds(tmp_path, {"name": "x", "version": 1, "sha256": "0"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (said, held) == (f"{tmp_path} holds no package", False) and peak < MAX_META_BYTES // 16


def test_a_model_json_larger_than_any_package_metadata_is_refused_unread(tmp_path):
    """A folder copied from a share or a stick may hold any file as model.json; it is not read into memory."""
    meta_path = tmp_path / "model.json"
    with open(meta_path, "wb") as file:
        file.truncate(MAX_META_BYTES + 1)  # sparse: takes no disk
    tracemalloc.start()
    try:
        with pytest.raises(PackageError) as err:
            load_package(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_META_BYTES // 16
    assert f"model.json is {MAX_META_BYTES + 1} bytes, more than the {MAX_META_BYTES}" in str(err.value)
    assert err.value.where == str(meta_path) and "copy the package folder again" in err.value.hint


def test_a_model_json_at_the_bound_is_read(tmp_path):
    (tmp_path / "model.json").write_text("{}".ljust(MAX_META_BYTES))
    with pytest.raises(PackageError, match="missing .*'sha256'"):  # read, parsed, and checked against the schema
        load_package(tmp_path)


def test_whole_number_floats_for_integer_tile_settings_score_slides(package_copy):
    """Served as floats, 112.0 and 3.0 failed with a TypeError inside tiling, which ended a whole batch."""
    package = load_package(with_pathology_block(package_copy, tile_size=112.0, top_k=3.0, tile_mpp=1.0, stain_normalization=None))
    block = package.meta["pathology"]
    assert (block["tile_size"], block["top_k"]) == (112, 3) and type(block["tile_size"]) is int and type(block["top_k"]) is int
    assert type(block["tile_mpp"]) is float  # a number in the schema stays one
    result = score_slide_file(Predictor(package, threads=1), CMU1)
    assert isinstance(result, SlideScore) and result.n_tiles > 3 and len(result.top_tiles) == 5


def test_whole_number_floats_are_checked_as_the_integers_they_are(safe_package_dir, tmp_path):
    """The consistency checks compare ints: a window of 50.0 under a minimum of 100.0 no longer slips past them."""
    copy = shutil.copytree(safe_package_dir, tmp_path / "safe")
    edited(copy, lambda meta: meta["drift"].update(window=50.0, min_images=100.0))
    with pytest.raises(PackageError, match="drift.min_images 100 is more than drift.window 50: no source could ever raise"):
        load_package(copy)


def test_a_fractional_integer_field_is_still_refused(package_copy):
    edited(package_copy, lambda meta: meta["output"].update(classes=2.5))
    with pytest.raises(PackageError, match=r"\$\.output\.classes: expected integer, got 2\.5"):
        load_package(package_copy)
