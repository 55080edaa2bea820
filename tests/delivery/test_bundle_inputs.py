"""What `medtriage bundle` refuses before any long step: a target no wheelhouse can be made for, and a package
folder whose name cannot name a model on the target (it becomes a systemd instance name and a SHA256SUMS path)."""

from __future__ import annotations

import shutil

import pytest

from medtriage.delivery.bundle import build_bundle
from medtriage.errors import ConfigError
from tests.export.tiny_package import shared_tiny_package


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
