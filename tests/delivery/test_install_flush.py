"""install.sh has what it wrote fsynced, which reports a write that failed, not flushed by a plain sync, which cannot:
before the switch a failure leaves PREFIX as it was; after it the install fails, saying that the new release runs. An
older sync, which ignores its arguments, leaves the fsync to Python. Runs against the small bundle and the stand-in
interpreter of test_install_all_or_nothing.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import medtriage
from tests.delivery.test_bundle_offline import small_bundle
from tests.delivery.test_install_all_or_nothing import earlier_install, failing_command, fake_python, install, snapshot


@pytest.mark.parametrize("arguments", [r"--\ */venvs/*", r"--\ */models/.model.new*"], ids=["release", "staged model"])
def test_a_write_the_disk_lost_before_the_switch_fails_the_install_and_changes_nothing(tmp_path, arguments):
    """A plain sync said nothing of it, and the switch made the lost files the running release."""
    prefix = earlier_install(tmp_path / "opt")
    before = snapshot(prefix)
    done = install(small_bundle(tmp_path), prefix, fake_python(tmp_path), failing_command(tmp_path / "bin", "sync", arguments))
    assert done.returncode != 0 and "could not flush the new release" in done.stderr, done.stderr
    assert f"Nothing was switched: {prefix} runs what it ran before" in done.stderr and snapshot(prefix) == before


def test_a_switch_the_disk_lost_fails_the_install_and_says_the_new_release_runs(tmp_path):
    prefix = earlier_install(tmp_path / "opt")
    switched = f"case $(readlink {prefix}/venv) in */venvs/{medtriage.__version__}-*) exit 1 ;; esac"
    failing = failing_command(tmp_path / "bin", "sync", "--*", then=switched)
    done = install(small_bundle(tmp_path), prefix, fake_python(tmp_path), failing)
    assert done.returncode != 0 and f"{prefix} runs the new release, but its switch could not be flushed" in done.stderr, done.stderr
    assert "installed:" not in done.stdout and Path(os.readlink(prefix / "venv")).name.startswith(medtriage.__version__)


def test_a_sync_that_ignores_its_arguments_leaves_the_fsync_to_python(tmp_path):
    """As GNU sync before coreutils 8.24 does: it flushes everything and can report nothing."""
    prefix = earlier_install(tmp_path / "opt")
    old_sync = failing_command(tmp_path / "bin", "sync", "?*", then='echo "sync: ignoring all arguments" >&2; exec "$REAL"')
    fsynced = tmp_path / "fsynced"
    python = tmp_path / "logging-python"
    python.write_text(f'#!/bin/sh\ncase "$2" in *os.fsync*) printf "%s\\n" "$@" >> {fsynced} ;; esac\nexec {fake_python(tmp_path)} "$@"\n')
    python.chmod(0o755)
    done = install(small_bundle(tmp_path), prefix, python, old_sync)
    assert done.returncode == 0, done.stderr
    paths = fsynced.read_text().splitlines()
    assert f"{prefix}/models/.model.new/model.json" in paths and f"{os.readlink(prefix / 'venv')}/bin/medtriage" in paths
    assert f"{prefix}/models" in paths


def test_the_folders_an_install_made_are_flushed_in_the_folders_that_hold_them(tmp_path):
    """`mkdir -p` made srv/ and srv/medtriage/ too: a power loss after the switch could lose their names, and the
    release with them, had only the folder holding PREFIX been flushed."""
    prefix = tmp_path / "srv" / "sites" / "medtriage"
    synced = tmp_path / "synced"
    logging_sync = failing_command(tmp_path / "bin", "sync", "--*", then=f'shift; printf "%s\\n" "$@" >> {synced}; exec "$REAL" -- "$@"')
    done = install(small_bundle(tmp_path), prefix, fake_python(tmp_path), logging_sync)
    assert done.returncode == 0, done.stderr
    paths = {os.path.normpath(line) for line in synced.read_text().splitlines()}
    assert {str(tmp_path), str(tmp_path / "srv"), str(tmp_path / "srv" / "sites"), str(prefix)} <= paths


@pytest.mark.parametrize("linked", ["", "models"], ids=["prefix", "models folder"])
def test_a_prefix_or_folder_of_it_that_is_a_link_to_another_disk_is_flushed(tmp_path, linked):
    """find skipped a named path that is a link: the renames of the switch in it never reached the disk."""
    prefix = tmp_path / "opt" / "medtriage"
    prefix.parent.mkdir()
    link = prefix / linked if linked else prefix
    if linked:
        prefix.mkdir()
    (tmp_path / "data").mkdir()
    link.symlink_to(tmp_path / "data")
    synced = tmp_path / "synced"
    logging_sync = failing_command(tmp_path / "bin", "sync", "--*", then=f'shift; printf "%s\\n" "$@" >> {synced}; exec "$REAL" -- "$@"')
    done = install(small_bundle(tmp_path), prefix, fake_python(tmp_path), logging_sync)
    assert done.returncode == 0, done.stderr
    assert synced.read_text().splitlines().count(str(link)) == 2  # the staged copies, then the switch
