"""The bundle's output folder checked before any long step, and install.sh's end checks: a runtime that does not
load on the target machine, or a `medtriage` command that does not run, fails the install instead of passing it.

install.sh runs for real (a venv, pip with --no-index) on a small bundle whose medtriage wheel is a stand-in: its
modules fail the way a wheel built for another glibc or CPU fails, which a test cannot reproduce on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import medtriage
from medtriage.cli import main
from medtriage.delivery.bundle import template_values, write_checksums, write_templates
from medtriage.delivery.wheelhouse import DEFAULT_PLATFORM, default_python

RUNTIME_ERROR = "libonnxruntime.so.1: version `GLIBC_2.28' not found"

STAND_IN = {
    "medtriage/__init__.py": "",
    "medtriage/serve/__init__.py": "",
    "medtriage/serve/package.py": (
        "class Package:\n    def describe(self):\n        return 'stand-in v1'\n\ndef load_package(path):\n    return Package()\n"
    ),
    "medtriage/serve/predictor.py": (
        "import os\n\n"
        "def create_session(package):\n"
        "    if os.environ.get('STAND_IN_RUNTIME_FAILS'):\n"
        f"        raise ImportError({RUNTIME_ERROR!r})\n"
    ),
}


def stand_in_cli(banner: str) -> str:
    """The stand-in's `medtriage` command: it prints `banner` and the version."""
    return (
        "import os, sys\n\n"
        "def main():\n"
        "    if os.environ.get('STAND_IN_COMMAND_FAILS'):\n"
        f"        sys.exit({RUNTIME_ERROR!r})\n"
        f"    print('{banner} {medtriage.__version__}')\n"
    )


def stand_in_wheel(folder: Path, banner: str = "medtriage") -> Path:
    version = medtriage.__version__
    dist_info = f"medtriage-{version}.dist-info"
    files = {
        **STAND_IN,
        "medtriage/cli.py": stand_in_cli(banner),
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: medtriage\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist_info}/entry_points.txt": "[console_scripts]\nmedtriage = medtriage.cli:main\n",
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{dist_info}/RECORD"])
    wheel = folder / f"medtriage-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


def write_stand_in_bundle(folder: Path, banner: str = "medtriage") -> Path:
    write_templates(folder, template_values(default_python(), DEFAULT_PLATFORM, [], ["model"], []))
    (folder / "wheels").mkdir()
    stand_in_wheel(folder / "wheels", banner)
    (folder / "models" / "model").mkdir(parents=True)
    (folder / "models" / "model" / "model.json").write_text("{}")
    write_checksums(folder)
    return folder


@pytest.fixture(scope="module")
def stand_in_bundle(tmp_path_factory) -> Path:
    return write_stand_in_bundle(tmp_path_factory.mktemp("stand-in") / "bundle")


def install(bundle: Path, prefix: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(bundle / "install.sh"), str(prefix)],
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def installed(stand_in_bundle) -> tuple[Path, subprocess.CompletedProcess]:
    """The prefix of one passing install, and its run; the failing runs install again over it."""
    prefix = stand_in_bundle.parent / "opt"
    return prefix, install(stand_in_bundle, prefix)


@pytest.mark.slow
def test_install_sh_loads_each_model_in_the_runtime_and_reports_the_version(installed):
    done = installed[1]
    assert done.returncode == 0, done.stderr
    assert "model stand-in v1 verified and loaded by ONNX Runtime" in done.stdout
    assert f"(medtriage {medtriage.__version__})" in done.stdout


@pytest.mark.parametrize(
    ("failing", "said"),
    [("STAND_IN_RUNTIME_FAILS", "does not load on this machine"), ("STAND_IN_COMMAND_FAILS", "bin/medtriage does not run")],
    ids=["runtime", "command"],
)
@pytest.mark.slow
def test_install_sh_fails_when_the_installed_medtriage_cannot_run_here(stand_in_bundle, installed, failing, said):
    done = install(stand_in_bundle, installed[0], **{failing: "1"})
    assert done.returncode != 0, done.stdout
    assert RUNTIME_ERROR in done.stderr and said in done.stderr and DEFAULT_PLATFORM in done.stderr, done.stderr
    assert "installed:" not in done.stdout


