"""Exports of one package at once: each keeps the package it replaced aside until it knows whether it succeeded, and
no other export's cleanup takes that away; what a stopped export left aside is still cleaned up."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medtriage.export.package import settle_package, write_package
from medtriage.format import META_FILE, ONNX_FILE
from medtriage.serve.package import load_package

# Another export of the package, in its own process: it writes its version over it, then keeps it, undoes it, or
# ends before settling either way (as when killed).
OTHER_EXPORT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from medtriage.export.package import settle_package, write_package

    package_dir, onnx, meta_file, settle = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    meta = write_package(package_dir, onnx, json.loads(meta_file.read_text()), keep_previous=True)
    if settle != "unsettled":
        settle_package(package_dir, meta, keep=settle == "keep")
""")


@pytest.fixture
def source(exported):
    """(model.onnx, model.json without its sha256) of the tests' shared tiny package."""
    package_dir = exported[0].package_dir
    meta = json.loads((package_dir / META_FILE).read_text())
    return package_dir / ONNX_FILE, {k: v for k, v in meta.items() if k != "sha256"}


def _other_export(package_dir, onnx, meta: dict, tmp_path, settle: str) -> None:
    (tmp_path / "other.json").write_text(json.dumps(meta))
    other = subprocess.run(
        [sys.executable, "-c", OTHER_EXPORT, str(package_dir), str(onnx), str(tmp_path / "other.json"), settle],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert other.returncode == 0, other.stderr


def _hidden(models) -> list[str]:
    return sorted(p.name for p in models.iterdir() if p.name.startswith("."))


def _v2_over_v1_unsettled(source, tmp_path) -> tuple[Path, dict]:
    """The package folder with v1 in place, then v2 written over it and not yet settled (v1 set aside)."""
    onnx, meta = source
    package_dir = tmp_path / "models" / "tiny"
    write_package(package_dir, onnx, {**meta, "version": 1})
    return package_dir, write_package(package_dir, onnx, {**meta, "version": 2}, keep_previous=True)


@pytest.mark.parametrize("other_process", [True, False], ids=["other-process", "same-process"])
def test_two_failed_exports_at_once_put_the_package_before_them_back(source, tmp_path, other_process):
    """v2 is written and waits for its MLflow upload; v3 is written over it and fails; then v2 fails. Had v3's cleanup
    deleted the v1 that v2 holds aside, no package would be left at all."""
    onnx, meta = source
    package_dir, first = _v2_over_v1_unsettled(source, tmp_path)

    if other_process:
        _other_export(package_dir, onnx, {**meta, "version": 3}, tmp_path, "undo")
    else:
        second = write_package(package_dir, onnx, {**meta, "version": 3}, keep_previous=True)
        settle_package(package_dir, second, keep=False)
    assert load_package(package_dir).version == 2
    settle_package(package_dir, first, keep=False)

    assert load_package(package_dir).version == 1
    assert _hidden(package_dir.parent) == []


def test_an_export_keeps_what_a_running_export_set_aside_until_it_is_settled(source, tmp_path):
    onnx, meta = source
    package_dir, first = _v2_over_v1_unsettled(source, tmp_path)
    (aside,) = _hidden(package_dir.parent)

    _other_export(package_dir, onnx, {**meta, "version": 3}, tmp_path, "keep")
    assert load_package(package_dir).version == 3
    assert json.loads((package_dir.parent / aside / META_FILE).read_text())["version"] == 1  # still there for v2's undo

    settle_package(package_dir, first, keep=False)  # v3 replaced it meanwhile: nothing to undo, v1 goes
    assert load_package(package_dir).version == 3
    assert _hidden(package_dir.parent) == []


def test_what_an_export_that_stopped_before_settling_set_aside_is_removed_by_the_next(source, tmp_path):
    onnx, meta = source
    package_dir = tmp_path / "models" / "tiny"
    write_package(package_dir, onnx, {**meta, "version": 1})
    _other_export(package_dir, onnx, {**meta, "version": 2}, tmp_path, "unsettled")
    assert len(_hidden(package_dir.parent)) == 1  # v1, aside, with no export left to settle it

    write_package(package_dir, onnx, {**meta, "version": 3})
    assert load_package(package_dir).version == 3
    assert _hidden(package_dir.parent) == []


@pytest.mark.parametrize("other_process", [True, False], ids=["other-process", "same-process"])
def test_an_export_that_failed_under_a_later_one_is_not_put_back_by_its_undo(source, tmp_path, other_process):
    """v2 is written, v3 over it; v2 fails first (v3 in place: nothing of the folder to undo), then v3 fails. v3's undo
    put back v2, a version its export withdrew and no registry knows: v1 goes back instead."""
    onnx, meta = source
    package_dir, first = _v2_over_v1_unsettled(source, tmp_path)
    second = write_package(package_dir, onnx, {**meta, "version": 3}, keep_previous=True)

    if other_process:
        (tmp_path / "first.json").write_text(json.dumps(first))
        settling = "settle_package(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), keep=False)"
        code = f"import json, sys\nfrom pathlib import Path\nfrom medtriage.export.package import settle_package\n{settling}"
        done = subprocess.run(
            [sys.executable, "-c", code, str(package_dir), str(tmp_path / "first.json")], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
    else:
        settle_package(package_dir, first, keep=False)
    assert load_package(package_dir).version == 3
    settle_package(package_dir, second, keep=False)

    assert load_package(package_dir).version == 1
    assert _hidden(package_dir.parent) == []


def test_a_first_version_that_failed_under_a_later_one_leaves_no_package_when_that_one_fails_too(source, tmp_path):
    onnx, meta = source
    package_dir = tmp_path / "models" / "tiny"
    first = write_package(package_dir, onnx, {**meta, "version": 1}, keep_previous=True)
    second = write_package(package_dir, onnx, {**meta, "version": 2}, keep_previous=True)
    settle_package(package_dir, first, keep=False)
    settle_package(package_dir, second, keep=False)
    assert not package_dir.exists() and _hidden(package_dir.parent) == []
