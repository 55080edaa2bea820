"""Checks of the bundle that need no package index: install.sh's refusals on a small bundle of fake wheels and
models, the output folder, the copies of the model packages, and the wheels read for requirements."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

import medtriage
from medtriage.delivery import bundle as bundle_module
from medtriage.delivery.bundle import build_bundle, template_values, write_checksums, write_templates
from medtriage.delivery.wheelhouse import (
    DEFAULT_PLATFORM,
    METADATA_MAX,
    BuildError,
    default_python,
    missing_requirements,
    target_environment,
)
from medtriage.errors import ConfigError, PackageError

NO_PYTHON = "/nonexistent/python"  # install.sh stops at its interpreter check once the bundle's checks have passed


def small_bundle(tmp_path: Path) -> Path:
    """A bundle folder as build_bundle lays it out, with one fake wheel and one fake model package."""
    folder = tmp_path / "bundle"
    write_templates(folder, template_values(default_python(), DEFAULT_PLATFORM, [], ["model"], []))
    (folder / "wheels").mkdir()
    (folder / "wheels" / "alpha-1.0-py3-none-any.whl").write_bytes(b"wheel")
    (folder / "models" / "model").mkdir(parents=True)
    (folder / "models" / "model" / "model.json").write_text("{}")
    write_checksums(folder)
    return folder


def install(folder: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": NO_PYTHON}
    return subprocess.run(
        [str(folder / "install.sh"), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_install_sh_passes_its_checks_on_an_intact_bundle(tmp_path):
    done = install(small_bundle(tmp_path), tmp_path / "opt", cwd=tmp_path)
    assert done.returncode != 0 and f"{NO_PYTHON} not found" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "relative",
    ["systemd/medtriage-extra@.service", "config/extra.env.example", "wheels/numpy-99.0-py3-none-any.whl"],
    ids=["extra unit", "extra config", "link to a wheel"],
)
def test_install_sh_refuses_anything_sha256sums_does_not_list(tmp_path, relative):
    folder = small_bundle(tmp_path)
    if relative.startswith("wheels/"):  # pip follows a link in wheels/; sha256sum --check never sees it
        (tmp_path / "elsewhere.whl").write_bytes(b"not shipped")
        (folder / relative).symlink_to(tmp_path / "elsewhere.whl")
    else:
        (folder / relative).write_text("[Service]\nExecStart=/bin/true\n")
    done = install(folder, tmp_path / "opt", cwd=tmp_path)
    assert done.returncode != 0 and "not listed in SHA256SUMS" in done.stderr and relative in done.stderr, done.stderr
    assert "Nothing was installed" in done.stderr and not (tmp_path / "opt").exists()


def test_install_sh_refuses_a_listed_file_that_is_a_link(tmp_path):
    """sha256sum follows a link, so one to an identical file passed, and cp installed the link itself: the model in
    PREFIX led to a file outside it (on the drive the bundle came on), which could change or go."""
    folder = small_bundle(tmp_path)
    listed, outside = folder / "models" / "model" / "model.json", tmp_path / "model.json"
    listed.rename(outside)
    listed.symlink_to(outside)
    done = install(folder, tmp_path / "opt", cwd=tmp_path)
    assert done.returncode != 0 and "links in the bundle: models/model/model.json." in done.stderr, done.stderr
    assert "Nothing was installed" in done.stderr and "cp -rL" in done.stderr and not (tmp_path / "opt").exists()


@pytest.mark.parametrize("prefix", ["srv/medtriage", "/srv/med triage", "/srv/a#b"], ids=["relative", "space", "sed separator"])
def test_install_sh_refuses_a_prefix_the_units_cannot_carry(tmp_path, prefix):
    folder = small_bundle(tmp_path)
    done = install(folder, prefix, cwd=tmp_path)
    assert done.returncode != 0 and f"PREFIX '{prefix}'" in done.stderr and "Nothing was installed" in done.stderr, done.stderr
    assert not (tmp_path / "srv").exists() and not (folder / "srv").exists()


def test_bundle_command_refuses_an_output_path_that_is_a_file(tmp_path, capsys):
    from medtriage.cli import main

    (tmp_path / "bundle.tar").write_text("not a folder")
    assert main(["bundle", str(tmp_path / "pkg"), "--out", str(tmp_path / "bundle.tar")]) == 2
    err = capsys.readouterr().err
    assert "bundle.tar: the output path is a file" in err and (tmp_path / "bundle.tar").read_text() == "not a folder"


@pytest.fixture
def quick_fill(monkeypatch):
    """build_bundle with no packages to load and a `_fill` that writes two files: the folder handling alone."""

    def fill(staging, models, python, platform, wheel):
        (staging / "wheels").mkdir(parents=True)
        (staging / "wheels" / "alpha-1.0-py3-none-any.whl").write_bytes(b"wheel")
        (staging / "bundle.json").write_text("{}")
        return []

    monkeypatch.setattr(bundle_module, "_model_folders", lambda packages: {"model": Path("unused")})
    monkeypatch.setattr(bundle_module, "_fill", fill)


def test_bundle_into_the_current_empty_folder(tmp_path, monkeypatch, quick_fill):
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    result = build_bundle(["pkg"], ".")
    assert result.directory == tmp_path / "out" and (tmp_path / "out" / "bundle.json").is_file()
    assert not (tmp_path / ".out.partial").exists()


def test_every_file_is_on_disk_before_the_bundle_takes_its_name(tmp_path, monkeypatch, quick_fill):
    synced, at_rename = set(), []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def rename(self, target):
        at_rename.append(set(synced))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    out = build_bundle(["pkg"], tmp_path / "out").directory
    staging = tmp_path / ".out.partial"
    written = {p.relative_to(out) for p in out.rglob("*")}
    assert written == {Path("wheels"), Path("wheels/alpha-1.0-py3-none-any.whl"), Path("bundle.json")}
    assert {str(staging / p) for p in written} | {str(staging)} <= at_rename[0]
    assert str(tmp_path) in synced  # the rename itself


def test_a_failed_sync_after_the_bundle_took_its_name_is_a_warning_not_a_failed_build(tmp_path, monkeypatch, capsys, quick_fill):
    """The bundle was complete under its name, yet the build said `cannot write the bundle` and exited 2."""
    from medtriage.cli import main

    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path):  # the folder that holds the bundle's name
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    assert main(["bundle", "pkg", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: the bundle {out} is complete, but" in err and "Input/output error" in err, err
    assert "found as .out.partial" in err and "dmesg" in err and "sha256sum --check SHA256SUMS" in err, err
    assert "error:" not in err and f"bundle written to {out}" in err, err
    assert (out / "bundle.json").is_file() and not (tmp_path / ".out.partial").exists()


def test_a_second_build_of_the_same_out_while_one_runs_is_refused_and_the_first_completes(tmp_path, monkeypatch):
    """The second removed the first's hidden folder as left over by a stopped build, and built its own there: the first
    then wrote into a folder that was gone."""
    second: list[ConfigError | None] = []

    def fill(staging, models, python, platform, wheel):
        (staging / "bundle.json").write_text("{}")
        if not second:
            second.append(None)
            try:
                build_bundle(["pkg"], tmp_path / "out")  # started while this one is writing
            except ConfigError as err:
                second.append(err)
        (staging / "wheels").mkdir()
        return []

    monkeypatch.setattr(bundle_module, "_model_folders", lambda packages: {"model": Path("unused")})
    monkeypatch.setattr(bundle_module, "_fill", fill)
    first = build_bundle(["pkg"], tmp_path / "out")
    assert [str(err) for err in second[1:]] == [
        f"{tmp_path / 'out'}: another `medtriage bundle` is writing this bundle (in {tmp_path / '.out.partial'}) "
        "(let it finish, or choose another --out)"
    ]
    assert sorted(p.name for p in first.directory.iterdir()) == ["bundle.json", "wheels"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def accept_fake_packages(monkeypatch) -> None:
    """Let `fake_package`s through the checks of a real one: their model.json holds the sha256 alone, their
    model.onnx is no graph."""
    import medtriage.serve.package as package_module

    monkeypatch.setattr(package_module, "validate_model_json", lambda meta, where: None)
    monkeypatch.setattr(bundle_module, "_opens_in_onnx_runtime", lambda package: None)


def fake_package(folder: Path, onnx: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(onnx)
    meta = {"name": folder.name, "version": 1, "sha256": hashlib.sha256(onnx).hexdigest()}
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


def test_a_package_changed_while_the_bundle_is_built_is_not_shipped(tmp_path, monkeypatch):
    """A re-export into the package folder during the download: the copy gets the new model.onnx with the old
    model.json, then the export finishes; the source is sound again, the copy in the bundle is not."""
    accept_fake_packages(monkeypatch)
    source = fake_package(tmp_path / "models" / "pneumonia", b"old model")
    wheel = tmp_path / f"medtriage-{medtriage.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("medtriage.txt", "")

    def download(own, wheels_dir, python, platform):
        (source / "model.onnx").write_bytes(b"new model")
        return [own]

    def copytree(src, dst, **kwargs):
        copied = real_copytree(src, dst, **kwargs)
        fake_package(source, b"new model")  # the export completes its model.json
        return copied

    real_copytree = bundle_module.shutil.copytree
    monkeypatch.setattr(bundle_module, "download_dependencies", download)
    monkeypatch.setattr(bundle_module, "write_sbom", lambda wheels, out, pyproject, models: [])
    monkeypatch.setattr(bundle_module.shutil, "copytree", copytree)
    with pytest.raises(PackageError, match="changed while the bundle was built"):
        build_bundle([source], tmp_path / "out", wheel=wheel)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_each_step_of_the_build_says_what_it_does(tmp_path, monkeypatch, capsys):
    accept_fake_packages(monkeypatch)
    source = fake_package(tmp_path / "models" / "pneumonia", b"model")
    monkeypatch.setattr(bundle_module, "build_medtriage_wheel", lambda wheels_dir: wheels_dir / "medtriage.whl")
    monkeypatch.setattr(bundle_module, "download_dependencies", lambda own, wheels_dir, python, platform: [])
    monkeypatch.setattr(bundle_module, "write_sbom", lambda wheels, out, pyproject, models: [])
    build_bundle([source], tmp_path / "out")
    steps = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bundle: ")]
    assert steps == [
        "bundle: building the medtriage wheel from the source checkout",
        "bundle: copying and verifying 1 model package(s)",
        "bundle: writing the SBOM (cyclonedx-py) and SHA256SUMS",
    ]


@pytest.mark.parametrize("name", ["medtriage.whl", "medtriage"], ids=["no version", "no suffix"])
def test_a_wheel_option_that_names_no_wheel_is_refused_with_a_message(tmp_path, name):
    wheel = tmp_path / name
    wheel.write_text("not a wheel")
    with pytest.raises(ConfigError, match="not a medtriage .* wheel"):
        bundle_module._own_wheel(wheel, tmp_path / "wheels")
    not_a_zip = tmp_path / f"medtriage-{medtriage.__version__}-py3-none-any.whl"
    not_a_zip.write_text("not a zip")
    with pytest.raises(ConfigError, match="not a medtriage .* wheel"):
        bundle_module._own_wheel(not_a_zip, tmp_path / "wheels")


def _zip(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def test_a_wheel_without_metadata_is_a_build_error_not_a_traceback(tmp_path):
    wheel = _zip(tmp_path / "alpha-1.0-py3-none-any.whl", {"alpha/__init__.py": ""})
    with pytest.raises(BuildError, match="no \\*.dist-info/METADATA"):
        missing_requirements([wheel], target_environment("3.11", DEFAULT_PLATFORM))


def test_a_wheel_whose_metadata_claims_too_many_bytes_is_refused_before_it_is_unpacked(tmp_path):
    text = "Metadata-Version: 2.1\nName: alpha\nVersion: 1.0\n\n" + "x" * METADATA_MAX
    wheel = _zip(tmp_path / "alpha-1.0-py3-none-any.whl", {"alpha-1.0.dist-info/METADATA": text})
    with pytest.raises(BuildError, match="METADATA claims"):
        missing_requirements([wheel], target_environment("3.11", DEFAULT_PLATFORM))


def test_two_versions_of_one_wheel_each_get_their_own_sha256_in_the_sbom(tmp_path):
    from medtriage.delivery.sbom import write_sbom
    from medtriage.format import sha256_file
    from tests.delivery.test_bundle import _wheel

    (tmp_path / "old").mkdir()
    wheels = [
        _wheel(tmp_path / "old", "alpha", "1.0", []),
        _wheel(tmp_path, "alpha", "2.0", []),
        _wheel(tmp_path, "beta", "1.0", ["alpha"]),
    ]
    write_sbom(wheels, tmp_path / "sbom.cdx.json", None)
    components = json.loads((tmp_path / "sbom.cdx.json").read_text())["components"]
    hashes = {(c["name"], c["version"]): c["hashes"] for c in components}
    assert hashes == {(w.name.split("-")[0], w.name.split("-")[1]): [{"alg": "SHA-256", "content": sha256_file(w)}] for w in wheels}


def _no_space_for_the_model_copy(monkeypatch, out):
    def copyfile(source, target, **kwargs):  # as sendfile reports it: the source and the file it could not fill
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(source), None, os.fspath(target))

    monkeypatch.setattr(bundle_module.shutil, "copyfile", copyfile)
    return "cannot write models/pneumonia/model.json of the bundle: No space left on device", "free space"


def _no_space_for_the_manifest(monkeypatch, out):
    write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "bundle.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a failed write() names no file
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    return "cannot write the bundle: No space left on device", "free space"


def _read_only_out(monkeypatch, out):
    def read_only(folder):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder / "SHA256SUMS"))

    monkeypatch.setattr(bundle_module, "write_checksums", read_only)
    return "cannot write SHA256SUMS of the bundle: Read-only file system", "read-only"


def _failing_disk(monkeypatch, out):
    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    return "cannot write the bundle: Input/output error", "dmesg"


@pytest.mark.parametrize(
    "fail", [_no_space_for_the_model_copy, _no_space_for_the_manifest, _read_only_out, _failing_disk], ids=["copy", "write", "rofs", "eio"]
)
def test_a_disk_error_while_building_is_a_message_and_leaves_no_partial_bundle(tmp_path, monkeypatch, capsys, fail):
    """A full disk under --out, or a read-only one, came out as a traceback (copytree's shutil.Error, an OSError)."""
    from medtriage.cli import main

    accept_fake_packages(monkeypatch)
    source = fake_package(tmp_path / "models" / "pneumonia", b"model")
    monkeypatch.setattr(bundle_module, "build_medtriage_wheel", lambda wheels_dir: wheels_dir / "medtriage.whl")
    monkeypatch.setattr(bundle_module, "download_dependencies", lambda own, wheels_dir, python, platform: [])
    monkeypatch.setattr(bundle_module, "write_sbom", lambda wheels, out, pyproject, models: [])
    out = tmp_path / "usb" / "bundle"
    said, hint = fail(monkeypatch, out)
    assert main(["bundle", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {out}: {said}" in err and hint in err and "build" in err, err
    assert list((tmp_path / "usb").iterdir()) == []  # neither the bundle nor its hidden partial folder


def test_the_sbom_lists_each_model_package_with_every_file_it_installs(tmp_path, monkeypatch):
    """The SBOM named the wheels only: the models install.sh puts into PREFIX/models were in no component."""
    from tests.delivery.test_bundle import _wheel

    accept_fake_packages(monkeypatch)
    source = fake_package(tmp_path / "models" / "pneumonia", b"model")
    (source / "calibration").mkdir()
    (source / "calibration" / "curve.json").write_text("[]")
    wheel = _wheel(tmp_path, "medtriage", medtriage.__version__, [])
    monkeypatch.setattr(bundle_module, "download_dependencies", lambda own, wheels_dir, python, platform: [own])
    out = build_bundle([source], tmp_path / "out", wheel=wheel).directory
    sums = dict(reversed(line.split("  ", 1)) for line in (out / "SHA256SUMS").read_text().splitlines())
    (model,) = [c for c in json.loads((out / "sbom.cdx.json").read_text())["components"] if c["type"] == "machine-learning-model"]
    assert (model["name"], model["version"]) == ("pneumonia", "1")
    files = {c["name"]: c["hashes"] for c in model["components"]}
    assert files == {name: [{"alg": "SHA-256", "content": digest}] for name, digest in sums.items() if name.startswith("models/")}
    assert set(files) == {"models/pneumonia/model.onnx", "models/pneumonia/model.json", "models/pneumonia/calibration/curve.json"}


def test_the_copy_of_a_read_only_package_is_a_folder_its_owner_can_remove(tmp_path, monkeypatch):
    """copytree gave the copies the package's read-only folder modes: a build that failed after the copy could not
    remove its partial folder, and every later build into that --out was refused ("File exists"); nor could the owner
    of a finished bundle remove it."""
    from tests.delivery.test_bundle import _wheel

    accept_fake_packages(monkeypatch)
    source = fake_package(tmp_path / "models" / "pneumonia", b"model")
    (source / "calibration").mkdir()
    (source / "calibration" / "curve.json").write_text("[]")
    for folder in (source / "calibration", source):
        folder.chmod(0o555)
    wheel = _wheel(tmp_path, "medtriage", medtriage.__version__, [])
    monkeypatch.setattr(bundle_module, "download_dependencies", lambda own, wheels_dir, python, platform: [own])
    monkeypatch.setattr(bundle_module, "write_sbom", lambda wheels, out, pyproject, models: [])
    try:
        out = build_bundle([source], tmp_path / "out", wheel=wheel).directory
    finally:
        for folder in (source, source / "calibration"):
            folder.chmod(0o755)
    copies = [out / "models" / "pneumonia", out / "models" / "pneumonia" / "calibration"]
    assert [oct(folder.stat().st_mode & 0o777) for folder in copies] == ["0o755", "0o755"]