def test_an_output_folder_that_cannot_be_created_is_refused_before_anything_is_built(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    assert main(["bundle", str(tmp_path / "pkg"), "--out", str(tmp_path / "afile" / "bundle")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'afile' / 'bundle'}: cannot create the bundle folder here" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_missing_package_leaves_no_partial_folder(tmp_path, capsys):
    assert main(["bundle", str(tmp_path / "pkg"), "--out", str(tmp_path / "out")]) == 2
    assert "model package folder not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_same_source_builds_the_same_medtriage_wheel(tmp_path, monkeypatch):
    """Its sha256 goes into the SBOM and SHA256SUMS: two builds of one checkout must agree (the zip entries
    the build writes carry a time, which would otherwise be the time of the build)."""
    from medtriage.delivery.wheelhouse import build_medtriage_wheel
    from medtriage.format import sha256_file

    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first = build_medtriage_wheel(tmp_path / "first")
    time.sleep(2.1)  # zip times have a two-second step
    second = build_medtriage_wheel(tmp_path / "second")
    assert first.name == second.name and sha256_file(first) == sha256_file(second)


@pytest.mark.slow
def test_a_reinstall_switches_releases_only_when_it_passes_and_replaces_model_folders_whole(stand_in_bundle, tmp_path):
    prefix = tmp_path / "opt"
    older, previous = prefix / "venvs" / "0.0.1-py3.0", prefix / "venvs" / "0.0.2-py3.0"
    for release in (older, previous):
        (release / "bin").mkdir(parents=True)
    (prefix / "venv").symlink_to(previous)  # what the units run now
    (prefix / "models" / "model").mkdir(parents=True)
    (prefix / "models" / "model" / "stale.bin").write_text("a file of the model's earlier version")
    (prefix / "models" / "withdrawn").mkdir()

    failed = install(stand_in_bundle, prefix, STAND_IN_RUNTIME_FAILS="1")
    assert failed.returncode != 0 and "Nothing was switched" in failed.stderr
    assert os.readlink(prefix / "venv") == str(previous) and (prefix / "models" / "model" / "stale.bin").exists()
    assert sorted((prefix / "venvs").iterdir()) == [older, previous]  # the failed release's venv went with it

    done = install(stand_in_bundle, prefix)
    assert done.returncode == 0, done.stderr
    release = Path(os.readlink(prefix / "venv"))
    assert release.parent == prefix / "venvs" and release.name.startswith(medtriage.__version__)
    assert sorted(p.name for p in (prefix / "venvs").iterdir()) == sorted([previous.name, release.name])  # older went
    assert f"the previous release stays in {previous}" in done.stdout
    assert sorted(p.name for p in (prefix / "models" / "model").iterdir()) == ["model.json"]
    assert f"{prefix / 'models' / 'withdrawn'}/ is not in this bundle" in done.stderr
    assert subprocess.run([prefix / "venv" / "bin" / "medtriage"], capture_output=True, text=True).stdout.startswith("medtriage")


@pytest.mark.slow
def test_an_install_made_before_releases_had_folders_of_their_own_is_switched_to_one(stand_in_bundle, tmp_path):
    prefix = tmp_path / "opt"
    (prefix / "venv" / "bin").mkdir(parents=True)  # the venv as a folder of its own
    done = install(stand_in_bundle, prefix)
    assert done.returncode == 0, done.stderr
    assert (prefix / "venv").is_symlink() and (prefix / "venv" / "bin" / "medtriage").exists()


@pytest.mark.slow
def test_a_rebuilt_bundle_of_the_installed_version_is_installed_not_skipped(installed, tmp_path):
    """pip, run in the venv of the running release, found medtriage of this version there and installed nothing:
    neither the rebuilt wheel nor the dependencies the new SBOM lists, and the install still reported success."""
    prefix, first = installed
    assert first.returncode == 0, first.stderr
    running = os.readlink(prefix / "venv")
    done = install(write_stand_in_bundle(tmp_path / "bundle", banner="rebuilt medtriage"), prefix)
    assert done.returncode == 0, done.stderr
    assert f"(rebuilt medtriage {medtriage.__version__})" in done.stdout
    assert os.readlink(prefix / "venv") != running and f"the previous release stays in {running}" in done.stdout
    assert Path(running, "bin", "medtriage").exists()  # to switch back to


@pytest.mark.slow
def test_a_prefix_spelt_with_extra_slashes_keeps_the_release_it_replaces(stand_in_bundle, tmp_path):
    """`/opt/medtriage//` after an install into `/opt/medtriage/.`: releases were told apart by their spelling, and
    the one replaced was removed while the installer said it stays; the units got the slashes too."""
    prefix = tmp_path / "opt"
    previous = prefix / "venvs" / "0.0.2-py3.0"
    (previous / "bin").mkdir(parents=True)
    (prefix / "venv").symlink_to(f"{prefix}/./venvs/{previous.name}")  # as an install given `{prefix}/.` linked it
    done = install(stand_in_bundle, f"{prefix}//")
    assert done.returncode == 0, done.stderr
    assert previous.is_dir() and "the previous release stays in" in done.stdout
    unit = (prefix / "systemd" / "medtriage-serve@.service").read_text()
    assert f"ExecStart={prefix}/venv/bin/medtriage serve {prefix}/models/%i" in unit
