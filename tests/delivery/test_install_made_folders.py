"""install.sh failing before the switch leaves the file system as it found it, the folders it made included: each one
it made goes once empty (PREFIX and the folders above it that it made too), each one that was there stays, and one
in which something else put a file meanwhile stays with that file. Runs against the small bundle, the stand-in
interpreter and the failing commands of test_install_all_or_nothing.py."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from tests.delivery.test_bundle_offline import small_bundle
from tests.delivery.test_install_all_or_nothing import failing_command, fake_python, install, snapshot

# Each after models/, systemd/ and config/ were made, the release built and the copies staged.
FAILURES = [("cp", "*config*", "could not copy"), ("sync", r"--\ */venvs/*", "could not flush"), ("mv", "*/venv", "could not switch")]
IDS = ["config copy", "flush", "venv switch"]


@pytest.mark.parametrize(("command", "arguments", "said"), FAILURES, ids=IDS)
def test_a_failed_install_into_a_prefix_that_did_not_exist_removes_it(tmp_path, command, arguments, said):
    """PREFIX, and the folder above it that the install made, stayed behind with empty venvs/, models/, systemd/ and
    config/ in it."""
    prefix = tmp_path / "srv" / "medtriage"
    done = install(small_bundle(tmp_path), prefix, fake_python(tmp_path), failing_command(tmp_path / "bin", command, arguments))
    assert done.returncode != 0 and said in done.stderr, done.stderr
    assert not (tmp_path / "srv").exists()


@pytest.mark.parametrize(("command", "arguments", "said"), FAILURES, ids=IDS)
def test_a_failed_install_leaves_exactly_the_folders_that_were_there(tmp_path, command, arguments, said):
    prefix = tmp_path / "opt"
    (prefix / "models").mkdir(parents=True)  # empty: it stays all the same
    (prefix / "config").mkdir()
    (prefix / "config" / "site.env").write_text("the site's own")
    before = snapshot(prefix)
    done = install(small_bundle(tmp_path), prefix, fake_python(tmp_path), failing_command(tmp_path / "bin", command, arguments))
    assert done.returncode != 0 and said in done.stderr, done.stderr
    assert snapshot(prefix) == before  # no venvs/, no systemd/


def test_a_folder_the_install_made_stays_with_a_file_something_else_put_there(tmp_path):
    """Only empty folders go (rmdir, not rm -r): the file and the folders that hold it stay, the others go."""
    prefix = tmp_path / "srv" / "medtriage"
    foreign = f'echo "a unit of the site" > {prefix}/systemd/site.service; exit 1'
    failing = failing_command(tmp_path / "bin", "cp", "*config*", then=foreign)
    done = install(small_bundle(tmp_path), prefix, fake_python(tmp_path), failing)
    assert done.returncode != 0 and "could not copy" in done.stderr, done.stderr
    assert snapshot(tmp_path / "srv") == {
        "medtriage": "folder",
        "medtriage/systemd": "folder",
        "medtriage/systemd/site.service": "a unit of the site\n",
    }


def test_a_prefix_another_install_locked_stays_though_this_one_made_it(tmp_path):
    """Both saw PREFIX missing and made it, the other took the lock: this one, refused, leaves PREFIX to it."""
    prefix = tmp_path / "opt"
    holder = tmp_path / "holder.pid"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # mkdir making PREFIX, then another install taking its lock before this one gets to it.
    take = f"exec 8<{prefix}; flock 8; echo \\$\\$ > {holder}; exec sleep 600"
    (bin_dir / "mkdir").write_text(
        f'#!/bin/sh\n{shutil.which("mkdir")} "$@" || exit\n'
        f'[ "$*" != "-p {prefix}" ] || {{ sh -c "{take}" >/dev/null 2>&1 & until [ -s {holder} ]; do sleep 0.1; done; }}\n'
    )
    (bin_dir / "mkdir").chmod(0o755)
    try:
        done = install(small_bundle(tmp_path), prefix, fake_python(tmp_path), bin_dir)
    finally:
        if holder.exists():
            os.kill(int(holder.read_text()), signal.SIGTERM)
    assert done.returncode != 0 and f"another install.sh is installing into {prefix}" in done.stderr, done.stderr
    assert prefix.is_dir()
