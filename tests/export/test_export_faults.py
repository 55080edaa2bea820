"""kill -9 in the middle of writing a model package: the package's folder holds the previous package or
none, never a half-written one that the loader accepts; the next export completes and cleans up."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medtriage.errors import PackageError
from medtriage.export.package import write_package
from medtriage.format import META_FILE, ONNX_FILE
from medtriage.serve.package import load_package

# A child that writes version 2 over `target` and SIGKILLs itself at one point of the write.
KILLED_EXPORT = textwrap.dedent("""
    import json, os, shutil, signal, sys
    from pathlib import Path
    import medtriage.export.package as package

    target, onnx, meta_file, where = sys.argv[1:5]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if where == "copying_onnx":
        def half_copy(source, out):
            out.write(source.read(1000)); out.flush(); die()
        package.shutil.copyfileobj = half_copy
    elif where == "after_meta":
        real = package.write_atomic
        def then_die(path, data):
            real(path, data)
            if Path(path).name == "model.json":
                die()
        package.write_atomic = then_die
    elif where == "between_renames":
        def half_swap(staging, package_dir, retired):
            package_dir.rename(retired)
            die()
        package._swap_in = half_swap
    package.write_package(Path(target), Path(onnx), json.loads(Path(meta_file).read_text()))
""")


@pytest.mark.parametrize("where", ["copying_onnx", "after_meta", "between_renames"])
def test_a_killed_export_never_leaves_a_package_the_loader_accepts(exported, tmp_path, where):
    source = exported[0].package_dir
    meta = json.loads((source / META_FILE).read_text())
    target = tmp_path / "models" / "tiny"
    write_package(target, source / ONNX_FILE, {**meta, "version": 1})
    (tmp_path / "v2.json").write_text(json.dumps({**meta, "version": 2}))

    killed = subprocess.run(
        [sys.executable, "-c", KILLED_EXPORT, str(target), str(source / ONNX_FILE), str(tmp_path / "v2.json"), where],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")]  # the kill left its hidden folder
    try:
        survivor = load_package(target)
    except PackageError as err:
        assert where == "between_renames" and "not found" in str(err)  # none under the name, never a mix
    else:
        assert survivor.version == 1 and survivor.sha256 == meta["sha256"]  # the previous package, whole

    write_package(target, source / ONNX_FILE, {**meta, "version": 2})
    assert load_package(target).version == 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]
    assert sorted(p.name for p in Path(target).iterdir()) == ["MODEL_CARD.md", "model.json", "model.onnx"]
