"""What `medtriage bundle` refuses before any long step: a target no wheelhouse can be made for, a package folder
whose name cannot name a model on the target (it becomes a systemd instance name and a SHA256SUMS path), a package
file the bundle cannot ship, and an output folder that cannot take the finished bundle's name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medtriage.delivery import bundle as bundle_module
from medtriage.delivery.bundle import build_bundle
from medtriage.errors import ConfigError, PackageError
from tests.delivery.file_modes import WITHOUT_MODE_OVERRIDES
from tests.export.tiny_package import shared_tiny_package, write_unreadable_graph


@pytest.mark.parametrize(
    ("python", "platform", "where"), [("3.12", "win_amd64", "--platform"), ("2.7", "manylinux_2_28_x86_64", "--python")]
)
def test_an_unsupported_target_is_refused_before_the_packages_are_read(tmp_path, python, platform, where):
    with pytest.raises(ConfigError) as refused:
        build_bundle([tmp_path / "no-such-package"], tmp_path / "out", python, platform)  # the target is checked first
    assert refused.value.where == where
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["chest model", "chest\nmodel", "-chest"])
def test_a_package_folder_name_that_cannot_name_a_model_is_refused(tmp_path_factory, tmp_path, name):
    package = shutil.copytree(shared_tiny_package(tmp_path_factory)[0].package_dir, tmp_path / "packages" / name)
    with pytest.raises(ConfigError, match="cannot name a model in the bundle") as refused:
        build_bundle([package], tmp_path / "out", wheel=tmp_path / "unused.whl")
    assert "rename the folder" in refused.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packages"]


def _add_dangling_link(package: Path) -> None:
    (package / "latest").symlink_to(package / "no-such-file")


def _add_file_with_a_line_break(package: Path) -> None:
    (package / "notes\nv2.txt").write_text("release notes")


def _add_file_whose_name_is_no_utf8(package: Path) -> None:
    with open(os.fsencode(package) + b"/r\xe9sum\xe9.txt", "w") as file:  # Latin-1, as a copy from an old share names it
        file.write("summary")


def _add_link_to_its_own_folder(package: Path) -> None:
    (package / "same").symlink_to(".")


def _add_link_to_the_folder_above(package: Path) -> None:
    (package / "up").symlink_to("..")


def _add_links_to_each_other(package: Path) -> None:
    (package / "a").symlink_to("b")
    (package / "b").symlink_to("a")


def _add_folders_linked_to_each_other(package: Path) -> None:
    for name, other in (("x", "y"), ("y", "x")):
        (package / name).mkdir()
        (package / name / f"to-{other}").symlink_to(f"../{other}")


def _add_named_pipe(package: Path) -> None:
    os.mkfifo(package / "progress.fifo")  # as a tool that reports progress leaves it


@pytest.mark.parametrize(
    ("add", "said"),
    [
        (_add_dangling_link, "a link in the package leads nowhere"),
        (_add_file_with_a_line_break, "cannot be listed in SHA256SUMS: 'notes\\nv2.txt'"),
        (_add_file_whose_name_is_no_utf8, "cannot be listed in SHA256SUMS"),
        (_add_link_to_its_own_folder, "same: a link in the package leads back to"),
        (_add_link_to_the_folder_above, "up: a link in the package leads back to"),
        (_add_links_to_each_other, "a: links in the package lead round in a loop"),
        (_add_folders_linked_to_each_other, "x/to-y/to-x: a link in the package leads back to"),
        (_add_named_pipe, "progress.fifo: the package holds a named pipe"),
    ],
    ids=["dangling link", "line break", "not utf-8", "link to itself", "link above", "links to each other", "folder loop", "pipe"],
)
def test_a_package_file_the_bundle_cannot_ship_is_refused_before_anything_is_built(tmp_path_factory, tmp_path, add, said):
    """The link failed the copy after the whole download, with a traceback; the line break gave a bundle whose
    SHA256SUMS install.sh reads as damaged; the Latin-1 name a traceback while SHA256SUMS was written. A link that
    leads back up was walked to the kernel's limit of forty links, then called one that leads nowhere (up: the
    whole folder above, over and over); the pipe stopped the copy after the download."""
    package = shutil.copytree(shared_tiny_package(tmp_path_factory)[0].package_dir, tmp_path / "packages" / "chest")
    add(package)
    with pytest.raises(PackageError) as refused:
        build_bundle([package], tmp_path / "out", wheel=tmp_path / "unused.whl")
    assert said in str(refused.value) and refused.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packages"]


def test_a_link_to_another_folder_of_the_package_is_shipped(tmp_path_factory, tmp_path):
    """Links are followed: one to a folder that does not hold it is no loop, however the folders nest."""
    package = shutil.copytree(shared_tiny_package(tmp_path_factory)[0].package_dir, tmp_path / "chest")
    (package / "docs" / "v1").mkdir(parents=True)
    (package / "latest-docs").symlink_to("docs/v1")
    (package / "docs" / "v1" / "all-docs").symlink_to("../../docs", target_is_directory=True)  # docs holds this link
    with pytest.raises(PackageError, match="all-docs: a link in the package leads back to"):
        bundle_module._check_shipped_files(package)
    (package / "docs" / "v1" / "all-docs").unlink()
    bundle_module._check_shipped_files(package)


def test_an_empty_mount_point_as_the_output_folder_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    """A freshly formatted USB drive as --out: the bundle, built beside it, cannot be renamed onto a mount point,
    which failed with a traceback (EBUSY) after the whole download."""
    usb = tmp_path / "usb"
    usb.mkdir()
    is_mount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == usb or is_mount(path))
    with pytest.raises(ConfigError, match="is a mount point") as refused:
        build_bundle([tmp_path / "no-such-package"], usb)
    assert refused.value.where == str(usb) and refused.value.hint.endswith(f"--out {usb / 'medtriage-bundle'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usb"]


def test_a_model_onnx_runtime_cannot_load_is_refused_before_anything_is_built(tmp_path_factory, tmp_path):
    """Its sha256 matches (recorded as written), so only loading it shows it is no graph: it shipped, and failed only in
    the hospital's install."""
    package = shutil.copytree(shared_tiny_package(tmp_path_factory)[0].package_dir, tmp_path / "packages" / "chest")
    write_unreadable_graph(package)
    with pytest.raises(PackageError, match="ONNX Runtime cannot load model.onnx"):
        build_bundle([package], tmp_path / "out", wheel=tmp_path / "unused.whl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packages"]


