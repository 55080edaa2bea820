"""install.sh given what it cannot use: a PREFIX that is a file, inside the bundle, that cannot be created or that its
user cannot read, an interpreter that does not run or cannot make a venv, wheels pip cannot install, a second
install.sh into the same PREFIX. Each stops with a message that says what and what to do, and leaves PREFIX as it was."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.delivery.test_bundle_offline import NO_PYTHON, small_bundle
from tests.delivery.test_install_all_or_nothing import FAKE_PYTHON, earlier_install, failing_command, fake_python, install, snapshot


def test_a_second_install_into_the_same_prefix_is_refused_and_changes_nothing(tmp_path):
    """Two at once: each one's clean-up of PREFIX/venvs removed the release the other was building, and the later
    one's staging removed the other's staged copies."""
    prefix = earlier_install(tmp_path / "opt")
    before = snapshot(prefix)
    held = os.open(prefix, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running install.sh holds it
        done = install(small_bundle(tmp_path), prefix, fake_python(tmp_path))
    finally:
        os.close(held)
    assert done.returncode != 0 and f"another install.sh is installing into {prefix}" in done.stderr, done.stderr
    assert snapshot(prefix) == before


def test_a_prefix_that_is_a_file_is_refused_with_a_message(tmp_path):
    prefix = tmp_path / "opt"
    prefix.write_text("not a folder")
    done = install(small_bundle(tmp_path), prefix, fake_python(tmp_path))
    assert done.returncode != 0 and f"PREFIX {prefix} is not a folder" in done.stderr, done.stderr
    assert "Nothing was installed" in done.stderr and prefix.read_text() == "not a folder"


def test_a_prefix_that_cannot_be_created_is_a_message(tmp_path):
    failing = failing_command(tmp_path / "bin", "mkdir", "*/venvs")
    done = install(small_bundle(tmp_path), tmp_path / "opt", fake_python(tmp_path), failing)
    assert done.returncode != 0 and f"cannot create {tmp_path / 'opt'}/venvs" in done.stderr, done.stderr
    assert "Nothing was installed" in done.stderr and not (tmp_path / "opt").exists()  # the PREFIX it made went


@pytest.fixture
def shared_folder():
    """A folder every user can enter (pytest's tmp_path is root's alone), for a bundle another user runs."""
    folder = Path(tempfile.mkdtemp())
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_a_prefix_its_user_cannot_read_is_refused_with_a_message(shared_folder):
    """The shell's "cannot open PREFIX: Permission denied" was all it said. Root reads any folder: as root the
    install runs as nobody, into a folder of root's."""
    prefix = shared_folder / "opt"
    prefix.mkdir(mode=0o700)
    command = [str(small_bundle(shared_folder) / "install.sh"), str(prefix)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("setpriv (util-linux) is needed to run install.sh as a user other than root")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    else:
        prefix.chmod(0o000)
    try:
        done = subprocess.run(command, env={**os.environ, "PYTHON": NO_PYTHON}, capture_output=True, text=True, timeout=60, check=False)
    finally:
        prefix.chmod(0o700)
    assert done.returncode != 0 and f"cannot read, write or enter PREFIX {prefix}" in done.stderr, done.stderr
    assert "install.sh: error: user " in done.stderr and "Nothing was installed" in done.stderr
    assert not list(prefix.iterdir())


def test_a_prefix_inside_the_bundle_is_refused(tmp_path):
    """It installed, and left the bundle holding files SHA256SUMS does not list: every later run refused it."""
    bundle = small_bundle(tmp_path)
    done = install(bundle, bundle / "opt", fake_python(tmp_path))
    assert done.returncode != 0 and f"PREFIX {bundle / 'opt'} is inside the bundle" in done.stderr, done.stderr
    assert not (bundle / "opt").exists()


def _interpreter(folder: Path, step: str, then: str) -> Path:
    """The stand-in interpreter, with `step` ("-m venv", "-m pip" or "*version_info*") doing `then`."""
    pattern = {"-m venv": '"-m venv")', "-m pip": '"-m pip")', "*version_info*": "*version_info*)"}[step]
    python = folder / "python"
    python.write_text(FAKE_PYTHON.replace(pattern, f"{pattern} {then}; exit 1;", 1))
    python.chmod(0o755)
    return python


@pytest.mark.parametrize(
    ("step", "said"),
    [
        ("*version_info*", "does not run"),
        ("-m venv", "could not create a virtual environment"),
        ("-m pip", "pip could not install medtriage"),
    ],
    ids=["interpreter", "venv", "pip"],
)
def test_an_interpreter_or_wheels_that_fail_stop_with_a_message(tmp_path, step, said):
    """Each stopped the install with its own output only (for the interpreter, none at all) and exit status 1."""
    prefix = earlier_install(tmp_path / "opt")
    before = snapshot(prefix)
    python = _interpreter(tmp_path, step, "echo 'ensurepip is not available' >&2")
    done = install(small_bundle(tmp_path), prefix, python)
    assert done.returncode != 0 and "install.sh: error: " in done.stderr and said in done.stderr, done.stderr
    assert f"{prefix} runs what it ran before" in done.stderr and snapshot(prefix) == before


def test_a_prefix_spelt_with_dot_folders_gets_units_systemd_accepts(tmp_path):
    """`/opt/./medtriage` went into ExecStart as it was: systemd refuses a path that is not normalized."""
    (tmp_path / "srv").mkdir()
    done = install(small_bundle(tmp_path), f"{tmp_path}/./srv/./opt/.", fake_python(tmp_path))
    assert done.returncode == 0, done.stderr
    unit = (tmp_path / "srv" / "opt" / "systemd" / "medtriage-serve@.service").read_text()
    assert f"ExecStart={tmp_path}/srv/opt/venv/bin/medtriage " in unit and "/./" not in unit


def test_a_prefix_with_a_parent_folder_step_or_a_second_argument_is_refused(tmp_path):
    done = install(small_bundle(tmp_path), f"{tmp_path}/srv/../opt", fake_python(tmp_path))
    assert done.returncode != 0 and "'..'" in done.stderr and "Nothing was installed" in done.stderr, done.stderr
    bundle = tmp_path / "bundle"
    two = subprocess.run([bundle / "install.sh", tmp_path / "opt", tmp_path / "other"], capture_output=True, text=True, check=False)
    assert two.returncode != 0 and "takes one argument" in two.stderr and "Nothing was installed" in two.stderr, two.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "python"]