def test_an_output_folder_inside_a_package_it_ships_is_refused(tmp_path_factory, tmp_path):
    """`--out models/chest/bundle` built, and left the bundle in the package: every later bundle of it shipped that one."""
    package = shutil.copytree(shared_tiny_package(tmp_path_factory)[0].package_dir, tmp_path / "chest")
    before = sorted(p.name for p in package.iterdir())
    with pytest.raises(ConfigError, match="inside the model package") as refused:
        build_bundle([package], package / "bundle", wheel=tmp_path / "unused.whl")
    assert refused.value.where == str(package / "bundle") and "--out" in refused.value.hint
    assert sorted(p.name for p in package.iterdir()) == before


def test_an_output_folder_below_one_this_user_cannot_enter_is_a_message_not_a_traceback(tmp_path):
    """Looking whether --out existed raised PermissionError out of the command. Root enters any folder: as root the
    command runs without the capabilities that let it (tests/delivery/file_modes.py)."""
    (tmp_path / "closed").mkdir(mode=0o000)
    out = tmp_path / "closed" / "bundle"
    code = "import sys; from medtriage.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", code, "bundle", str(tmp_path / "pkg"), "--out", str(out)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("setpriv (util-linux) is needed to run the command bound by file modes")
        command = [*WITHOUT_MODE_OVERRIDES, *command]
    try:
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    finally:
        (tmp_path / "closed").chmod(0o700)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"error: {out}: cannot look into the output folder or a folder above it: Permission denied" in done.stderr
    assert "(choose an --out inside a folder you may enter and write to)" in done.stderr
